"""Q&A with sources: the knowledge base and past messages, searched in the real database."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path

from sqlalchemy import text

from bot.api import Place, Request, Section
from bot.app import Quill
from bot.i18n import gettext_in
from bot.search import split_passages
from bot.textindex import query_terms
from plugins.qa import NOTHING_FOUND, QaSettings, fit_sources
from tests.test_router import read

GUIDE = """# Deploying

Staging deploys run from the orange pipeline button in Jenkins.

Production deploys need two approvals and happen on Tuesdays only."""


ML_NOTES = (Path(__file__).parent.parent / "bench" / "sets" / "retrieval" / "机器学习笔记.md").read_text(
    encoding="utf-8"
)


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
    await store_message(app, "random", "To deploy to staging, connect the VPN first.", "771")
    await store_message(app, "random", "Lunch is at noon.", "772")
    answer = await say(app, "/ask how do I deploy to staging?")
    body, _, sources = answer.partition("\n\nSources:\n")
    assert sources.splitlines() == [  # document, section and quote; a message keeps its jump link
        "[1] document “deploy-guide” › Deploying: “Staging deploys run from the orange pipeline button in Jenkins.”",
        f"[2] Ada on {_today()}, https://discord.com/channels/g1/random/771: "
        "“To deploy to staging, connect the VPN first.”",
    ]
    # The answer is a conversation turn; the sources list is shown, not stored.
    conv = await app.memory.conversation("discord", "g1", "help")
    stored = await app.memory.history(conv.id, 10_000)
    assert [m.role for m in stored] == ["user", "assistant"]
    assert stored[0].content == "how do I deploy to staging?"
    assert stored[1].content == body.strip()


async def test_off_topic_gets_nothing_found_without_asking_the_model(app: Quill) -> None:
    await say(app, f"/kb-add name:deploy-guide {GUIDE}")
    await say(app, f"/kb-add name:ml {ML_NOTES}")
    await say(app, "/kb-add name:rnn Long Short-Term Memory networks keep a cell state across long sequences.")
    # Each shares a word with the documents ("long", "网络"), which used to count as found.
    for question in ("How long is the lunch break?", "what is the airspeed of a swallow?"):
        assert await say(app, f"/ask {question}") == NOTHING_FOUND, question
    # A Chinese question gets quill's Chinese sentence (issue #22).
    assert await say(app, "/ask 附近有什么网络游戏？") == gettext_in("zh-CN", NOTHING_FOUND)
    conv = await app.memory.conversation("discord", "g1", "help")
    assert await app.memory.history(conv.id, 10_000) == []  # converse never ran: no turn stored
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


def test_passages_keep_each_heading_with_its_text_and_know_their_section() -> None:
    body = (
        "# Guide\n\nIntro.\n\n## Setup\n\n"
        + "Install the tools. " * 40
        + "\n\n## Deploy\n\n### Staging\n\nPress the button."
    )
    passages = split_passages(body, max_chars=300)
    for p in passages:
        last = p.text.rstrip().split("\n")[-1]
        assert not last.startswith("#"), p.text  # no passage ends on a heading cut off from its text
    assert passages[0].heading == "Guide"
    assert {p.heading for p in passages if "Install" in p.text} == {"Setup"}
    assert passages[-1].heading == "Staging" and passages[-1].text.startswith("## Deploy\n\n### Staging")
    assert sum(p.text.count("Install") for p in passages) == 40  # nothing lost


async def test_a_chinese_question_finds_its_chinese_passage(app: Quill) -> None:
    assert "Added “ml”" in await say(app, f"/kb-add name:ml {ML_NOTES}")
    search = app.context.search
    hits = await search.search("什么是长短期记忆网络的遗忘门？", "discord", "g1", "help", 4, min_relevance=0.4)
    (gate,) = [h for h in hits if h.heading == "遗忘门（Forget Gate）"]
    assert gate.quote.startswith("遗忘门读取上一时刻的隐藏状态")  # a sentence of its text, not the heading
    # A Latin word run into Chinese text ("Adam优化器") is a term of its own.
    (best, *_) = await search.search("adam的默认学习率", "discord", "g1", "help", 4, min_relevance=0.4)
    assert best.heading == "Adam优化器"
    await store_message(app, "random", "部署脚本在运维仓库里，发布前先跑测试。", "m-9")
    hits = await search.search("部署脚本放在哪里？", "discord", "g1", "help", 4, min_relevance=0.4)
    assert [h.message_id for h in hits if h.kind == "message"] == ["m-9"]


async def digest_sections(app: Quill, place: Place, since: datetime) -> list[Section]:
    return [r.value for r in await app.hooks.call("digest_sections", place=place, since=since) if r.value]


async def test_the_digest_lists_documents_added_since_the_last_one(app: Quill) -> None:
    before = _now()
    await say(app, f"/kb-add name:deploy-guide {GUIDE}")
    sections = await digest_sections(app, Place("discord", "g1", "help"), before)
    (kb,) = [s for s in sections if s.title == "New in the knowledge base"]
    assert kb.body == f"- deploy-guide (1 passage), {_today()}"
    later = await digest_sections(app, Place("discord", "g1", "help"), _now())
    assert not [s for s in later if s.title == "New in the knowledge base"]


def _now():  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    return datetime.now(UTC)


def test_upgrade_reindexes_existing_documents_and_messages_in_place(db_url: str) -> None:
    """A database made before migration 0004 (unsegmented indexes) keeps every document and
    message, and its Chinese text becomes findable."""
    from bot.memory import make_db_engine, upgrade_schema
    from bot.search import Search

    engine = make_db_engine(db_url)
    upgrade_schema(engine, "0003_finetune")
    old_passages = [
        "# 手册\n\n## 遗忘门（Forget Gate）\n\n遗忘门决定丢弃哪些旧信息。",
        "## 发布\n\n正式环境只在周二发布。",
    ]
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO conversation (transport, guild_id, channel_id, created_at) "
                "VALUES ('discord', 'g1', 'c1', CURRENT_TIMESTAMP)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO message (conversation_id, external_id, author_id, author_name, role, content, "
                "token_count, created_at) VALUES (1, 'm1', 'u1', 'Ada', 'user', "
                "'部署脚本在运维仓库里', 3, CURRENT_TIMESTAMP)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO knowledge_doc (transport, guild_id, channel_id, name, added_by, created_at) "
                "VALUES ('discord', 'g1', '', 'notes', 'u1', CURRENT_TIMESTAMP)"
            )
        )
        for i, passage in enumerate(old_passages):
            conn.execute(
                text("INSERT INTO knowledge_chunk (doc_id, position, content) VALUES (1, :p, :c)"),
                {"p": i, "c": passage},
            )
    upgrade_schema(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM message")).scalar_one() == 1
        rows = conn.execute(text("SELECT content, heading FROM knowledge_chunk ORDER BY position")).all()
    assert "\n\n".join(r.content for r in rows) == "\n\n".join(old_passages)
    assert [r.heading for r in rows] == ["遗忘门（Forget Gate）", "发布"]
    search = Search(engine)
    (hit,) = asyncio.run(search.search("什么是遗忘门？", "discord", "g1", "c1", 4, min_relevance=0.4))
    assert hit.name == "notes" and hit.heading == "遗忘门（Forget Gate）"
    (hit,) = asyncio.run(search.search("部署脚本放在哪里？", "discord", "g1", "c1", 4, min_relevance=0.4))
    assert hit.message_id == "m1"
    engine.dispose()


ONBOARDING = """# Onboarding

