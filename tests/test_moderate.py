"""Moderation: terms and model labels flag messages; reports go to the mod channel; no deletion
unless an admin enabled it; a broken moderation config fails alone."""

from __future__ import annotations

from bot.api import Request
from bot.app import Quill
from plugins.moderate import LABELS, ModerationSettings, classify, matched_terms


def request(text: str, **fields: object) -> Request:
    values: dict[str, object] = {
        "transport": "discord",
        "guild_id": "g1",
        "channel_id": "general",
        "author_id": "u7",
        "author_name": "Mallory",
        "message_id": "m42",
    }
    values.update(fields)
    return Request(text=text, **values)  # type: ignore[arg-type]


async def admin(app: Quill, text: str) -> str:
    reply = await app.router.handle(request(text, is_admin=True))
    assert not reply.failed, reply.text
    return reply.text


def test_terms_match_whole_words_in_any_case_and_form() -> None:
    terms = ["secret project", "badword"]
    assert matched_terms("The SECRET   project leaks", terms) == []  # spacing differs: not the term
    full_width_bad = "\uff22\uff21\uff24"
    assert matched_terms(f"the Secret Project is out; {full_width_bad}word!", terms) == terms
    assert matched_terms("badwords and notbadword", terms) == []


async def test_a_flagged_message_is_reported_to_the_mod_channel(app: Quill) -> None:
    app.context.config(ModerationSettings).terms = ["badword"]
    assert await app.router.observe(request("hello everyone")) == []
    assert await app.router.observe(request("this BADWORD again")) == []  # no mod channel yet: logged only
    await admin(app, "/moderation channel <#mods>")
    (report,) = await app.router.observe(request("this BADWORD again"))
    assert report.channel_id == "mods" and not report.delete_original
    assert report.text.startswith("Flagged: message m42 by Mallory in <#general>: term “badword”")
    assert report.text.endswith("> this BADWORD again")
    assert await app.router.observe(request("badword in the mod channel", channel_id="mods")) == []


async def test_guild_terms_and_deletion_are_per_guild_and_admin_only(app: Quill) -> None:
    refused = await app.router.handle(request("/moderation add phoenix"))
    assert refused.failed and "admins only" in refused.text
    await admin(app, "/moderation add phoenix")
    await admin(app, "/moderation channel here")
    assert "Terms: phoenix" in await admin(app, "/moderation")
    (report,) = await app.router.observe(request("project Phoenix ships", channel_id="dev"))
    assert report.channel_id == "general" and "term “phoenix”" in report.text and not report.delete_original
    assert await app.router.observe(request("project Phoenix ships", guild_id="g2")) == []
    await admin(app, "/moderation delete on")
    (report,) = await app.router.observe(request("phoenix again", channel_id="dev"))
    assert report.delete_original and "(deleted)" in report.text
    await admin(app, "/moderation remove phoenix")
    assert await app.router.observe(request("phoenix again", channel_id="dev")) == []
    bad = await app.router.handle(request("/moderation classify maybe", is_admin=True))
    assert bad.failed and "Usage: /moderation" in bad.text


async def test_model_classification_is_one_of_the_grammar_labels(app: Quill) -> None:
    assert await classify(app.context, "BUY CHEAP WATCHES at http://spam.example !!!") in LABELS
    await admin(app, "/moderation channel mods")
    await admin(app, "/moderation classify on")
    reports = await app.router.observe(request("you are all idiots and I hate you"))
    assert all(r.channel_id == "mods" and "model: " in r.text for r in reports)


async def test_a_broken_moderation_config_does_not_stop_other_plugins(app: Quill) -> None:
    await app.memory.set_settings("g1", "", {"moderate.terms": "not a list"})  # e.g. edited by hand
    await admin(app, "/autotranslate en")
    (posted,) = await app.router.observe(request("Bonjour à tous, la réunion est reportée à demain matin."))
    assert posted.text.startswith("Mallory (French → English): ")
    assert not (await app.router.handle(request("/kb-list"))).failed


async def test_each_flagged_message_is_stored_as_a_report_chinese_and_english(app: Quill) -> None:
    app.context.config(ModerationSettings).terms = ["badword", "机密"]
    await admin(app, "/moderation channel mods")
    await admin(app, "/moderation delete on")
    assert await app.router.observe(request("hello everyone")) == []
    await app.router.observe(request("这份文件是机密，不要外传", message_id="m1"))
    await app.router.observe(request("this BADWORD again", message_id="m2", author_id="u8", author_name=""))
    newest, oldest = await app.memory.reports("discord", "g1", 10)
    assert (newest.message_id, newest.author_id, newest.excerpt) == ("m2", "u8", "this BADWORD again")
    assert newest.reasons == "term “badword”" and newest.deleted and newest.channel_id == "general"
    # The reasons as the report said them, in the message's language.
    assert (oldest.message_id, oldest.author_name, oldest.reasons) == ("m1", "Mallory", "词语“机密”")
    assert await app.memory.reports("discord", "g2", 10) == []


def test_chinese_terms_match_inside_unspaced_chinese_text() -> None:
    text = "这份文件是机密，不要外传 (top SECRET)"
    assert matched_terms(text, ["机密", "外传", "secret", "秘密", "cret"]) == ["机密", "外传", "secret"]
    assert matched_terms("机密文件", ["机密x"]) == []
