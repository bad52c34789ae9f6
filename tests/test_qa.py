"""Q&A with sources: the knowledge base and past messages, searched in the real database."""

from __future__ import annotations

from sqlalchemy import text

from bot.api import Request
from bot.app import Quill
from bot.search import split_passages
from bot.textindex import query_terms
from plugins.qa import NOTHING_FOUND
from tests.test_router import read

GUIDE = """# Deploying

Staging deploys run from the orange pipeline button in Jenkins.

Production deploys need two approvals and happen on Tuesdays only."""


def request(text: str, **fields: object) -> Request:
    values: dict[str, object] = {
        "transport": "discord",
        "guild_id": "g1",
        "channel_id": "help",
        "author_id": "u1",
        "author_name": "Bea",
        "text": text,
        "is_admin": True,
    }
    values.update(fields)
    return Request(**values)  # type: ignore[arg-type]


async def say(app: Quill, text: str, **fields: object) -> str:
    return await read(await app.router.handle(request(text, **fields)))


async def store_message(app: Quill, channel: str, text: str, message_id: str, guild: str = "g1") -> None:
    conv = await app.memory.conversation("discord", guild, channel)
    await app.memory.add_message(
        conv.id, role="user", content=text, author_id="u9", author_name="Ada", external_id=message_id
    )


def test_query_terms_stem_segment_chinese_and_drop_stop_words_per_language() -> None:
    assert query_terms("How do I deploy to STAGING? deploys!") == ["deploy", "stage"]
    assert query_terms("what is it?") == query_terms("这是什么？") == []
    assert query_terms("什么是遗忘门？") == ["遗忘", "门"]
    assert query_terms("Adam优化器") == ["adam", "优化", "器"]  # a Latin word run into Chinese is split off


def test_passages_are_cut_at_boundaries_and_keep_everything() -> None:
    body = "\n\n".join(f"Paragraph {i} " + "word " * 60 for i in range(20))
    passages = [p.text for p in split_passages(body, max_chars=500)]
    assert all(len(p) <= 500 for p in passages)
    assert " ".join(" ".join(passages).split()) == " ".join(body.split())
    assert all(p.startswith("Paragraph") for p in passages)


async def test_a_document_may_be_far_longer_than_a_message(app: Quill) -> None:
    app.settings.max_input_chars, app.settings.max_document_chars = 1_000, 30_000
    long_doc = "\n\n".join(f"Section {i}: the deploy runbook step {i} uses the staging cluster." for i in range(300))
    assert 1_000 < len(long_doc) < 30_000
    added = await say(app, f"/kb-add name:runbook {long_doc}")
    assert "Added “runbook”" in added
    chat = await app.router.handle(request(long_doc))
    assert chat.failed and "QUILL_MAX_INPUT_CHARS" in chat.text
    too_long = await app.router.handle(request("/kb-add name:huge " + "x" * 30_001))
    assert too_long.failed and "QUILL_MAX_DOCUMENT_CHARS" in too_long.text


async def test_kb_add_list_remove_and_admin_only(app: Quill) -> None:
    assert "Added “deploy guide”" in await say(app, f'/kb-add name:"deploy guide" {GUIDE}')
    assert "deploy guide (1 passage)" in await say(app, "/kb-list", is_admin=False)
    refused = await app.router.handle(request("/kb-remove deploy guide", is_admin=False))
    assert refused.failed and "admins only" in refused.text
    assert "/kb-add needs name" in await say(app, "/kb-add no name given")
    assert "Usage: /kb-add" in await say(app, "/kb-add name:empty")
    assert "no document named “nope”" in await say(app, "/kb-remove nope")
    assert "Removed" in await say(app, "/kb-remove deploy guide")
    assert "empty" in await say(app, "/kb-list")
    assert await app.context.search.search("staging jenkins", "discord", "g1", "help", 5) == []


async def test_answer_cites_documents_and_messages_from_the_store(app: Quill) -> None:
    await say(app, f"/kb-add name:deploy-guide {GUIDE}")
    await store_message(app, "random", "The staging VPN password rotates every Monday.", "m-771")
    await store_message(app, "random", "Lunch is at noon.", "m-772")
    answer = await say(app, "/ask how do I deploy to staging?")
    body, _, sources = answer.partition("\n\nSources:\n")
    assert sources.splitlines() == [
        "[1] document “deploy-guide”",
        f"[2] Ada on {_today()}, https://discord.com/channels/g1/random/m-771",
    ]
    # The answer is a conversation turn; the sources list is shown, not stored.
    conv = await app.memory.conversation("discord", "g1", "help")
    stored = await app.memory.history(conv.id, 10_000)
    assert [m.role for m in stored] == ["user", "assistant"]
    assert stored[0].content == "how do I deploy to staging?"
    assert stored[1].content == body.strip()


async def test_nothing_found_says_so_without_asking_the_model(app: Quill) -> None:
    await say(app, f"/kb-add name:deploy-guide {GUIDE}")
    assert await say(app, "/ask what is the airspeed of a swallow?") == NOTHING_FOUND
    conv = await app.memory.conversation("discord", "g1", "help")
    assert await app.memory.history(conv.id, 10_000) == []
    usage = await app.router.handle(request("/ask"))
    assert usage.failed and "Usage: /ask" in usage.text


async def test_private_places_do_not_see_each_others_messages(app: Quill) -> None:
    await store_message(app, "dm-alice", "my payroll number is 4411", "d1", guild="")
    search = app.context.search
    assert await search.search("payroll number", "discord", "", "dm-bob", 5) == []
    assert await search.search("payroll number", "discord", "g1", "help", 5) == []
    (hit,) = await search.search("payroll number", "discord", "", "dm-alice", 5)
    assert hit.message_id == "d1" and hit.author == "Ada"


async def test_a_document_added_again_replaces_the_old_text(app: Quill) -> None:
    await say(app, f"/kb-add name:guide {GUIDE}")
    await say(app, "/kb-add name:guide Releases are cut by the release captain.")
    search = app.context.search
    assert await search.search("jenkins", "discord", "g1", "help", 5) == []
    (hit,) = await search.search("release captain", "discord", "g1", "help", 5)
    assert hit.name == "guide"


async def test_a_broken_search_fails_alone(app: Quill) -> None:
    with app.memory.engine.begin() as conn:
        conn.execute(text("DROP TABLE knowledge_chunk CASCADE" if _pg(app) else "DROP TABLE knowledge_chunk"))
    broken = await app.router.handle(request("/ask how do I deploy to staging?"))
    assert broken.failed
    chat = await app.router.handle(request("/chat hello"))
    assert not chat.failed and (await read(chat)).strip()


def _pg(app: Quill) -> bool:
    return app.memory.engine.dialect.name == "postgresql"


def _today() -> str:
    from datetime import UTC, datetime

    return f"{datetime.now(UTC):%Y-%m-%d}"
