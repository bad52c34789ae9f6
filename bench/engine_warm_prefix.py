"""Warm follow-up time to first token with interleaved conversations, against cold.

Eight conversations each send a first turn (cold: the whole history is evaluated), then each
sends a second turn in the same order, so every follow-up comes after the seven others ran.
Batched mode saves each conversation's state in host memory and restores it; single mode (the
baseline, same run) has only `Llama`'s one context, which the other conversations overwrote.

    python -m bench.engine_warm_prefix [--runs 3] [--words 640] [--modes batched,single]
"""

from __future__ import annotations

import asyncio
import time

from bench.common import conversation, machine_note, make_engine, median, parser
from bot.engine import ChatMessage, GenerationOptions

OPTIONS = GenerationOptions(max_tokens=16, temperature=0.0)


async def first_token(engine, messages: list[ChatMessage]) -> tuple[float, str]:
    """Seconds to the first piece of the reply, and the whole reply."""
    start, ttft, pieces = time.perf_counter(), None, []
    async for piece in engine.stream(messages, OPTIONS):
        ttft = ttft if ttft is not None else time.perf_counter() - start
        pieces.append(piece)
    return ttft or time.perf_counter() - start, "".join(pieces)


async def one_mode(mode: str, runs: int, words: int, threads: int) -> dict[str, float]:
    engine = make_engine(mode, threads)
    cold, warm, history = [], [], 0
    try:
        for run in range(runs):
            talks = [conversation(run * 8 + i, words) for i in range(8)]
            history = await engine.count_tokens(talks[0][0].content)
            replies = []
            for talk in talks:
                seconds, reply = await first_token(engine, talk)
                cold.append(seconds)
                replies.append(reply)
            for talk, reply in zip(talks, replies, strict=True):
                follow = [*talk, ChatMessage("assistant", reply), ChatMessage("user", "Another one?")]
                warm.append((await first_token(engine, follow))[0])
        stats = getattr(engine, "stats", None)
        cache_mb = stats.warm_bytes / 2**20 if stats else 0.0
        warm_tokens = stats.warm_tokens if stats else 0
    finally:
        await engine.close()
    return {
        "history": history,
        "cold": median(cold),
        "warm": median(warm),
        "cache_mb": cache_mb,
        "warm_tokens": warm_tokens,
    }


async def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--words", type=int, default=640, help="system prompt size (~1.5 tokens a word)")
    p.add_argument("--modes", default="batched,single")
    args = p.parse_args()
    results = {}
    for mode in args.modes.split(","):
        results[mode] = r = await one_mode(mode, args.runs, args.words, args.threads)
        print(
            f"{mode:8s} history ~{r['history']} tokens: cold TTFT {r['cold']:.2f} s, "
            f"follow-up after 7 others {r['warm']:.3f} s = {r['warm'] / r['cold']:.3f}x cold "
            f"(median of {args.runs * 8})"
        )
        if mode == "batched":
            print(
                f"         saved states: {r['warm_tokens']} tokens = {r['cache_mb']:.1f} MB of host memory "
                f"(QUILL_BATCH_CACHE_MB bounds it)"
            )
    if {"batched", "single"} <= results.keys():
        ratio = results["batched"]["warm"] / results["single"]["warm"]
        print(f"follow-up TTFT batched / single: {ratio:.3f}x")
    print(machine_note())


if __name__ == "__main__":
    asyncio.run(main())
