"""The server backend (QUILL_ENGINE_BACKEND=openai) against a real OpenAI-compatible server:
llama-cpp-python's own, on the embedded model, started once for this module. The same checks
run on the in-process backend, so plugins cannot tell the two apart. Faults a real server
cannot be made to show on cue (429/503, a hang, an unknown model) come from a scripted one.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import pytest_asyncio

from bot.api import Reply, Request
from bot.app import Quill
from bot.config import Settings, embedded_model_path
from bot.engine import ChatMessage, Engine, EngineError, GenerationOptions, ModelLoadError
from bot.engine import openai as openai_backend
from bot.engine.local import LocalEngine
from bot.engine.openai import OpenAIEngine, estimate_tokens
from tests import test_engine as in_process
from tests.conftest import make_settings
from tests.openai_servers import (
    LlamaCppServer,
    ScriptedServer,
    busy,
    cut_off,
    free_port,
    hang,
    interrupted,
    unknown_model,
)
from tests.test_engine import QUESTION, Colours

pytestmark = pytest.mark.asyncio(loop_scope="module")

GREEDY = GenerationOptions(max_tokens=24, temperature=0.0)
# The in-process engine's own checks that hold for any backend (the others compare two runs'
# texts, which a server with a prompt cache does not keep identical), run on the server backend.
IN_PROCESS_CHECKS = [
    in_process.test_count_tokens,
    in_process.test_event_loop_stays_responsive_during_generation,
    in_process.test_grammar_constrains_the_reply,
    in_process.test_max_tokens_bounds_the_reply,
    in_process.test_prompt_larger_than_the_context_is_refused,
    in_process.test_structured_output_cut_short_is_a_clear_error,
    in_process.test_structured_output_parses_into_the_model,
]


def openai_settings(tmp_path: Path, url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "engine_backend": "openai",
        "openai_base_url": url,
        "database_url": f"sqlite:///{tmp_path / 'quill.db'}",
    }
    values.update(overrides)
    return make_settings(tmp_path, **values)


@asynccontextmanager
async def started(settings: Settings) -> AsyncIterator[OpenAIEngine]:
    engine = OpenAIEngine(settings)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppServer]:
    """The real server, with embeddings on, shared by this module."""
    srv = LlamaCppServer(tmp_path_factory.mktemp("llama-server") / "server.log", embedding=True)
    srv.start()
    yield srv
    srv.kill()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def remote(server: LlamaCppServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[OpenAIEngine]:
    async with started(openai_settings(tmp_path_factory.mktemp("remote"), server.url)) as engine:
        yield engine


@pytest.fixture(params=["local", "openai"])
def backend(request: pytest.FixtureRequest) -> Engine:
    """Each backend in turn: the shared in-process engine, or the server backend."""
    return request.getfixturevalue("engine" if request.param == "local" else "remote")


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    with ScriptedServer() as srv:
        yield srv


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_backend, "RETRY_BASE_DELAY", 0.01)


def request(text: str, channel: str = "c1") -> Request:
    return Request(transport="test", channel_id=channel, author_id="u1", text=text)


async def read(reply: Reply) -> str:
    assert reply.stream is not None, reply.text
    return "".join([piece async for piece in reply.stream])


async def stored(app: Quill, channel: str = "c1") -> list[tuple[str, str]]:
    conv = await app.memory.conversation("test", "", channel)
    assert conv.id is not None
    return [(m.role, m.content) for m in await app.memory.history(conv.id, 100_000)]


# -- the same checks on both backends ------------------------------------------------------


async def test_stream_pieces_make_one_finished_reply(backend: Engine) -> None:
    pieces = [p async for p in backend.stream(QUESTION, GREEDY)]
    whole = await backend.chat(QUESTION, GREEDY)
    assert len(pieces) > 1 and "".join(pieces).strip()
    assert whole.text.strip() and whole.finish_reason in {"stop", "length"}
    assert 0 < whole.completion_tokens <= GREEDY.max_tokens


async def test_stop_sequence_ends_the_reply(backend: Engine) -> None:
    # Any reply of two words holds a space: the reply must end before the first one.
    cut = await backend.chat(QUESTION, GenerationOptions(max_tokens=24, temperature=0.0, stop=[" "]))
    assert cut.text and " " not in cut.text
    assert cut.finish_reason == "stop"


@pytest.mark.parametrize("check", IN_PROCESS_CHECKS, ids=lambda check: check.__name__)
async def test_the_in_process_engine_checks_pass_on_the_server_backend(
    check: Callable[[Engine], Awaitable[None]], remote: OpenAIEngine
) -> None:
    await check(remote)


async def test_history_is_trimmed_to_the_context(
    backend: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2,500 tokens of history before a question, with a context of 256 tokens: only trimming
    keeps the prompt inside both the 256 and the model's real 2,048."""
    monkeypatch.setattr(backend, "n_ctx", 256)
    app = await Quill.start(make_settings(tmp_path, max_reply_tokens=16), engine=backend)
    try:
        conv = await app.memory.conversation("test", "", "c1")
        assert conv.id is not None
        old = "The committee discussed the harbour budget at length and agreed on nothing. " * 8
        tokens = await backend.count_tokens(old)
        for n in range(math.ceil(2500 / tokens)):
            role = "user" if n % 2 == 0 else "assistant"
            await app.memory.add_message(conv.id, role=role, content=old, author_id="x", token_count=tokens)
        reply = await app.router.handle(request("And what about the bridge?"))
        answer = await read(reply)
        assert not reply.failed, answer
        last_two = [("user", "And what about the bridge?"), ("assistant", answer.strip())]
        assert (await stored(app))[-2:] == last_two
    finally:
        await app.close(close_engine=False)


