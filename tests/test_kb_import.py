"""`quill kb import`: a docs folder into the knowledge base, on the real databases."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot.cli import app as cli
from bot.memory import Memory
from bot.search import Search

PLACE = ("console", "", "console")


def pdf(text: str) -> bytes:
    """A one-page PDF whose text layer holds `text` ("" for a page with no text, like a scan)."""
    content = f"BT /F1 14 Tf 20 100 Td ({text}) Tj ET".encode() if text else b""
    objects = [
        b"<</Type/Catalog/Pages 2 0 R>>",
        b"<</Type/Pages/Kids[3 0 R]/Count 1>>",
        b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 400 144]/Contents 4 0 R/Resources<</Font<</F1 5 0 R>>>>>>",
        b"<</Length %d>>stream\n%s\nendstream" % (len(content), content),
        b"<</Type/Font/Subtype/Type1/BaseFont/Helvetica>>",
    ]
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj%s endobj\n" % (i, body)
    xref = len(out)
    out += b"xref\n0 6\n0000000000 65535 f \n" + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return out + b"trailer<</Size 6/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % xref


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    (root / "ops").mkdir(parents=True)
    (root / "setup.md").write_text("# Setup\n\n## VPN\n\nAsk the IT desk for a WireGuard peer.", encoding="utf-8")
    (root / "ops" / "值班.txt").write_text("值班每班一周，结束后可以调休一天。", encoding="utf-8")
    (root / "ops" / "notes.rst").write_text("Release notes\n=============\n\nReleases ship on Tuesdays.")
    (root / "page.html").write_text(
        "<html><head><style>p{}</style><script>alert(1)</script></head>"
        "<body><h1>Parking</h1><p>Twelve car spaces, booked a day ahead.</p></body></html>"
    )
    (root / "policy.pdf").write_bytes(pdf("Laptops must keep disk encryption on."))
    (root / "scan.pdf").write_bytes(pdf(""))  # no text layer
    (root / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a PDF at all")
    (root / "binary.md").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    (root / "empty.txt").write_text("")
    (root / "image.png").write_bytes(b"\x89PNG")  # not a document kind: not even reported
    return root


def run(memory: Memory, paths: list[Path], prune: bool = False):  # type: ignore[no-untyped-def]
    from bot.kb_import import import_paths

    return asyncio.run(import_paths(Search(memory.engine), PLACE, paths, prune=prune))


def test_import_reports_bad_files_by_name_and_is_idempotent_with_prune(db_url: str, docs: Path) -> None:
    memory = Memory.open(db_url)
    try:
        first = run(memory, [docs])
        assert sorted(first.added) == [
            "docs/ops/notes.rst",
            "docs/ops/值班.txt",
            "docs/page.html",
            "docs/policy.pdf",
            "docs/setup.md",
        ]
        reasons = {Path(path).name: reason for path, reason in first.failed}
        assert set(reasons) == {"scan.pdf", "broken.pdf", "binary.md", "empty.txt"}
        assert "binary data" in reasons["binary.md"] and "no text" in reasons["scan.pdf"]
        assert "not a readable PDF" in reasons["broken.pdf"] and "no text" in reasons["empty.txt"]
        search = Search(memory.engine)
        for question, name in (
            ("值班结束后能休息吗？", "docs/ops/值班.txt"),
            ("disk encryption", "docs/policy.pdf"),
            ("car parking spaces", "docs/page.html"),
        ):
            hits = asyncio.run(search.search(question, *PLACE, 4, min_relevance=0.4))
            assert hits and hits[0].name == name, question
        (hit,) = asyncio.run(search.search("parking", *PLACE, 4, min_relevance=0.4))
        assert hit.heading == "Parking" and "alert" not in hit.text  # script dropped, <h1> a heading

        again = run(memory, [docs])
        assert again.added == again.updated == [] and len(again.unchanged) == 5
        (docs / "setup.md").write_text("# Setup\n\n## VPN\n\nThe VPN now uses Tailscale.", encoding="utf-8")
        (docs / "ops" / "notes.rst").unlink()
        kept = run(memory, [docs])
        assert kept.updated == ["docs/setup.md"] and kept.removed == []  # without --prune nothing goes
        pruned = run(memory, [docs], prune=True)
        assert pruned.removed == ["docs/ops/notes.rst"] and pruned.updated == []
        names = [n for n, _ in asyncio.run(search.list_documents(*PLACE))]
        assert "docs/ops/notes.rst" not in names and len(names) == 4
    finally:
        memory.close()


def test_the_cli_imports_with_a_summary_and_exits_1_on_bad_files(
    db_url: str, docs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUILL_DATABASE_URL", db_url)
    monkeypatch.setenv("QUILL_DATA_DIR", str(tmp_path / "data"))
    result = CliRunner().invoke(cli, ["kb", "import", str(docs / "setup.md"), str(docs / "binary.md")])
    assert result.exit_code == 1
    assert "1 added, 0 updated, 0 unchanged, 0 removed" in result.stdout
    assert f"not imported: {docs / 'binary.md'}: binary data" in result.stderr
    result = CliRunner().invoke(cli, ["kb", "import", str(docs / "setup.md")])
    assert result.exit_code == 0 and "0 added, 0 updated, 1 unchanged" in result.stdout
