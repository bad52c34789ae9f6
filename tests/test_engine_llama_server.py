"""The server backend (QUILL_ENGINE_BACKEND=openai) against llama.cpp's own `llama-server`, on
the embedded model: what test_engine_openai.py runs against llama-cpp-python's server, plus
what only llama-server offers (`json_schema`, `/props`, `/tokenize`, `/lora-adapters`) and the
tool loop through it. These are the checks behind the README's llama-server column.

The binary comes from the cache bench/build_llama_server.sh fills; .ci/run builds it once. On a
machine without it the module is skipped, saying how to build it; with QUILL_REQUIRE_LLAMA_SERVER
set (CI) a missing binary is a failure instead.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from bot.app import Quill
from bot.config import embedded_model_path
from bot.engine import Engine, EngineError
from bot.engine.local import LocalEngine
from bot.engine.openai import OpenAIEngine
from bot.tools import STATUS_PREFIX
from tests import test_engine_openai as on_servers
from tests.openai_servers import LlamaServer, built_llama_server
from tests.test_engine_openai import IN_PROCESS_CHECKS, openai_settings, started
from tests.test_router import read
from tests.test_tools import GUIDE, Asker, tool_settings
from tests.test_tools import request as tool_request

pytestmark = pytest.mark.asyncio(loop_scope="module")

BINARY = built_llama_server()
if BINARY is None:
    HOW = "llama-server is not built: `bash bench/build_llama_server.sh` builds it once into a cache"
    if os.environ.get("QUILL_REQUIRE_LLAMA_SERVER"):
        raise RuntimeError(f"{HOW} (QUILL_REQUIRE_LLAMA_SERVER is set, so this is not skipped)")
    pytest.skip(HOW, allow_module_level=True)

SERVER_CTX = 3072  # unlike the test settings' QUILL_N_CTX=2048: the probe must read /props
# The same checks as on llama-cpp-python's server (they take one started engine).
SAME_CHECKS = [
    *IN_PROCESS_CHECKS,
    on_servers.test_stream_pieces_make_one_finished_reply,
    on_servers.test_stop_sequence_ends_the_reply,
    on_servers.test_concurrent_requests_each_get_their_own_reply,
]


def launch(tmp_path_factory: pytest.TempPathFactory, *args: str) -> Iterator[LlamaServer]:
    assert BINARY is not None
    srv = LlamaServer(BINARY, tmp_path_factory.mktemp("llama-server") / "server.log", *args)
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """Chat with the chat template run by llama-server (`--jinja`), two slots sharing the context,
    and embeddings, which a chat model gives only with a pooling named on the command line."""
    args = ["-c", str(SERVER_CTX), "--parallel", "2", "--jinja", "--embeddings", "--pooling", "mean"]
    yield from launch(tmp_path_factory, *args)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def remote(server: LlamaServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[OpenAIEngine]:
    async with started(openai_settings(tmp_path_factory.mktemp("remote"), server.url)) as engine:
        yield engine


@pytest.mark.parametrize("check", SAME_CHECKS, ids=lambda check: check.__name__)
async def test_the_server_backend_checks_pass_on_llama_server(
    check: Callable[[Engine], Awaitable[None]], remote: OpenAIEngine
) -> None:
    await check(remote)


async def test_features_and_context_are_probed(remote: OpenAIEngine, server: LlamaServer) -> None:
    # No `tools`: SmolLM2's template does not describe tools, so llama-server answers a
    # tool_choice "required" request with plain text, and quill chooses under its grammar.
    assert remote.features == {"stream", "grammar", "json_schema", "tokenize", "embeddings"}
    assert remote.json_format == "json_schema"  # OpenAI's own form, unlike llama-cpp-python's server
    props = httpx.get(f"{server.root_url}/props").json()
    assert props["chat_template_caps"]["supports_tools"] is False
    # /props reports the context of one slot (3,072 over 2 slots), not QUILL_N_CTX's 2,048.
    assert remote.n_ctx == props["default_generation_settings"]["n_ctx"] == SERVER_CTX // 2
    assert remote.model == str(embedded_model_path())


async def test_token_counts_match_the_model_s_own_tokenizer(remote: OpenAIEngine, engine: LocalEngine) -> None:
    await on_servers.test_token_counts_match_the_model_s_own_tokenizer(remote, engine)


async def test_history_is_trimmed_to_the_context(
    remote: OpenAIEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await on_servers.test_history_is_trimmed_to_the_context(remote, tmp_path, monkeypatch)


async def test_embeddings(remote: OpenAIEngine) -> None:
    """Two slots without `--kv-unified`: llama-server 11434 gives the first of three texts in
    one request a wrong vector. The start-up probe saw it, so quill sends one text at a time."""
    assert remote._embed_one_by_one
    await on_servers.test_embeddings(remote)


async def test_a_unified_kv_cache_embeds_texts_together(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    args = ["-c", "2048", "--parallel", "2", "--kv-unified", "--embeddings", "--pooling", "mean"]
    for srv in launch(tmp_path_factory, *args):
        async with started(openai_settings(tmp_path, srv.url)) as engine:
            assert "embeddings" in engine.features and not engine._embed_one_by_one
            await on_servers.test_embeddings(engine)


async def test_embeddings_without_a_pooling_say_how_to_start_the_server(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`--embeddings` alone: llama-server refuses (\"Pooling type 'none' is not OAI compatible\"),
    and the start-up warning gives the flag that fixes it; chat still works."""
    for srv in launch(tmp_path_factory, "-c", "2048", "--embeddings"):
        async with started(openai_settings(tmp_path, srv.url)) as engine:
            assert "embeddings" not in engine.features and "stream" in engine.features
        assert "not OAI compatible" in caplog.text and "--embeddings --pooling mean" in caplog.text


