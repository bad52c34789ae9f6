"""Why QUILL_FLASH_ATTN is on by default: the batched engine with llama.cpp's fused attention
kernel against the unfused one, taking turns run by run in one invocation, on
- one user asking 8 short prompts one after another (64-token replies): tokens/s;
- 8 users at once, the same prompts: aggregate tokens/s;
- a new conversation with a ~1,500-token system prompt: seconds to first token (prompt
  evaluation).
Both engines get the same prompts in a run, new to them (their first words name the run), so
no saved state serves them. One engine is loaded at a time: two engines' worker threads in one
process slow both (see `bench.common.make_engine`).

    python -m bench.flash_attn [--runs 3]
"""

from __future__ import annotations

import asyncio
import time

from bench.common import TOPICS, conversation, machine_note, make_engine, median, parser
from bot.engine import ChatMessage, GenerationOptions
from bot.engine.local import LocalEngine

REPLY = GenerationOptions(max_tokens=64, temperature=0.7)
FIRST_TOKEN = GenerationOptions(max_tokens=1, temperature=0.0)


async def reply_tokens(engine: LocalEngine, messages: list[ChatMessage]) -> int:
    return (await engine.chat(messages, REPLY)).completion_tokens


async def one_by_one(engine: LocalEngine, prompts: list[list[ChatMessage]]) -> float:
    start = time.perf_counter()
    tokens = [await reply_tokens(engine, p) for p in prompts]
    return sum(tokens) / (time.perf_counter() - start)


async def together(engine: LocalEngine, prompts: list[list[ChatMessage]]) -> float:
    start = time.perf_counter()
    tokens = await asyncio.gather(*(reply_tokens(engine, p) for p in prompts))
    return sum(tokens) / (time.perf_counter() - start)


async def long_prompt(engine: LocalEngine, messages: list[ChatMessage]) -> float:
    start = time.perf_counter()
    await engine.chat(messages, FIRST_TOKEN)
    return time.perf_counter() - start


async def main() -> None:
    args = parser(__doc__ or "").parse_args()
    figures: dict[tuple[str, bool], list[float]] = {}
    history = 0
    for run in range(args.runs):
        short = [[ChatMessage("user", f"Run {run}: write a long story about {topic}.")] for topic in TOPICS]
        long = conversation(run, 1150)
        for fa in (True, False) if run % 2 == 0 else (False, True):
            engine = make_engine("batched", args.threads, flash_attn=fa)
            try:
                history = await engine.count_tokens(long[0].content)
                measured = {
                    "one user, 8 prompts one after another: tok/s": await one_by_one(engine, short),
                    "8 users at once: aggregate tok/s": await together(engine, short),
                    "a new long prompt: first token s": await long_prompt(engine, long),
                }
                for name, value in measured.items():
                    figures.setdefault((name, fa), []).append(value)
                print(f"run {run} flash attention {'on' if fa else 'off'}: {measured}", flush=True)
            finally:
                await engine.close()
    print(
        f"SmolLM2-135M Q4_1, batched engine (pool), {args.threads} threads, long prompt {history} tokens, "
        f"{args.runs} runs (medians)"
    )
    for name in dict.fromkeys(n for n, _ in figures):
        on, off = median(figures[(name, True)]), median(figures[(name, False)])
        runs = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(figures[(name, True)], figures[(name, False)], strict=True))
        print(f"{name:46s} on {on:8.2f}  off {off:8.2f}  on/off {on / off:5.2f}x  (runs on/off: {runs})")
    print(machine_note())


if __name__ == "__main__":
    asyncio.run(main())
