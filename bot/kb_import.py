"""`quill kb import`: a team's docs folder into the knowledge base, kept in sync.

Files and folders (walked recursively) of the kinds below are read to text, off the event loop:
Markdown, plain text and reStructuredText as UTF-8, HTML through the standard library's parser
(scripts and styles dropped), PDF through pypdf's text layer. Each becomes a document named by
its path (relative to the folder given), recorded with its absolute path and the sha256 of its
text: an unchanged file is skipped, a changed one re-indexed, and with `prune` the documents
whose files are gone from the folders given are removed. A file that cannot be read (binary data
named .md, an empty file, a PDF without a text layer, one too large, a folder without read
permission) is reported by name with the reason, and the rest is imported.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from bot.search import Search, content_hash

TEXT_SUFFIXES = (".md", ".markdown", ".txt", ".rst")
HTML_SUFFIXES = (".html", ".htm")
SUFFIXES = (*TEXT_SUFFIXES, *HTML_SUFFIXES, ".pdf")
MAX_FILE_BYTES = 50 * 1024 * 1024  # past this a file is refused before it is read
NAME_CHARS = 100  # knowledge_doc.name


class Unreadable(Exception):
    """A file that cannot become a document; the message says why, for the report."""


@dataclass
class ImportReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


class _HTMLText(HTMLParser):
    """The visible text of an HTML page, a paragraph per block element, headings as Markdown."""

    BLOCKS = frozenset("p div li tr br section article h1 h2 h3 h4 h5 h6 pre blockquote".split())  # noqa: SIM905

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n\n" + ("#" * int(tag[1]) + " " if tag[0] == "h" and tag[1:].isdigit() else ""))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def _decode(data: bytes) -> str:
    if b"\x00" in data:
        raise Unreadable("binary data, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Unreadable(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_document(path: Path) -> str:
    """The text of one file (blocking: call it in a thread)."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise Unreadable(f"too large ({size / 1024 / 1024:.0f} MB; at most {MAX_FILE_BYTES // 1024 // 1024} MB)")
        data = path.read_bytes()
    except OSError as exc:
        raise Unreadable(f"cannot read it: {exc.strerror}") from None
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        text = _pdf_text(path)
    elif suffix in HTML_SUFFIXES:
        parser = _HTMLText()
        parser.feed(_decode(data))
        text = "".join(parser.parts)
    else:
        text = _decode(data)
    text = "\n\n".join(p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip())
    if not text:
        raise Unreadable("no text in it (empty, or a PDF without a text layer)")
    return text


def _pdf_text(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (PdfReadError, ValueError, KeyError, TypeError) as exc:
        raise Unreadable(f"not a readable PDF ({exc})") from None


def collect(paths: Iterable[Path], failed: list[tuple[str, str]]) -> list[tuple[Path, str]]:
    """(file, document name) for each importable file under `paths`, sorted; folders that
    cannot be listed go to `failed`."""
    found: list[tuple[Path, str]] = []
    for root in paths:
        if root.is_file():
            found.append((root, root.name))
            continue
        if not root.is_dir():
            failed.append((str(root), "no such file or folder"))
            continue
        for folder, dirs, files in os.walk(root, onerror=lambda exc: _unreadable_folder(exc, failed)):
            dirs.sort()
            for name in sorted(files):
                file = Path(folder) / name
                if file.suffix.lower() in SUFFIXES:
                    found.append((file, str(Path(root.name) / file.relative_to(root))))
    return found


def _unreadable_folder(exc: OSError, failed: list[tuple[str, str]]) -> None:
    failed.append((str(exc.filename), f"cannot read the folder: {exc.strerror}"))


async def import_paths(
    search: Search,
    place: tuple[str, str, str],
    paths: list[Path],
    *,
    prune: bool = False,
    added_by: str = "",
    progress: Callable[[str], None] | None = None,
) -> ImportReport:
    """Import `paths` into the knowledge base of `place` (transport, guild, channel)."""
    report = ImportReport()
    files = collect([p.resolve() for p in paths], report.failed)
    known = await search.imported(*place)
    seen: set[str] = set()
    for file, name in files:
        if progress is not None:
            progress(name)
        if len(name) > NAME_CHARS:
            name = "…" + name[-(NAME_CHARS - 1) :]
        try:
            body = await asyncio.to_thread(read_document, file)
        except Unreadable as exc:
            report.failed.append((str(file), str(exc)))
            continue
        seen.add(name)
        if name in known and known[name][1] == content_hash(body):
            report.unchanged.append(name)
            continue
        await search.add_document(*place, name, body, added_by=added_by, source=str(file))
        (report.updated if name in known else report.added).append(name)
    if prune:
        roots = [str(p.resolve()) for p in paths]
        for name, (source, _) in known.items():
            gone = name not in seen and not Path(source).exists()
            if gone and any(source == r or source.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
                await search.remove_document(*place, name)
                report.removed.append(name)
    return report
