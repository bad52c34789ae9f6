"""The engine on the real embedded model: streaming, limits, structure, ordering, errors.

Every behaviour test runs on both local modes (QUILL_ENGINE_MODE single and batched)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import BaseModel, Field

from bot.config import embedded_model_path
from bot.engine import (
    ChatMessage,
    ContextOverflow,
    EngineError,
    GenerationOptions,
    ModelLoadError,
    start_engine,
)
from bot.engine.batched import BatchedEngine
from bot.engine.local import LocalEngine
from tests.conftest import assert_same_or_near_tie, make_settings

QUESTION = [ChatMessage("system", "You are terse."), ChatMessage("user", "Name three colours.")]
GREEDY = GenerationOptions(max_tokens=24, temperature=0.0)
ENGINE_CLASSES = [LocalEngine, BatchedEngine]


@pytest.fixture(params=["single", "batched"])
def engine(request: pytest.FixtureRequest, engine: LocalEngine) -> LocalEngine:
    """The session's engine in each local mode."""
    return engine if request.param == "single" else request.getfixturevalue("batched_engine")


async def test_stream_pieces_join_to_the_whole_reply(engine: LocalEngine) -> None:
    pieces = [p async for p in engine.stream(QUESTION, GREEDY)]
    whole = await engine.chat(QUESTION, GREEDY)
    assert len(pieces) > 1
    assert "".join(pieces) == whole.text
    assert 0 < whole.completion_tokens <= GREEDY.max_tokens


async def test_max_tokens_bounds_the_reply(engine: LocalEngine) -> None:
    result = await engine.chat(QUESTION, GenerationOptions(max_tokens=3, temperature=0.0))
    assert result.completion_tokens <= 3
    assert result.finish_reason == "length"


async def test_stop_sequence_ends_the_reply(engine: LocalEngine) -> None:
    full = (await engine.chat(QUESTION, GREEDY)).text
    stop_word = full.split()[1]
    cut = await engine.chat(QUESTION, GenerationOptions(max_tokens=24, temperature=0.0, stop=[stop_word]))
    assert stop_word not in cut.text
    assert full.startswith(cut.text.rstrip())


async def test_grammar_constrains_the_reply(engine: LocalEngine) -> None:
    grammar = 'root ::= ("yes" | "no") "."'
    ask = [ChatMessage("user", "Is the sky green? Answer yes or no.")]
    result = await engine.chat(ask, GenerationOptions(max_tokens=8, temperature=0.0, grammar=grammar))
    assert result.text in {"yes.", "no."}


class Colours(BaseModel):
    # Bounded lengths keep the grammar's output short enough for a small max_tokens.
    colours: list[Annotated[str, Field(max_length=12)]] = Field(max_length=3)
    count: int = Field(ge=0, le=9)


async def test_structured_output_parses_into_the_model(engine: LocalEngine) -> None:
    ask = [ChatMessage("user", "List two colours as JSON with fields colours and count.")]
    result = await engine.chat_structured(ask, Colours, GenerationOptions(max_tokens=96, temperature=0.0))
    assert isinstance(result, Colours)
    assert isinstance(result.count, int)


async def test_structured_output_cut_short_is_a_clear_error(engine: LocalEngine) -> None:
    ask = [ChatMessage("user", "List ten colours as JSON with fields colours and count.")]
    with pytest.raises(EngineError, match="did not match Colours"):
        await engine.chat_structured(ask, Colours, GenerationOptions(max_tokens=4, temperature=0.0))


async def test_count_tokens(engine: LocalEngine) -> None:
    assert await engine.count_tokens("") == 0
    short, long = await engine.count_tokens("hello"), await engine.count_tokens("hello " * 100)
    assert 0 < short < long


async def test_prompt_larger_than_the_context_is_refused(engine: LocalEngine) -> None:
    huge = [ChatMessage("user", "word " * (engine.n_ctx + 100))]
    with pytest.raises(ContextOverflow, match="QUILL_N_CTX"):
        await engine.chat(huge, GREEDY)
    # The worker survives and serves the next request.
    assert (await engine.chat(QUESTION, GREEDY)).text