async def test_the_chat_plugin_runs_the_same_on_both_backends(
    backend: Engine, server: LlamaCppServer, tmp_path: Path
) -> None:
    """The server backend is built by Quill.start from the settings alone, as in production."""
    if isinstance(backend, LocalEngine):
        app = await Quill.start(make_settings(tmp_path), engine=backend)
    else:
        app = await Quill.start(openai_settings(tmp_path, server.url))
        assert isinstance(app.engine, OpenAIEngine)
    try:
        reply = await app.router.handle(request("Hi, who are you?"))
        answer = await read(reply)
        assert not reply.failed and answer.strip()
        assert await stored(app) == [("user", "Hi, who are you?"), ("assistant", answer.strip())]
    finally:
        await app.close(close_engine=not isinstance(backend, LocalEngine))


# -- what only the server backend does -----------------------------------------------------


async def test_features_and_context_are_probed(remote: OpenAIEngine) -> None:
    assert remote.features == {"stream", "grammar", "json_schema", "tokenize", "embeddings"}
    # llama-cpp-python's server takes schemas only as json_object, and reports no context size.
    assert remote.json_format == "json_object"
    assert remote.n_ctx == 2048  # QUILL_N_CTX of the test settings
    assert remote.model == str(embedded_model_path())


async def test_token_counts_match_the_model_s_own_tokenizer(remote: OpenAIEngine, engine: LocalEngine) -> None:
    for text in ["hello world", "Ünïcödé and emoji 🎉", "def f(x):\n    return x * 2\n"]:
        assert await remote.count_tokens(text) == await engine.count_tokens(text)


async def test_embeddings(remote: OpenAIEngine) -> None:
    cat = "the cat sat on the mat"
    a, b, a_again = await remote.embed([cat, "quarterly tax filing", cat])
    assert len(a) == len(b) == 576  # SmolLM2-135M's hidden size: one pooled vector per text
    assert a == pytest.approx(a_again, rel=1e-4)
    assert a != pytest.approx(b, rel=1e-2)
    assert await remote.embed([]) == []


async def test_set_adapter_tells_the_admin_what_to_do(remote: OpenAIEngine) -> None:
    with pytest.raises(EngineError) as err:
        await remote.set_adapter(Path("adapters/team.gguf"))
    message = str(err.value)
    assert "--lora" in message and "/lora-adapters" in message and "load_lora_adapter" in message


