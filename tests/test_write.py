"""Writing helper: validated JSON fixes, word diffs, modes and clear refusals, on the real model."""

from __future__ import annotations

from bot.api import Request
from bot.app import Quill
from plugins.write import Fix, apply_fixes, word_diff


def request(text: str) -> Request:
    return Request("console", "c1", "u1", text)


def test_word_diff_marks_changed_words_and_keeps_the_rest() -> None:
    before = "Their is a error in teh text.\nSecond line stays."
    after = "There is an error in the text.\nSecond line stays."
    assert word_diff(before, after) == (
        "[-Their-]{+There+} is [-a-]{+an+} error in [-teh-]{+the+} text.\nSecond line stays."
    )
    assert word_diff("same words", "same words") == "same words"


def test_only_fixes_found_in_the_text_are_applied() -> None:
    fixes = [
        Fix(original="teh", correction="the", reason="spelling"),
        Fix(original="not in the text", correction="x", reason="invented"),
        Fix(original="cat", correction="cat", reason="no change"),
    ]
    corrected, applied = apply_fixes("teh cat sat", fixes)
    assert corrected == "the cat sat" and [f.original for f in applied] == ["teh"]


async def test_proofread_parses_the_models_json(app: Quill) -> None:
    reply = await app.router.handle(request("/write proofread Teh meeting are tomorow."))
    assert not reply.failed, reply.text
    assert reply.text == "No fixes found." or ("Fixes:\n1. “" in reply.text and "Changes:\n" in reply.text)


async def test_rewrite_in_a_tone_shows_a_diff(app: Quill) -> None:
    reply = await app.router.handle(request("/write tone:friendly rewrite Submit the report by Friday."))
    assert not reply.failed, reply.text
    answer, _, diff = reply.text.partition("\n\nChanges:\n")
    assert diff == word_diff("Submit the report by Friday.", answer)
    assert "[-" in diff or "{+" in diff


async def test_usage_errors_and_text_too_long(app: Quill) -> None:
    for text in ("/write", "/write poem about cats", "/write proofread", "/write tone:angry rewrite Hi"):
        reply = await app.router.handle(request(text))
        assert reply.failed and ("Usage: /write" in reply.text or "Unknown tone" in reply.text), text
    app.settings.max_input_chars = 50_000
    reply = await app.router.handle(request("/write shorten " + "lorem ipsum dolor " * 1500))
    assert reply.failed and "too long for one pass" in reply.text and "QUILL_N_CTX" in reply.text
