"""Translator: protected pieces come back byte for byte, languages resolve, auto mode per channel."""

from __future__ import annotations

from lingua import Language

from bot.api import Request
from bot.app import Quill
from plugins.translate import resolve_language, split_segments

CODE = "```python\nprint('keep me')  # ne pas traduire\n```"
MESSAGE = (
    f"Bonjour <@123456>, lisez https://example.com/docs?x=1 puis lancez `make test` 🎉\n{CODE}\n"
    "Merci **beaucoup** pour votre aide :thumbsup:"
)
PROTECTED = [CODE, "<@123456>", "https://example.com/docs?x=1", "`make test`", "🎉", "**", ":thumbsup:"]


def request(text: str, **fields: object) -> Request:
    values: dict[str, object] = {
        "transport": "discord",
        "guild_id": "g1",
        "channel_id": "c1",
        "author_id": "u1",
    }
    values.update(fields)
    return Request(text=text, **values)  # type: ignore[arg-type]


def test_segments_rebuild_the_text_and_protect_every_special_piece() -> None:
    segments = split_segments(MESSAGE)
    assert "".join(text for _, text in segments) == MESSAGE
    protected = [text for translatable, text in segments if not translatable]
    for piece in PROTECTED:
        assert piece in protected
    assert all("Bonjour" not in p and "Merci" not in p for p in protected)
    link = split_segments("see [the docs](https://x.org/a_b) and snake_case_name")
    assert [t for ok, t in link if not ok] == ["[", "](https://x.org/a_b)"]
    assert "".join(t for _, t in link) == "see [the docs](https://x.org/a_b) and snake_case_name"


def test_languages_resolve_by_name_or_code() -> None:
    assert resolve_language("fr") == Language.FRENCH
    assert resolve_language("German") == Language.GERMAN
    assert resolve_language("spa") == Language.SPANISH
    assert resolve_language("klingon") is None
    # Names in Chinese and each language's own name, as people type them.
    assert resolve_language("中文") == resolve_language("繁體中文") == resolve_language("汉语") == Language.CHINESE
    assert resolve_language("英文") == resolve_language("英语") == Language.ENGLISH
    assert resolve_language("日本語") == resolve_language("日语") == Language.JAPANESE
    assert resolve_language("français") == resolve_language("法文") == Language.FRENCH


async def test_autotranslate_and_translate_take_a_language_named_in_chinese(app: Quill) -> None:
    on = await app.router.handle(request("/autotranslate 中文", is_admin=True))
    assert not on.failed and on.text == "此频道中不是中文的消息将被翻译成中文。"
    assert await app.memory.get_settings("g1", "c1", "translate") == {"translate.auto": "ZH"}
    english = await app.router.handle(request("/autotranslate 英文", is_admin=True, channel_id="c2"))
    assert await app.memory.get_settings("g1", "c2", "translate") == {"translate.auto": "EN"}
    assert english.text == "此频道中不是英语的消息将被翻译成英语。"  # asked in Chinese: said in Chinese
    same = await app.router.handle(request("/translate to:中文 这句话本来就是用中文写的，不需要翻译。"))
    assert same.text == "这已经是中文了。"
    same = await app.router.handle(request("/translate to:English This sentence is already written in English."))
    assert same.text == "That is already in English."


async def test_translation_keeps_code_urls_mentions_emoji_and_markdown(app: Quill) -> None:
    reply = await app.router.handle(request(f"/translate to:en {MESSAGE}"))
    assert not reply.failed, reply.text
    for piece in PROTECTED:
        assert piece in reply.text
    assert reply.text.count(CODE) == 1 and reply.text.endswith("_(French → English)_")


async def test_unknown_language_and_usage_errors(app: Quill) -> None:
    unknown = await app.router.handle(request("/translate to:klingon Hello"))
    assert unknown.failed and "klingon" in unknown.text and "fr (French)" in unknown.text
    missing = await app.router.handle(request("/translate Hello"))
    assert missing.failed and "/translate needs to" in missing.text
    only_code = await app.router.handle(request("/translate to:fr `x = 1` https://example.com"))
    assert only_code.failed and "Nothing to translate" in only_code.text
    same = await app.router.handle(request("/translate to:en This sentence is already written in English."))
    assert same.text == "That is already in English."


async def test_auto_translate_is_off_by_default_and_per_channel(app: Quill) -> None:
    french = "Bonjour à tous, la réunion est reportée à demain matin."
    assert await app.router.observe(request(french)) == []
    refused = await app.router.handle(request("/autotranslate en"))
    assert refused.failed and "admins only" in refused.text
    on = await app.router.handle(request("/autotranslate english", is_admin=True))
    assert "translated into" in on.text
    assert await app.memory.get_settings("g1", "c1", "translate") == {"translate.auto": "EN"}
    (posted,) = await app.router.observe(request(french, author_name="Ada"))
    assert posted.text.startswith("Ada (French → English): ") and posted.channel_id is None
    assert await app.router.observe(request("The meeting moved to tomorrow morning, everyone.")) == []
    assert await app.router.observe(request("ok 👍")) == []  # too short to tell its language
    assert await app.router.observe(request(french, channel_id="other")) == []
    await app.router.handle(request("/autotranslate off", is_admin=True))
    assert await app.router.observe(request(french)) == []
