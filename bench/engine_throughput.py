"""Tokens per second with 8 concurrent users: batched vs single mode vs a raw llama_decode loop.

Every figure is measured in the same run on the same prompts:
- batched engine, 8 users at once; single engine, the same 8 (served one after another);
- the ceiling: a bare low-level loop decoding the same 8 sequences together (no engine);
- one user alone in each mode;
- fairness: each user's completion time against its fair share (its tokens at 1/8 of the
  aggregate rate), and the worst time to first token.
One engine is loaded at a time, and the raw loop runs on the batched engine's worker thread:
llama.cpp computing from two threads of one process slows both (see `bench.common.make_engine`).

    python -m bench.engine_throughput [--runs 3] [--tokens 64]
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import llama_cpp

from bench.common import TOPICS, machine_note, make_engine, median, parser
from bot.engine import ChatMessage, GenerationOptions
from bot.engine.batched import BatchedEngine, _Generate
from bot.engine.contexts import fill_batch, new_context

USERS = [[ChatMessage("user", f"Write a long story about {topic}.")] for topic in TOPICS]


async def counted(engine, prompts, options) -> tuple[float, list[tuple[float, float, int]]]:
    """Wall seconds, and per user: time to first token, time to completion, completion tokens."""
    start = time.perf_counter()

    async def one(messages):
        first, parts = None, []
        async for piece in engine.stream(messages, options):
            first = first if first is not None else time.perf_counter() - start
            parts.append(piece)
        done = time.perf_counter() - start
        return first or done, done, await engine.count_tokens("".join(parts))

    users = await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - start, users


async def raw_ceiling(engine: BatchedEngine, n_tokens: int) -> float:
    """Tokens/s of a bare loop: prefill the 8 prompts, then one greedy token per sequence per
    `llama_decode`, n_tokens steps. Same model, threads and prompts as the engine, on its worker."""

    def work(llm: object) -> Iterator[float]:
        yield raw_loop(engine, n_tokens)

    (rate,) = [rate async for rate in engine._run(work)]
    return rate


def raw_loop(engine: BatchedEngine, n_tokens: int) -> float:
    llm = engine._llm
    prompts = [engine._format(_Generate(tuple(p), GenerationOptions()))[0] for p in USERS]
    ctx = new_context(llm, n_ctx=4096, n_batch=512, n_seq_max=len(prompts))
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    samplers = []
    try:
        start = time.perf_counter()
        last = []
        for s, prompt in enumerate(prompts):
            fill_batch(batch, [(t, i, s, i == len(prompt) - 1) for i, t in enumerate(prompt)])
            assert llama_cpp.llama_decode(ctx, batch) == 0
            chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            samplers.append(chain)
            last.append(llama_cpp.llama_sampler_sample(chain, ctx, len(prompt) - 1))
        pos = [len(p) for p in prompts]
        for _ in range(n_tokens - 1):
            fill_batch(batch, [(last[s], pos[s], s, True) for s in range(len(prompts))])
            assert llama_cpp.llama_decode(ctx, batch) == 0
            for s in range(len(prompts)):
                last[s] = llama_cpp.llama_sampler_sample(samplers[s], ctx, s)
                pos[s] += 1
        return len(prompts) * n_tokens / (time.perf_counter() - start)
    finally:
        for chain in samplers:
            llama_cpp.llama_sampler_free(chain)
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


async def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--tokens", type=int, default=64, help="reply length (max_tokens)")
    args = p.parse_args()
    options = GenerationOptions(max_tokens=args.tokens, temperature=0.7)
    figures: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    for _ in range(args.runs):
        for name in ("batched", "single"):
            engine = make_engine(name, args.threads)
            try:
                wall, users = await counted(engine, USERS, options)
                rate = sum(n for _, _, n in users) / wall
                add(f"{name} 8 users tok/s", rate)
                add(f"{name} worst TTFT s", max(first for first, _, _ in users))
                # Fair share: when a user's reply would be done if the aggregate rate were split
                # evenly among the users (processor sharing).
                fair = [d / (n * len(users) / rate) for _, d, n in users]
                add(f"{name} worst completion / fair share", max(fair))
                wall1, (alone,) = await counted(engine, USERS[:1], options)
                add(f"{name} 1 user tok/s", alone[2] / wall1)
                if isinstance(engine, BatchedEngine):
                    add("raw loop 8 sequences tok/s", await raw_ceiling(engine, args.tokens))
            finally:
                await engine.close()
    for name, values in figures.items():
        print(f"{name:40s} {median(values):8.2f}   (runs: {', '.join(f'{v:.2f}' for v in values)})")
    m = {k: median(v) for k, v in figures.items()}
    print(f"batched / single, 8 users:  {m['batched 8 users tok/s'] / m['single 8 users tok/s']:.2f}x")
    print(f"batched / raw loop ceiling: {m['batched 8 users tok/s'] / m['raw loop 8 sequences tok/s']:.2f}x")
    print(f"batched / single, 1 user:   {m['batched 1 user tok/s'] / m['single 1 user tok/s']:.2f}x")
    print(machine_note())


if __name__ == "__main__":
    asyncio.run(main())
