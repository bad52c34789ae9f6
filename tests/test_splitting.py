"""Splitting long replies into Discord-sized messages without breaking code blocks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.transports.splitting import split_message


def fences(part: str) -> int:
    return sum(line.strip().startswith("```") for line in part.split("\n"))


def squeeze(text: str) -> str:
    """The text without whitespace or backticks: what a split must never lose or change."""
    return "".join(text.split()).replace("`", "")


def test_short_text_is_one_part_and_blank_text_none() -> None:
    assert split_message("hello") == ["hello"]
    assert split_message("x" * 2000) == ["x" * 2000]
    assert split_message("") == [] and split_message(" \n\n ") == []


def test_paragraphs_are_kept_whole_when_they_fit() -> None:
    paragraphs = [f"{i} " + "word " * 150 for i in range(6)]  # ~750 characters each
    parts = split_message("\n\n".join(p.strip() for p in paragraphs))
    assert len(parts) == 3 and all(len(p) <= 2000 for p in parts)
    assert all(part.startswith(tuple(str(i) for i in range(6))) for part in parts)  # cut between paragraphs


def test_a_code_block_that_fits_in_the_next_message_is_not_cut() -> None:
    prose = "intro " * 270  # 1,620 characters
    code = "```python\n" + "print('hi')\n" * 50 + "```"  # 610 characters
    parts = split_message(prose.strip() + "\n\n" + code + "\n\nafter")
    assert len(parts) == 2 and parts[0].startswith("intro") and parts[1].startswith("```python")
    assert parts[1].endswith("after") and all(fences(p) == 2 for p in parts[1:])


def test_a_code_block_split_in_two_is_closed_and_reopened_with_its_language() -> None:
    code = "```rust\n" + "\n".join(f"let x{i} = {i};" for i in range(400)) + "\n```"
    parts = split_message("Here:\n" + code + "\nDone.")
    assert len(parts) >= 3 and all(len(p) <= 2000 for p in parts)
    assert all(fences(p) % 2 == 0 for p in parts)
    assert all(p.startswith("```rust\n") for p in parts[1:])
    assert all(p.endswith("\n```") for p in parts[:-1])
    assert parts[-1].endswith("Done.")
    assert squeeze("".join(parts)).replace("rust", "") == squeeze("Here:\n" + code + "\nDone.").replace("rust", "")


def test_a_ten_thousand_character_reply() -> None:
    text = "\n".join(f"Line {i}: " + "lorem ipsum dolor sit amet " * 3 for i in range(110))
    assert len(text) > 10_000
    parts = split_message(text)
    assert 6 <= len(parts) <= 7 and all(len(p) <= 2000 for p in parts)
    assert all(p.startswith("Line ") for p in parts)  # cut at line ends, not mid-line
    assert "\n".join(parts) == text.strip()


def test_text_without_spaces_is_cut_hard_and_loses_nothing() -> None:
    text = "a" * 5000
    parts = split_message(text)
    assert all(len(p) <= 2000 for p in parts) and "".join(parts) == text


def test_long_words_are_not_cut_when_a_space_is_near() -> None:
    parts = split_message(("supercalifragilistic " * 300).strip())
    assert all(p.endswith("supercalifragilistic") for p in parts)


def test_an_unclosed_fence_is_closed_and_inline_fences_change_nothing() -> None:
    assert split_message("```py\nprint(1)") == ["```py\nprint(1)\n```"]
    assert split_message("use ```x``` inline") == ["use ```x``` inline"]
    text = ("see ```a``` and\n" * 200).strip()
    assert all(fences(p) == 0 for p in split_message(text))


def test_a_custom_limit_such_as_an_embed_description() -> None:
    parts = split_message("word " * 2000, limit=4096)
    assert len(parts) == 3 and all(len(p) <= 4096 for p in parts)


blocks = st.one_of(
    st.text(alphabet="abc ", min_size=1, max_size=300),
    st.builds(lambda body: "```\n" + body + "\n```", st.text(alphabet="xyz \n", max_size=2500)),
    st.just(""),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(blocks, max_size=12), st.sampled_from([200, 500, 2000]))
def test_every_part_fits_balances_its_fences_and_nothing_is_lost(chunks: list[str], limit: int) -> None:
    text = "\n".join(chunks)
    parts = split_message(text, limit)
    assert all(len(p) <= limit for p in parts)
    assert all(fences(p) % 2 == 0 for p in parts)
    assert squeeze("".join(parts)) == squeeze(text)