async def test_wrong_model_name_fails_at_start_naming_the_setting(server: LlamaCppServer, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        await Quill.start(openai_settings(tmp_path, server.url, openai_model="no-such-model"))
    message = str(err.value)
    assert "'no-such-model'" in message and "QUILL_OPENAI_MODEL" in message
    assert str(embedded_model_path()) in message  # what the server does serve


async def test_server_down_at_start_names_the_url_and_the_setting(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ModelLoadError) as err:
        await Quill.start(openai_settings(tmp_path, url, openai_max_retries=0))
    assert url in str(err.value) and "QUILL_OPENAI_BASE_URL" in str(err.value)


async def test_killed_mid_stream_slow_down_and_back(tmp_path: Path, quick_retries: None) -> None:
    """One real server through a reply's life: busy (a timeout), killed mid-reply (the partial
    reply is not stored), down (a clear error), restarted (served again, nothing to do)."""
    srv = LlamaCppServer(tmp_path / "server.log")
    srv.start()
    try:
        settings = openai_settings(tmp_path, srv.url, openai_max_retries=1, max_reply_tokens=400)
        app = await Quill.start(settings)
        story = await app.router.handle(request("Write a long story about a cat."))
        assert story.stream is not None
        pieces = aiter(story.stream)
        assert await anext(pieces)
        # The server is busy with the story: another request gets nothing within the timeout.
        app.settings.openai_timeout = 1.0
        with pytest.raises(EngineError, match="QUILL_OPENAI_TIMEOUT"):
            await app.engine.chat(QUESTION, GenerationOptions(max_tokens=4))
        app.settings.openai_timeout = 120.0
        srv.kill()
        rest = "".join([p async for p in pieces])
        assert story.failed and "stopped in the middle of the reply" in rest
        assert await stored(app) == [("user", "Write a long story about a cat.")]

        down = await app.router.handle(request("Are you there?"))
        assert "is not reachable" in await read(down) and down.failed

        srv.start()
        back = await app.router.handle(request("Hello again."))
        answer = await read(back)
        assert not back.failed and answer.strip()
        assert (await stored(app))[-1] == ("assistant", answer.strip())
        await app.close()
    finally:
        srv.kill()


# -- faults on cue, from a scripted server -------------------------------------------------


async def test_a_server_with_only_chat_says_what_it_lacks(
    scripted: ScriptedServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "bot.engine.openai")
    async with started(openai_settings(tmp_path, scripted.url)) as engine:
        assert engine.features == {"stream"}
        lacking = {r.getMessage().split("'")[1] for r in caplog.records if "lacks" in r.getMessage()}
        assert lacking == {"grammar", "json_schema", "tools", "embeddings", "tokenize"}
        with pytest.raises(EngineError, match="does not serve embeddings"):
            await engine.embed(["x"])
        with pytest.raises(EngineError, match="does not take GBNF grammars"):
            await engine.chat(QUESTION, GenerationOptions(grammar='root ::= "a"'))
        with pytest.raises(EngineError, match="does not take JSON schemas"):
            await engine.chat_structured(QUESTION, Colours, GREEDY)
        assert await engine.count_tokens("x" * 300) == estimate_tokens("x" * 300) == 100
        assert (await engine.chat(QUESTION, GREEDY)).text == "Hello there."


async def test_without_a_server_tokenizer_the_local_gguf_counts(
    scripted: ScriptedServer, tmp_path: Path, engine: LocalEngine
) -> None:
    settings = openai_settings(tmp_path, scripted.url, model_path=embedded_model_path())
    async with started(settings) as remote:
        assert "tokenize" in remote.features
        text = "Tokens, counted by the vocabulary alone."
        assert await remote.count_tokens(text) == await engine.count_tokens(text)


async def test_busy_server_is_retried_until_it_answers(
    scripted: ScriptedServer, tmp_path: Path, quick_retries: None
) -> None:
    async with started(openai_settings(tmp_path, scripted.url, openai_max_retries=3)) as engine:
        scripted.chat = busy(429, times=2, retry_after="0")
        scripted.hits.clear()
        assert (await engine.chat(QUESTION, GREEDY)).text == "Hello there."
        assert scripted.hits == ["/v1/chat/completions"] * 3


async def test_retries_are_bounded_then_a_clear_error(
    scripted: ScriptedServer, tmp_path: Path, quick_retries: None
) -> None:
    async with started(openai_settings(tmp_path, scripted.url, openai_max_retries=2)) as engine:
        scripted.chat = busy(503, times=100)
        scripted.hits.clear()
        with pytest.raises(EngineError, match=r"busy \(HTTP 503: server busy, try later\).*after 2 retries"):
            await engine.chat(QUESTION, GREEDY)
        assert len(scripted.hits) == 3


async def test_a_silent_server_times_out(scripted: ScriptedServer, tmp_path: Path) -> None:
    async with started(openai_settings(tmp_path, scripted.url, openai_timeout=0.3)) as engine:
        scripted.chat = hang
        with pytest.raises(EngineError, match=r"sent nothing for 0.3 s \(QUILL_OPENAI_TIMEOUT\)"):
            await engine.chat(QUESTION, GREEDY)


@pytest.mark.parametrize("behaviour", [cut_off, interrupted], ids=["dropped", "unfinished"])
async def test_a_reply_cut_short_is_an_error_and_not_stored(
    scripted: ScriptedServer, tmp_path: Path, behaviour: object
) -> None:
    app = await Quill.start(openai_settings(tmp_path, scripted.url))
    try:
        scripted.chat = behaviour  # type: ignore[assignment]
        reply = await app.router.handle(request("Tell me a story."))
        text = await read(reply)
        assert reply.failed and text.startswith("Once upon\n") and "the partial reply was not kept" in text
        assert await stored(app) == [("user", "Tell me a story.")]
    finally:
        await app.close()


async def test_the_server_s_own_error_is_shown_for_an_unknown_model(scripted: ScriptedServer, tmp_path: Path) -> None:
    scripted.models = None  # a server that lists nothing: the first request finds out
    scripted.chat = unknown_model
    with pytest.raises(ModelLoadError) as err:
        await Quill.start(openai_settings(tmp_path, scripted.url, openai_model="gpt-9"))
    message = str(err.value)
    assert "HTTP 404" in message and "The model `gpt-9` does not exist." in message
    assert "QUILL_OPENAI_MODEL" in message and scripted.url in message


async def test_api_key_is_sent_and_never_logged(
    scripted: ScriptedServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = openai_settings(tmp_path, scripted.url, openai_api_key="sk-very-secret")
    async with started(settings) as engine:
        await engine.chat(QUESTION, GREEDY)
    assert scripted.authorization == "Bearer sk-very-secret"
    assert "sk-very-secret" not in caplog.text and "sk-very-secret" not in repr(settings)


async def test_concurrent_requests_each_get_their_own_reply(remote: OpenAIEngine) -> None:
    prompts = [[ChatMessage("user", f"Count from {n} to {n + 5}.")] for n in (1, 20, 300)]
    results = await asyncio.gather(*(remote.chat(p, GREEDY) for p in prompts))
    assert all(r.text and r.finish_reason in {"stop", "length"} for r in results)
