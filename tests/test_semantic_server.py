"""Semantic search through the inference server's /v1/embeddings (QUILL_EMBEDDINGS=server):
llama-cpp-python's real server with two models, the chat model and all-MiniLM-L6-v2 with
`embedding` on, on the real databases."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bot.app import Quill
from bot.config import Settings, embedded_model_path
from bot.engine import ModelLoadError
from tests.openai_servers import LlamaCppServer
from tests.test_qa import say
from tests.test_semantic import FAQ, PARAPHRASE, all_embedded, minilm, until

__all__ = ["minilm"]  # the session fixture, used here by name


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> Iterator[LlamaCppServer]:
    models = [
        {"model": str(embedded_model_path()), "model_alias": "smollm", "n_ctx": 2048},
        {"model": str(minilm), "model_alias": "minilm", "embedding": True, "n_ctx": 512},
    ]
    srv = LlamaCppServer(tmp_path_factory.mktemp("llama-server") / "server.log", models=models)
    srv.start()
    yield srv
    srv.kill()


def served(settings: Settings, server: LlamaCppServer, embedding_model: str) -> Settings:
    settings.engine_backend, settings.embeddings = "openai", "server"
    settings.openai_base_url, settings.openai_model = server.url, "smollm"
    settings.openai_embedding_model, settings.openai_max_retries = embedding_model, 0
    return settings


@pytest.fixture
async def server_app(settings: Settings, server: LlamaCppServer) -> AsyncIterator[Quill]:
    quill = await Quill.start(served(settings, server, "minilm"))
    yield quill
    await quill.close()


async def test_the_server_embeds_and_a_failing_server_leaves_search_lexical(
    server_app: Quill, server: LlamaCppServer, caplog: pytest.LogCaptureFixture
) -> None:
    await say(server_app, f"/kb-add name:faq {FAQ}")
    maker = f"{server.url}:minilm"  # the vectors record the server and its model
    await until(lambda: all_embedded(server_app, maker), "the server's vectors")
    floor = server_app.settings.qa_min_relevance
    search = server_app.context.search
    hits = await search.search(PARAPHRASE, "discord", "g1", "help", 4, min_relevance=floor)
    assert hits and hits[0].heading == "Can I work from another country?"
    off_topic = "What is the capital of Australia?"
    assert await search.search(off_topic, "discord", "g1", "help", 4, min_relevance=floor) == []
    server.kill()  # the server goes away: searches go on, lexical only, and say why in the log
    caplog.set_level(logging.WARNING, logger="bot.search")
    assert await search.search(PARAPHRASE, "discord", "g1", "help", 4, min_relevance=floor) == []
    lexical = await search.search("work from another country", "discord", "g1", "help", 4, min_relevance=floor)
    assert lexical and lexical[0].heading == "Can I work from another country?"
    assert any("semantic search skipped, lexical only" in r.getMessage() for r in caplog.records)
    server.start()  # for the module's other tests


async def test_a_model_without_embeddings_fails_start_up_with_one_clear_message(
    settings: Settings, server: LlamaCppServer
) -> None:
    with pytest.raises(ModelLoadError) as caught:
        await Quill.start(served(settings, server, "smollm"))  # the chat model has embedding off
    message = str(caught.value)
    assert "QUILL_EMBEDDINGS" in message and "'smollm'" in message and "--embedding true" in message
