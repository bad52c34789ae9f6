"""Saved conversation states on disk, so warm prefixes survive a restart (like llama-server's
`--slot-save-path`). The batched engine spills the states it drops from host memory, and all of
them when it stops, into `QUILL_DATA_DIR/kv/`; the next turn after a restart restores one
instead of evaluating the whole history again.

- **Never stale.** Files live in a folder named by a key of the model file's content and the
  LoRA adapter's (`state_key`): another model or a new fine-tune looks in another folder.
  Content hashes of big files are computed once and remembered by path, size and mtime.
- **Never corrupt.** A file ends with the SHA-256 of everything before it; a truncated or
  altered file is deleted with a log line when read, and the history is evaluated instead.
- **Bounded.** All folders together stay under QUILL_BATCH_DISK_MB; the least recently used
  files go first (a file's mtime is its last use).
- **Erasable.** Each file's header holds the request's tags (place, guild, users: `bot.api`
  `state_tags`), so /forget and retention delete the files holding erased messages.

File layout: b"QKV1", header length (4 bytes, little-endian), header JSON (tokens, tags), the
state as llama.cpp wrote it, then the digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"QKV1"
DIGEST = 32
SUFFIX = ".qkv"
# Read files in pieces this large to hash them (a model can be many GB).
READ_SIZE = 1 << 20


@dataclass(eq=False)
class DiskState:
    """One file: what it holds (its tokens and tags) without its state bytes."""

    path: Path
    tokens: list[int]
    tags: frozenset[str]
    size: int


def file_hash(path: Path, cache_file: Path) -> str:
    """The SHA-256 of a file's content, remembered in `cache_file` by path, size and mtime: a
    4 GB model is read once (0.61 s for the 94 MB default model at load 15), not at every start."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(digest := known.get(key), str):
        return digest
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(READ_SIZE):
            sha.update(block)
    known[key] = digest = sha.hexdigest()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache_file.with_suffix(".tmp")
    temporary.write_text(json.dumps(known))
    temporary.replace(cache_file)
    return digest


def state_key(model: Path, adapter: Path | None, cache_file: Path, layout: str) -> str:
    """The folder name for states computed by `model` with `adapter` in a context of `layout`
    (KV cell types and the like, which a state file depends on)."""
    parts = [file_hash(model, cache_file), file_hash(adapter, cache_file) if adapter else "no-adapter", layout]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def matches(tags: frozenset[str], erased: Collection[str] | None) -> bool:
    """Whether a state with `tags` may hold erased messages: any tag erased, or no tags at all
    (a state nobody labelled could hold anything); None erases everything."""
    return erased is None or not tags or not tags.isdisjoint(erased)


class StateStore:
    """The folder of saved states for the model and adapter served now, within a byte budget
    shared by every key's folder. Used only by the engine's worker thread."""

    def __init__(self, root: Path, budget: int) -> None:
        self.root = root
        self.budget = budget
        self.folder: Path | None = None
        self.states: list[DiskState] = []  # this key's, readable headers only
        self._names = 0

    def open(self, key: str) -> None:
        """Serve the states saved under `key`: read every header of its folder."""
        self.folder = self.root / key
        self.folder.mkdir(parents=True, exist_ok=True)
        for unfinished in self.folder.glob("*.tmp"):  # a write cut short by a crash
            unfinished.unlink(missing_ok=True)
        self.states = []
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            state = self._header(path)
            if state is not None:
                self.states.append(state)
        self._names = max((int(s.path.stem) for s in self.states if s.path.stem.isdigit()), default=0)
        log.info("saved states on disk: %d under %s", len(self.states), self.folder)

    def _header(self, path: Path) -> DiskState | None:
        try:
            with path.open("rb") as fh:
                magic, length = fh.read(4), fh.read(4)
                if magic != MAGIC or len(length) != 4:
                    raise ValueError("not a saved state")
                header_size = struct.unpack("<I", length)[0]
                header = json.loads(fh.read(header_size))
            size = path.stat().st_size - 8 - header_size - DIGEST
            tokens, tags = header["tokens"], header["tags"]
            if not (isinstance(tokens, list) and isinstance(tags, list)) or size <= 0:
                raise ValueError("incomplete header")
            return DiskState(path, [int(t) for t in tokens], frozenset(map(str, tags)), size)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            self._discard(path, f"unreadable header ({exc})")
            return None

    def write(self, tokens: list[int], tags: frozenset[str], state: bytes | bytearray | memoryview) -> DiskState | None:
        """Save a state (None when the budget cannot hold it, or the disk refused); older files
        are dropped, least recently used first, to make room."""
        if self.folder is None or len(state) > self.budget:
            return None
        header = json.dumps({"tokens": tokens, "tags": sorted(tags)}).encode()
        self._names += 1
        path = self.folder / f"{self._names}{SUFFIX}"
        temporary = path.with_suffix(".tmp")
        head = MAGIC + struct.pack("<I", len(header)) + header
        digest = hashlib.sha256(head)
        digest.update(state)
        try:
            with temporary.open("wb") as fh:
                fh.write(head)
                fh.write(state)
                fh.write(digest.digest())
            temporary.replace(path)
        except OSError as exc:
            log.warning("could not save a conversation state to %s: %s", path, exc)
            temporary.unlink(missing_ok=True)
            return None
        saved = DiskState(path, list(tokens), tags, len(state))
        self.states.append(saved)
        self._bound()
        return saved

    def read(self, saved: DiskState) -> bytearray | None:
        """The state bytes, verified against the file's digest; None (and the file deleted, with
        a log line) when it is missing, truncated or altered."""
        try:
            data = bytearray(saved.path.read_bytes())
        except OSError as exc:
            self.remove(saved, f"unreadable ({exc})")
            return None
        if len(data) < 8 + DIGEST or hashlib.sha256(memoryview(data)[:-DIGEST]).digest() != data[-DIGEST:]:
            self.remove(saved, "truncated or corrupt (its digest does not match)")
            return None
        start = 8 + struct.unpack("<I", data[4:8])[0]
        os.utime(saved.path)  # used now: last to be dropped
        return data[start:-DIGEST]

    def remove(self, saved: DiskState, why: str | None = None) -> None:
        if saved in self.states:
            self.states.remove(saved)
        self._discard(saved.path, why)

    def forget(self, erased: Collection[str] | None) -> int:
        """Delete the files of every key's folder that may hold erased messages (`matches`);
        how many. Other keys' files are read for their tags: an old model's states hold
        messages too."""
        count = 0
        for path in self._files():
            if self.folder is not None and path.parent == self.folder:
                continue
            state = self._header(path)
            if state is not None and matches(state.tags, erased):
                self._discard(state.path)
                count += 1
        for state in [s for s in self.states if matches(s.tags, erased)]:
            self.remove(state)
            count += 1
        return count

    def _files(self) -> list[Path]:
        return list(self.root.glob(f"*/*{SUFFIX}")) if self.root.is_dir() else []

    def _bound(self) -> None:
        """Drop the least recently used files, whatever their key, until all fit the budget."""
        files = []
        for path in self._files():
            try:
                stat = path.stat()
            except OSError:
                continue
            files.append((stat.st_mtime_ns, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.budget:
                break
            known = next((s for s in self.states if s.path == path), None)
            if known is not None:
                self.states.remove(known)
            self._discard(path)
            total -= size

    def _discard(self, path: Path, why: str | None = None) -> None:
        if why:
            log.warning("saved state %s ignored and deleted: %s", path, why)
        path.unlink(missing_ok=True)
