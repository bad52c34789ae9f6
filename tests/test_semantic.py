"""Semantic search on the real embedder (all-MiniLM-L6-v2 from its PyPI package, written as a
GGUF once per session) and the real databases: what it finds that lexical search misses, the
background re-embedding after a change of embedder, and erasure of message vectors."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from bot.app import Quill
from bot.config import Settings
from bot.embedder import MINILM_GGUF, Embedder, build_minilm_gguf
from bot.engine.local import LocalEngine
from plugins.qa import NOTHING_FOUND
from tests.test_qa import request, say

FAQ = (Path(__file__).parent.parent / "bench" / "sets" / "retrieval" / "faq-en.md").read_text(encoding="utf-8")
PARAPHRASE = "May I spend a month working remotely from Spain?"  # shares no content word with its answer
DEADLINE = 120.0


@pytest.fixture(scope="session")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_minilm_gguf(tmp_path_factory.mktemp("embedder") / MINILM_GGUF)


@pytest.fixture
async def semantic_app(settings: Settings, engine: LocalEngine, minilm: Path) -> AsyncIterator[Quill]:
    settings.embeddings, settings.embedding_model_path = True, minilm
    quill = await Quill.start(settings, engine=engine)
    yield quill
    await quill.close(close_engine=False)


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait for the background embedder, with a generous deadline."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while not await condition():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def count(app: Quill, sql: str) -> Callable[[], Awaitable[int]]:
    async def run() -> int:
        def query() -> int:
            with app.memory.engine.connect() as conn:
                return conn.execute(text(sql)).scalar_one()

        return await asyncio.to_thread(query)

    return run


async def all_embedded(app: Quill, model: str = "") -> bool:
    chunks = await count(app, "SELECT COUNT(*) FROM knowledge_chunk")()
    users = await count(app, "SELECT COUNT(*) FROM message WHERE role = 'user'")()
    where = f" WHERE model LIKE '{model}%'" if model else ""
    vectors = await count(app, f"SELECT COUNT(*) FROM chunk_vector{where}")()
    vectors += await count(app, f"SELECT COUNT(*) FROM message_vector{where}")()
    return vectors == chunks + users


async def test_a_paraphrase_is_found_only_with_embeddings(app: Quill, semantic_app: Quill) -> None:
    """`app` and `semantic_app` share one database; only the second has an embedder."""
    assert app.context.semantic is None and semantic_app.context.semantic is not None
    await say(semantic_app, f"/kb-add name:faq {FAQ}")
    assert await say(app, f"/ask {PARAPHRASE}") == NOTHING_FOUND  # lexical: no shared word
    await until(lambda: all_embedded(semantic_app), "the passages' vectors")
    floor = semantic_app.settings.qa_min_relevance
    hits = await semantic_app.context.search.search(PARAPHRASE, "discord", "g1", "help", 4, min_relevance=floor)
    assert hits and hits[0].heading == "Can I work from another country?"
    # Off-topic stays off-topic with embeddings on, and MiniLM (English only) leaves Chinese lexical.
    assert (
        await semantic_app.context.search.search(
            "What is the capital of Australia?", "discord", "g1", "help", 4, min_relevance=floor
        )
        == []
    )
    assert (
        await semantic_app.context.search.search(
            "我可以去西班牙远程工作一个月吗？", "discord", "g1", "help", 4, min_relevance=floor
        )
        == []
    )


async def test_a_new_embedder_re_embeds_everything_in_the_background(
    settings: Settings, engine: LocalEngine, minilm: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings.embeddings, settings.embedding_model_path = True, minilm
    first = await Quill.start(settings, engine=engine)
    await say(first, f"/kb-add name:faq {FAQ}")
    await until(lambda: all_embedded(first, MINILM_GGUF), "the first embedder")
    await first.close(close_engine=False)
    other = tmp_path / "team-embedder.gguf"  # another file: another embedder for the vectors' record
    shutil.copy(minilm, other)
    settings.embedding_model_path = other
    caplog.set_level(logging.INFO, logger="bot.search")
    second = await Quill.start(settings, engine=engine)
    try:
        await until(lambda: all_embedded(second, "team-embedder.gguf"), "re-embedding")
        assert any(
            "embedding with team-embedder.gguf" in r.getMessage() and "to go" in r.getMessage() for r in caplog.records
        )
        floor = settings.qa_min_relevance
        (best, *_) = await second.context.search.search(PARAPHRASE, "discord", "g1", "help", 4, min_relevance=floor)
        assert best.heading == "Can I work from another country?"
    finally:
        await second.close(close_engine=False)


async def test_forget_me_also_erases_the_vectors_of_my_messages(semantic_app: Quill) -> None:
    conv = await semantic_app.memory.conversation("discord", "g1", "help")
    mine = await semantic_app.memory.add_message(conv.id, role="user", content="My VPN key expired.", author_id="u1")
    theirs = await semantic_app.memory.add_message(
        conv.id, role="user", content="The printer is jammed.", author_id="u2"
    )
    await until(lambda: all_embedded(semantic_app), "the messages' vectors")
    reply = await semantic_app.router.handle(request("/forget me", author_id="u1"))
    assert "Erased everything stored about you" in reply.text
    ids = count(semantic_app, "SELECT COUNT(*) FROM message_vector WHERE message_id = " + str(mine.id))
    assert await ids() == 0
    assert await count(semantic_app, f"SELECT COUNT(*) FROM message_vector WHERE message_id = {theirs.id}")() == 1


async def test_a_bad_embedder_file_fails_start_up_with_one_clear_message(
    settings: Settings, engine: LocalEngine, tmp_path: Path
) -> None:
    from bot.engine import ModelLoadError

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a model")
    settings.embeddings = True
    for path, says in ((tmp_path / "missing.gguf", "is not a file"), (garbage, "cannot load the embedder")):
        settings.embedding_model_path = path
        with pytest.raises(ModelLoadError, match=says):
            await Quill.start(settings, engine=engine)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc (Linux)")
async def test_the_gguf_embedder_computes_in_its_one_thread(minilm: Path) -> None:
    """llama.cpp's OpenMP threads started from a second thread of the process, beside the chat
    engine's, made the chat model decode 2.4x slower from the first embedding on (libgomp then
    counts more threads than cores and cuts every team's spin-waits short)."""
    embedder = Embedder(minilm)
    await embedder.start()
    try:
        before = len(list(Path("/proc/self/task").iterdir()))
        vectors = await embedder.embed(["The release is on Thursday.", "发布在周四。"] * 8)
        assert vectors.shape == (16, embedder.dim)
        assert len(list(Path("/proc/self/task").iterdir())) == before
    finally:
        embedder.close()