## Laptops

Every newcomer gets a laptop on the first morning; IT sets up disk encryption and the VPN before lunch.

## Badges

Badges for the zebrafish lab are printed at the front desk.

## 门禁

新员工的门禁卡在第一周内由前台发放，丢失后请立即报告安全部门。"""


async def test_passages_beside_a_hit_join_its_source_when_they_fit(app: Quill) -> None:
    await say(app, f"/kb-add name:onboarding {ONBOARDING}")
    search, settings = app.context.search, app.context.config(QaSettings)
    hits = await search.search("Where are zebrafish lab badges printed?", "discord", "g1", "help", 4, min_relevance=0.4)
    assert [h.heading for h in hits] == ["Badges"]
    ((before, after),) = await search.neighbours(hits)
    assert "laptop" in before and "门禁卡" in after
    hit, laptops, door = [await app.engine.count_tokens(t) for t in (hits[0].text, before, after)]
    settings.source_tokens = hit + laptops + door  # room for both: in document order
    assert await fit_sources(app.context, hits) == [f"{before}\n\n{hits[0].text}\n\n{after}"]
    settings.source_tokens = hit + laptops + door - 1  # the one after no longer fits
    assert await fit_sources(app.context, hits) == [f"{before}\n\n{hits[0].text}"]
    settings.source_tokens = hit + min(laptops, door) - 1  # neither fits: the hit alone
    assert await fit_sources(app.context, hits) == [hits[0].text]
    settings.source_tokens = 4096  # context for the model, not another citation
    _, _, sources = (await say(app, "/ask Where are zebrafish lab badges printed?")).partition("\n\nSources:\n")
    assert sources.splitlines() == [
        "[1] document “onboarding” › Badges: “Badges for the zebrafish lab are printed at the front desk.”"
    ]


async def test_a_past_question_is_no_source(app: Quill) -> None:
    """Earlier questions (an /ask, a colleague asking the same) share the words of the new one
    but answer nothing: only what tells is cited, in English and Chinese alike."""
    await store_message(app, "random", "How do I get a new VPN key?", "781")
    await store_message(app, "random", "怎么申请新的VPN密钥？", "782")
    await store_message(app, "random", "The VPN key rotates every ninety days; the IT desk issues new ones.", "783")
    await store_message(app, "random", "新的VPN密钥每九十天更换一次，向IT服务台申请。", "784")
    for question, answer, heading in (
        ("How do I get a new VPN key?", "783", "Sources:"),
        ("怎么申请新的VPN密钥？", "784", "来源："),
    ):
        sources = (await say(app, f"/ask {question}")).partition(f"\n\n{heading}\n")[2]
        assert answer in sources and "781" not in sources and "782" not in sources, sources


async def test_the_askers_own_message_is_no_source_when_the_model_words_the_question(app: Quill) -> None:
    """A chat message that makes the model call /ask is stored first, and the model's question
    may be worded otherwise: the asker's message is known by its id, never cited to them."""
    await store_message(app, "random", "Tell me where the zebrafish lab prints its badges", "790")
    await store_message(app, "random", "Zebrafish lab badges are printed at the front desk.", "791")
    await store_message(app, "random", "告诉我斑马鱼实验室的工牌在哪里打印", "792")
    await store_message(app, "random", "斑马鱼实验室的工牌在前台打印。", "793")
    for said, asked, answer, heading in (
        ("790", "zebrafish lab badges printed", "791", "Sources:"),
        ("792", "斑马鱼实验室工牌打印", "793", "来源："),
    ):
        reply = await say(app, f"/ask {asked}", channel_id="random", message_id=said, tool_call=True)
        sources = reply.partition(f"\n\n{heading}\n")[2]
        assert answer in sources and said not in sources, reply