async def test_concurrent_requests_never_interleave(engine: LocalEngine) -> None:
    prompts = [[ChatMessage("user", f"Count from {n} to {n + 5}.")] for n in (1, 20, 300)]
    alone = [(await engine.chat(p, GREEDY)).text for p in prompts]
    together = await asyncio.gather(*(engine.chat(p, GREEDY) for p in prompts))
    if isinstance(engine, BatchedEngine):  # decoded side by side: near-ties may flip
        for prompt, expected, result in zip(prompts, alone, together, strict=True):
            await assert_same_or_near_tie(engine, prompt, expected, result.text)
    else:
        assert [r.text for r in together] == alone


async def test_leaving_a_stream_early_cancels_it_and_the_queue_goes_on(engine: LocalEngine) -> None:
    expected = (await engine.chat(QUESTION, GREEDY)).text
    stream = engine.stream([ChatMessage("user", "Write a long story about a cat.")], GenerationOptions(max_tokens=400))
    async for _ in stream:
        break
    await stream.aclose()
    after = (await engine.chat(QUESTION, GREEDY)).text
    if isinstance(engine, BatchedEngine):  # its prefix cells may come from another batch
        await assert_same_or_near_tie(engine, QUESTION, expected, after)
    else:
        assert after == expected


async def test_event_loop_stays_responsive_during_generation(engine: LocalEngine) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    # A long answer, so generation spans many ticks; a loop blocked by the llama calls would let the
    # ticker run at most once (after the call returned), however long the generation took.
    task = asyncio.create_task(ticker())
    result = await engine.chat(
        [ChatMessage("user", "Write a long story about a cat.")], GenerationOptions(max_tokens=64, temperature=0.0)
    )
    task.cancel()
    assert result.completion_tokens >= 32
    assert ticks >= 3


@pytest.mark.parametrize("engine_class", ENGINE_CLASSES)
def test_missing_model_file_names_the_path_and_the_setting(tmp_path: Path, engine_class: type[LocalEngine]) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError) as err:
        engine_class(make_settings(tmp_path, model_path=missing)).start()
    assert str(missing) in str(err.value) and "QUILL_MODEL_PATH" in str(err.value)


@pytest.mark.parametrize("engine_class", ENGINE_CLASSES)
def test_non_gguf_file_is_refused(tmp_path: Path, engine_class: type[LocalEngine]) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_text(json.dumps({"not": "a model"}))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        engine_class(make_settings(tmp_path, model_path=bogus)).start()


@pytest.mark.parametrize("engine_class", ENGINE_CLASSES)
def test_truncated_gguf_is_refused(tmp_path: Path, engine_class: type[LocalEngine]) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(embedded_model_path().read_bytes()[:1_000_000])
    with pytest.raises(ModelLoadError, match="Cannot load model") as err:
        engine_class(make_settings(tmp_path, model_path=broken)).start()
    assert "QUILL_MODEL_PATH" in str(err.value)


async def test_embeddings_have_one_size_and_similar_texts_are_closer(engine: LocalEngine) -> None:
    cat, kitten, tax = await engine.embed(
        ["The cat sleeps on the warm mat.", "A kitten naps on the rug.", "File the quarterly VAT return."]
    )
    assert len(cat) == len(kitten) == len(tax) > 0

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))  # the vectors are unit length

    assert cosine(cat, kitten) > cosine(cat, tax)
    assert await engine.embed([]) == []
    assert len((await engine.embed([""]))[0]) == len(cat)


@pytest.mark.parametrize(("mode", "kind"), [("single", LocalEngine), ("batched", BatchedEngine)])
async def test_start_engine_builds_the_mode_the_settings_name(tmp_path: Path, mode: str, kind: type) -> None:
    engine = await start_engine(make_settings(tmp_path, engine_mode=mode, batch_kv_mb=64))
    try:
        assert type(engine) is kind
        assert (await engine.chat(QUESTION, GREEDY)).text
    finally:
        await engine.close()
