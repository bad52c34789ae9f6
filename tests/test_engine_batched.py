"""The batched engine's own guarantees: same replies as single mode, streams joining and leaving
at any step, warm prefixes counted in evaluated tokens, eviction, chunked prefill, LoRA swaps."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from bot.engine import MESSAGE_OVERHEAD_TOKENS, ChatMessage, EngineError, GenerationOptions
from bot.engine.batched import BatchedEngine, BatchStats
from bot.engine.local import LocalEngine
from tests.conftest import assert_same_or_near_tie
from tests.test_engine import GREEDY, QUESTION, Colours

PROMPTS = [
    QUESTION,
    [ChatMessage("user", "Count from 1 to 10.")],
    [ChatMessage("system", "You answer in French."), ChatMessage("user", "What is a cat?")],
    [ChatMessage("user", "Write a haiku about rain.")],
    [ChatMessage("user", "What is 2 + 2?"), ChatMessage("assistant", "4"), ChatMessage("user", "And 3 + 3?")],
]
COUNTING = [ChatMessage("user", "Count from 1 to 50.")]
GREEDY_LONG = GenerationOptions(max_tokens=64, temperature=0.0)


def filler(name: str, words: int) -> str:
    """A long system prompt that shares no prefix with another `name`'s."""
    return f"{name} speaking. " + " ".join(f"{name.lower()}{i % 50}" for i in range(words))


def snapshot(engine: BatchedEngine) -> BatchStats:
    return replace(engine.stats)


def assert_no_sequence_leaked(engine: BatchedEngine) -> None:
    s = engine.stats
    assert s.running == 0
    assert s.parked == 0
    assert s.free == s.sequences


async def test_greedy_replies_match_single_mode(engine: LocalEngine, batched_engine: BatchedEngine) -> None:
    single = [await engine.chat(p, GREEDY) for p in PROMPTS]
    alone = [await batched_engine.chat(p, GREEDY) for p in PROMPTS]
    together = await asyncio.gather(*(batched_engine.chat(p, GREEDY) for p in PROMPTS))
    for prompt, s, a, t in zip(PROMPTS, single, alone, together, strict=True):
        await assert_same_or_near_tie(batched_engine, prompt, s.text, a.text)
        await assert_same_or_near_tie(batched_engine, prompt, s.text, t.text)


async def test_a_request_joining_midway_gets_the_same_reply_as_alone(batched_engine: BatchedEngine) -> None:
    first_alone = await batched_engine.chat(COUNTING, GREEDY)
    second_alone = await batched_engine.chat(PROMPTS[3], GREEDY)
    first_pieces: list[str] = []
    second: asyncio.Task | None = None
    async for piece in batched_engine.stream(COUNTING, GREEDY):
        first_pieces.append(piece)
        if len(first_pieces) == 3:
            second = asyncio.create_task(batched_engine.chat(PROMPTS[3], GREEDY))
    assert second is not None
    await assert_same_or_near_tie(batched_engine, COUNTING, first_alone.text, "".join(first_pieces))
    second_text = (await second).text
    await assert_same_or_near_tie(batched_engine, PROMPTS[3], second_alone.text, second_text)


async def test_cancelled_stream_frees_its_sequence_at_once(batched_engine: BatchedEngine) -> None:
    before = snapshot(batched_engine)
    stream = batched_engine.stream(
        [ChatMessage("user", "Write a long story about a cat.")], GenerationOptions(max_tokens=400)
    )
    async for _ in stream:
        break
    await stream.aclose()
    later = await batched_engine.chat(QUESTION, GREEDY)
    after = batched_engine.stats
    assert after.cancellations == before.cancellations + 1
    # The cancelled reply stopped within a few steps, far from its 400 tokens.
    assert after.tokens_generated - before.tokens_generated < later.completion_tokens + 40
    assert_no_sequence_leaked(batched_engine)


async def test_returning_conversation_evaluates_only_its_new_tokens(batched_engine: BatchedEngine) -> None:
    history = [ChatMessage("system", filler("Ada", 60)), ChatMessage("user", "Who are you?")]
    reply = await batched_engine.chat(history, GenerationOptions(max_tokens=16, temperature=0.0))
    # Other conversations use the context in between.
    for name in ("Bob", "Cy", "Dee"):
        await batched_engine.chat([ChatMessage("system", filler(name, 20)), ChatMessage("user", "Hi.")], GREEDY)
    follow_up = "And what do you do?"
    turn_two = [*history, ChatMessage("assistant", reply.text), ChatMessage("user", follow_up)]
    before = snapshot(batched_engine)
    await batched_engine.chat(turn_two, GenerationOptions(max_tokens=4, temperature=0.0))
    evaluated = batched_engine.stats.prompt_tokens_evaluated - before.prompt_tokens_evaluated
    reused = batched_engine.stats.prompt_tokens_reused - before.prompt_tokens_reused
    assert reused > 200
    assert evaluated <= await batched_engine.count_tokens(follow_up) + 2 * MESSAGE_OVERHEAD_TOKENS