async def test_set_adapter_names_the_lora_endpoint_the_server_has(remote: OpenAIEngine, server: LlamaServer) -> None:
    """The deploy step's instructions point at /lora-adapters, which this server does serve."""
    with pytest.raises(EngineError, match="/lora-adapters"):
        await remote.set_adapter(Path("adapters/team.gguf"))
    listing = httpx.get(f"{server.root_url}/lora-adapters")
    assert listing.status_code == 200 and listing.json() == []


async def test_the_chat_plugin_answers_through_llama_server(server: LlamaServer, tmp_path: Path) -> None:
    app = await Quill.start(openai_settings(tmp_path, server.url, max_reply_tokens=24))
    try:
        reply = await app.router.handle(on_servers.request("Say hello to the team."))
        assert (await read(reply)).strip() and not reply.failed
        assert [role for role, _ in await on_servers.stored(app)] == ["user", "assistant"]
    finally:
        await app.close()


async def test_tools_are_chosen_under_the_grammar(server: LlamaServer, tmp_path: Path) -> None:
    """Without `tools` support the choice is made under quill's GBNF grammar, which llama-server
    takes: a knowledge-base question becomes the /ask call, whose answer cites the document."""
    quill = await Quill.start(tool_settings(tmp_path, engine_backend="openai", openai_base_url=server.url))
    try:
        assert "tools" not in quill.engine.features and "grammar" in quill.engine.features
        await read(await quill.router.handle(tool_request(f'/kb-add name:"Deploy guide" {GUIDE}')))
        asker = Asker(False)
        shown = await read(
            await quill.router.handle(tool_request("How do staging deploys run in our team?", confirm=asker))
        )
        assert shown.startswith(STATUS_PREFIX) and "“Deploy guide”" in shown, shown
        assert asker.questions == []  # /ask reads only: nobody is asked to confirm it
    finally:
        await quill.close()


async def test_a_second_reply_while_one_streams(remote: OpenAIEngine) -> None:
    """Unlike llama-cpp-python's server, llama-server serves both at once (two slots)."""
    first = remote.stream(on_servers.QUESTION, on_servers.GREEDY)
    piece = await anext(first)
    other = await asyncio.wait_for(remote.chat(on_servers.QUESTION, on_servers.GREEDY), timeout=120)
    rest = "".join([p async for p in first])
    assert other.text.strip() and (piece + rest).strip()