@pytest.mark.parametrize(
    "messages",
    [
        [ChatMessage("user", "Tell me about the sea in three sentences.")],
        [ChatMessage("user", "请用中文写一段关于春天的话。")],
    ],
)
async def test_a_written_prefix_is_continued_without_reading_the_prompt_again(
    engine: LocalEngine, batched_engine: BatchedEngine, messages: list[ChatMessage]
) -> None:
    """GenerationOptions.prefix: the reply goes on from its written beginning, in both modes,
    and the text returned leaves that beginning out. Written as the model itself began, the
    rest is the model's own rest, and the batched engine reads only what its saved state lacks.
    (Single mode evaluates the prefix in other batches, so its greedy rest may flip on a near
    tie: seen 0.28 nats.)"""
    options = GenerationOptions(max_tokens=32, temperature=0.0)
    whole = (await batched_engine.chat(messages, options)).text
    # Cut where a token surely ends: before a space, after a Chinese comma or full stop.
    cut = next((i + (whole[i] != " ") for i in range(len(whole) // 3, len(whole)) if whole[i] in " ，。"), None)
    assert cut is not None, whole
    prefix, rest = whole[:cut], whole[cut:]
    before = snapshot(batched_engine)
    continued = await batched_engine.chat(messages, replace(options, prefix=prefix, max_tokens=8))
    evaluated = batched_engine.stats.prompt_tokens_evaluated - before.prompt_tokens_evaluated
    assert evaluated <= 4  # the state saved after `whole` holds the prompt and the prefix
    assert continued.text and rest.startswith(continued.text[:8]), (prefix, rest, continued.text)
    # A prefix the model would not have written is continued all the same.
    prefix = "Answer: 42." if messages[0].content.isascii() else "答案：42。"
    for eng in (engine, batched_engine):
        text = "".join([p async for p in eng.stream(messages, replace(options, prefix=prefix))])
        assert text.strip() and not text.startswith(prefix)
    assert_no_sequence_leaked(batched_engine)


async def test_least_recently_used_conversation_is_dropped_beyond_the_cache_budget(
    batched_engine: BatchedEngine,
) -> None:
    """The saved states may take 16 MB (QUILL_BATCH_CACHE_MB): two ~300-token conversations fit,
    a third pushes the oldest out."""
    budget = batched_engine.settings.batch_cache_mb * 2**20
    short = GenerationOptions(max_tokens=4, temperature=0.0)
    talks = {name: [ChatMessage("system", filler(name, 100)), ChatMessage("user", "Hi.")] for name in "WXY"}
    before = snapshot(batched_engine)
    for name in "WXY":
        await batched_engine.chat(talks[name], short)
        assert batched_engine.stats.warm_bytes <= budget
    one_state = batched_engine.stats.warm_bytes / batched_engine.stats.warm
    assert budget / 3 < one_state <= budget / 2  # the premise: two fit, three do not
    assert batched_engine.stats.evictions > before.evictions

    def reused_by(stats_before: BatchStats) -> int:
        return batched_engine.stats.prompt_tokens_reused - stats_before.prompt_tokens_reused

    mark = snapshot(batched_engine)
    await batched_engine.chat(talks["Y"], short)  # the newest: still saved
    assert reused_by(mark) > 200
    mark = snapshot(batched_engine)
    await batched_engine.chat(talks["W"], short)  # the oldest: dropped, evaluated again
    assert reused_by(mark) < 10
    assert_no_sequence_leaked(batched_engine)


async def test_two_requests_whose_prompts_and_replies_exceed_the_pool_are_both_answered(
    batched_engine: BatchedEngine,
) -> None:
    """Two replies whose prompt plus max_tokens each exceed half of the 1,024-cell pool: both
    start at once (cells are counted as used, not reserved) and neither is cut short or broken."""
    options = GenerationOptions(max_tokens=120, temperature=0.0)
    talks = [[ChatMessage("system", filler(name, 130)), ChatMessage("user", "Count to 20.")] for name in ("Fay", "Gus")]
    for talk in talks:
        assert await batched_engine.count_tokens(talk[0].content) + options.max_tokens > 512
    alone = [await batched_engine.chat(talk, options) for talk in talks]
    together = await asyncio.gather(*(batched_engine.chat(talk, options) for talk in talks))
    for talk, a, t in zip(talks, alone, together, strict=True):
        await assert_same_or_near_tie(batched_engine, talk, a.text, t.text)
    assert_no_sequence_leaked(batched_engine)


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def chinese_filler(name: str, sentences: int) -> str:
    """A long Chinese system prompt that shares no prefix with another `name`'s."""
    return f"你是{name}。" + "".join(f"{name}的第{i}条笔记：保持简单和友好。" for i in range(sentences))


# Four conversations, two in each language, whose prompts fit the 1,024-cell pool together
# but whose replies outgrow it: some must be preempted and resumed.
CROWD = [
    [ChatMessage("system", filler("Hal", 80)), ChatMessage("user", "Count from 1 to 100.")],
    [ChatMessage("system", chinese_filler("小明", 7)), ChatMessage("user", "从1数到100。")],
    [ChatMessage("system", filler("Ivy", 80)), ChatMessage("user", "Count from 1 to 100.")],
    [ChatMessage("system", chinese_filler("小红", 7)), ChatMessage("user", "从1数到100，用中文。")],
]
CROWD_OPTIONS = GenerationOptions(max_tokens=64, temperature=0.0)


async def assert_crowd_served_as_alone(batched_engine: BatchedEngine) -> BatchStats:
    """Run CROWD alone one by one, then together; the same replies. Returns the stats before
    the concurrent run."""
    prompts = [await batched_engine.count_tokens(m[0].content) for m in CROWD]
    assert sum(prompts) < batched_engine.stats.kv_cells < sum(prompts) + len(CROWD) * CROWD_OPTIONS.max_tokens
    alone = [await batched_engine.chat(talk, CROWD_OPTIONS) for talk in CROWD]
    assert sum(prompts) + sum(a.completion_tokens for a in alone) > batched_engine.stats.kv_cells  # the premise
    before = snapshot(batched_engine)
    together = await asyncio.gather(*(batched_engine.chat(talk, CROWD_OPTIONS) for talk in CROWD))
    for talk, a, t in zip(CROWD, alone, together, strict=True):
        await assert_same_or_near_tie(batched_engine, talk, a.text, t.text)
        assert "\ufffd" not in t.text
    assert batched_engine.stats.preemptions > before.preemptions
    assert_no_sequence_leaked(batched_engine)
    return before


async def test_replies_outgrowing_the_pool_are_preempted_and_resumed_unchanged(
    batched_engine: BatchedEngine,
) -> None:
    before = await assert_crowd_served_as_alone(batched_engine)
    assert batched_engine.stats.recomputed == before.recomputed  # every parked state came back


async def test_a_preempted_reply_whose_state_is_not_kept_is_evaluated_again_unchanged(
    batched_engine: BatchedEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a state cannot be copied to host memory (here: llama.cpp's copy made to fail), the
    parked request is resumed by evaluating its tokens again: slower, the same reply."""
    monkeypatch.setattr(batched_engine, "_snapshot", lambda seq_id, limit=None: None)
    before = await assert_crowd_served_as_alone(batched_engine)
    assert batched_engine.stats.recomputed > before.recomputed


async def test_per_stream_cells_run_what_would_overflow_a_pool_at_once_unchanged(
    engine: LocalEngine, per_stream_engine: BatchedEngine
) -> None:
    """QUILL_BATCH_KV=per-stream: CROWD, which outgrows a 1,024-cell pool, runs with every
    request in its own 1,024 cells at once, nothing preempted, the same replies as alone and as
    single mode; a returning conversation is restored into whichever stream is free."""
    prompts = [await per_stream_engine.count_tokens(m[0].content) for m in CROWD]
    alone = [await per_stream_engine.chat(talk, CROWD_OPTIONS) for talk in CROWD]
    # Together they outgrow 1,024 cells: a pool of one stream's size would have to preempt.
    assert sum(prompts) + sum(a.completion_tokens for a in alone) > per_stream_engine.settings.n_ctx
    before = snapshot(per_stream_engine)
    tasks = [asyncio.create_task(per_stream_engine.chat(talk, CROWD_OPTIONS)) for talk in CROWD]
    deadline = asyncio.get_running_loop().time() + 300
    most = 0
    while not all(t.done() for t in tasks):
        most = max(most, per_stream_engine.stats.running)
        assert asyncio.get_running_loop().time() < deadline, "the crowd was not served"
        await asyncio.sleep(0.01)
    for talk, a, t in zip(CROWD, alone, [t.result() for t in tasks], strict=True):
        await assert_same_or_near_tie(per_stream_engine, talk, a.text, t.text)
    assert most == len(CROWD)
    after = per_stream_engine.stats
    assert after.preemptions == before.preemptions == 0
    assert after.prompt_tokens_reused - before.prompt_tokens_reused > sum(prompts) // 2  # restored from alone
    for prompt in PROMPTS[:2]:
        await assert_same_or_near_tie(
            per_stream_engine,
            prompt,
            (await engine.chat(prompt, GREEDY)).text,
            (await per_stream_engine.chat(prompt, GREEDY)).text,
        )
    assert_no_sequence_leaked(per_stream_engine)


async def test_per_stream_decoding_streams_share_one_graph_in_ascending_ids(per_stream_engine: BatchedEngine) -> None:
    """llama.cpp computes the streams of a per-stream cache in one graph only where they come
    in ascending, consecutive ids; in any other order each stream is a graph of its own (8
    streams at ~1,500 tokens of context: 201 ms a step, against 111 ms). So requests take the
    lowest free ids and every step lists its decoding streams in id order."""
    steps: list[list[int]] = []
    decode = per_stream_engine._decode

    def spy(entries: list[tuple[int, int, int, bool]]) -> bool:
        steps.append([seq_id for _, _, seq_id, _ in entries])
        return decode(entries)

    per_stream_engine._decode = spy  # type: ignore[method-assign]
    try:
        await asyncio.gather(*(per_stream_engine.chat(p, GREEDY_LONG) for p in PROMPTS[:4]))
    finally:
        del per_stream_engine._decode
    decoding = [ids for ids in steps if len(set(ids)) == len(ids) > 1]  # steps with no prompt chunk
    assert decoding, steps
    assert decoding[0] == [0, 1, 2, 3]
    assert all(ids == sorted(ids) for ids in decoding), decoding
    assert_no_sequence_leaked(per_stream_engine)


async def test_a_cancelled_preempted_request_leaves_nothing_behind(batched_engine: BatchedEngine) -> None:
    before = snapshot(batched_engine)

    async def consume(talk: list[ChatMessage]) -> None:
        async for _ in batched_engine.stream(talk, CROWD_OPTIONS):
            pass

    tasks = [asyncio.create_task(consume(talk)) for talk in CROWD]
    deadline = asyncio.get_running_loop().time() + 300
    while batched_engine.stats.parked == 0:  # the pool fills up as the replies grow
        assert asyncio.get_running_loop().time() < deadline, "no request was preempted"
        assert not all(t.done() for t in tasks), "every reply ended without a preemption"
        await asyncio.sleep(0.05)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    later = await batched_engine.chat(QUESTION, GREEDY)
    assert later.text
    assert batched_engine.stats.cancellations > before.cancellations
    assert_no_sequence_leaked(batched_engine)


async def test_chinese_reply_streams_whole_characters_only(engine: LocalEngine, batched_engine: BatchedEngine) -> None:
    """Detokenized token by token, a character split across tokens is held back until its last
    byte comes: no piece carries U+FFFD or half a character, and the pieces join to the reply."""
    ask = [ChatMessage("system", "你是一个只说中文的助手。"), ChatMessage("user", "请用中文写三句话介绍北京。")]
    options = GenerationOptions(max_tokens=64, temperature=0.0)
    pieces = [piece async for piece in batched_engine.stream(ask, options)]
    text = "".join(pieces)
    assert sum("\u4e00" <= c <= "\u9fff" for c in text) >= 10
    assert not any("\ufffd" in p for p in pieces)
    llm = batched_engine._llm
    split = [t for t in llm.tokenize(text.encode(), False, False) if not is_utf8(llm.detokenize([t]))]
    assert split, "the premise: some characters of the reply take more than one token"
    single = (await engine.chat(ask, options)).text
    # Both stop at 64 tokens; a near-tie on the last one can end a reply a character earlier (its
    # first bytes only, held back), which the check below, from whole texts, cannot weigh.
    end = min(len(single), len(text)) - 1
    await assert_same_or_near_tie(batched_engine, ask, single[:end], text[:end])
    assert (await batched_engine.chat(ask, options)).text == text


async def test_grammar_and_schema_hold_per_sequence_side_by_side(batched_engine: BatchedEngine) -> None:
    yes_no = GenerationOptions(max_tokens=8, temperature=0.0, grammar='root ::= ("yes" | "no") "."')
    ask = [ChatMessage("user", "Is the sky green? Answer yes or no.")]
    colours = [ChatMessage("user", "List two colours as JSON with fields colours and count.")]
    answer, parsed, free = await asyncio.gather(
        batched_engine.chat(ask, yes_no),
        batched_engine.chat_structured(colours, Colours, GenerationOptions(max_tokens=96, temperature=0.0)),
        batched_engine.chat(QUESTION, GREEDY),
    )
    assert answer.text in {"yes.", "no."}
    assert isinstance(parsed, Colours)
    alone = await batched_engine.chat(QUESTION, GREEDY)
    await assert_same_or_near_tie(batched_engine, QUESTION, alone.text, free.text)


async def test_long_prompt_is_prefilled_in_chunks_while_a_stream_goes_on(
    batched_engine: BatchedEngine,
) -> None:
    long_prompt = [ChatMessage("system", filler("Eve", 150)), ChatMessage("user", "Summarise.")]
    prompt_tokens = await batched_engine.count_tokens(long_prompt[0].content)
    alone = await batched_engine.chat(COUNTING, GREEDY_LONG)
    before = snapshot(batched_engine)
    pieces: list[str] = []
    joined: asyncio.Task | None = None
    async for piece in batched_engine.stream(COUNTING, GREEDY_LONG):
        pieces.append(piece)
        if joined is None:
            joined = asyncio.create_task(batched_engine.chat(long_prompt, GenerationOptions(max_tokens=2)))
    assert joined is not None and (await joined).completion_tokens > 0
    await assert_same_or_near_tie(batched_engine, COUNTING, alone.text, "".join(pieces))
    chunks = prompt_tokens // batched_engine.settings.batch_prefill_chunk
    # Most of the long prompt's chunks went into steps that also decoded the running stream.
    assert batched_engine.stats.mixed_steps - before.mixed_steps >= chunks - 2


def write_lora(path: Path, n_layers: int, n_embd: int, value: float) -> None:
    """A rank-1 LoRA adapter on every layer's attn_q, in GGUF (the layout llama.cpp loads)."""

    def string(text: str) -> bytes:
        data = text.encode()
        return struct.pack("<Q", len(data)) + data

    meta = [("general.architecture", "llama"), ("general.type", "adapter"), ("adapter.type", "lora")]
    head = b"GGUF" + struct.pack("<IQQ", 3, 2 * n_layers, len(meta) + 1)
    for key, text in meta:
        head += string(key) + struct.pack("<I", 8) + string(text)
    head += string("adapter.lora.alpha") + struct.pack("<If", 6, 1.0)
    data, offset = b"", 0
    for layer in range(n_layers):
        for suffix, shape in (("lora_a", (n_embd, 1)), ("lora_b", (1, n_embd))):
            name = f"blk.{layer}.attn_q.weight.{suffix}"
            head += string(name) + struct.pack("<I2QIQ", 2, *shape, 0, offset)
            blob = struct.pack(f"<{n_embd}f", *([value] * n_embd))
            blob += b"\0" * (-len(blob) % 32)
            data, offset = data + blob, offset + len(blob)
    path.write_bytes(head + b"\0" * (-len(head) % 32) + data)


async def test_lora_swap_waits_for_running_requests_and_drops_warm_prefixes(
    batched_engine: BatchedEngine, tmp_path: Path
) -> None:
    meta = batched_engine._llm.metadata
    adapter = tmp_path / "adapter.gguf"
    write_lora(adapter, int(meta["llama.block_count"]), int(meta["llama.embedding_length"]), 0.5)
    assert "lora" in batched_engine.features
    base = await batched_engine.chat(QUESTION, GREEDY)
    try:
        # In arrival order: the first request is served by the base model, the one after the
        # swap by the adapter, and the swap drops no queued request.
        before_swap, _, after_swap = await asyncio.gather(
            batched_engine.chat(QUESTION, GREEDY),
            batched_engine.set_adapter(adapter),
            batched_engine.chat(QUESTION, GREEDY),
        )
        await assert_same_or_near_tie(batched_engine, QUESTION, base.text, before_swap.text)
        assert after_swap.text != base.text
    finally:
        await batched_engine.set_adapter(None)
    mark = snapshot(batched_engine)
    restored = await batched_engine.chat(QUESTION, GREEDY)
    await assert_same_or_near_tie(batched_engine, QUESTION, base.text, restored.text)
    assert batched_engine.stats.prompt_tokens_reused == mark.prompt_tokens_reused  # nothing warm survived
    with pytest.raises(EngineError, match="not found"):
        await batched_engine.set_adapter(tmp_path / "missing.gguf")
