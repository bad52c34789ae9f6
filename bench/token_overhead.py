"""Per-token Python cost of the batched worker: incremental detokenizing against the old way.

Before #21, `_on_token` detokenized the whole completion again on every token and searched all
of it for stop strings: quadratic in the reply's length. The baseline engine below adds exactly
that work back on top of today's path. Two figures, both in the same process:
- the worker's Python time per token, a fixed reply replayed through `_on_token` without the
  model (robust on a loaded machine);
- aggregate tokens/s with 8 users and replies of 64 and 512 tokens (temperature 0.7, stories
  that rarely stop early), the two engines alternating run by run.

    python -m bench.token_overhead [--runs 3] [--lengths 64,512]
"""

from __future__ import annotations

import asyncio
import datetime
import time

from bench.common import machine_note, make_engine, median, parser
from bench.engine_throughput import USERS, counted
from bot.engine import GenerationOptions
from bot.engine.batched import BatchedEngine, _Sequence


class _Silent:
    """Stands in for a request's job: the replay below measures the worker's own work only."""

    def emit(self, kind: str, value: object) -> None:
        pass


def replay_cost(engine: BatchedEngine, length: int, repeats: int = 5) -> float:
    """Microseconds of `_on_token` per token over a `length`-token reply, replayed without the
    model's decode (a fixed English and Chinese text), so the machine's load hardly matters."""
    llm = engine._llm
    text = " ".join(f"Chapter {i}: the cat walked to the harbour. 猫走到了港口，看着船。" for i in range(length))
    tokens = llm.tokenize(text.encode(), False, False)[:length]
    best = float("inf")
    for _ in range(repeats):
        seq = _Sequence(_Silent(), 0, 0, [], [], length + 1, [b"<|im_end|>", b"User:"], None)  # type: ignore[arg-type]
        start = time.perf_counter()
        for token in tokens:
            engine._on_token(seq, token)
        best = min(best, (time.perf_counter() - start) / len(tokens) * 1e6)
    return best


class WholeTextEngine(BatchedEngine):
    """The baseline: what each token cost before, on top of today's path."""

    def _on_token(self, seq: _Sequence, token: int) -> None:
        whole = self._llm.detokenize([*seq.completion, token])
        any(stop in whole for stop in seq.stops)
        super()._on_token(seq, token)


async def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--lengths", default="64,512", help="reply lengths (max_tokens), comma-separated")
    args = p.parse_args()
    engines = {
        "incremental": make_engine("batched", args.threads),
        "whole text": make_engine("batched", args.threads, engine_class=WholeTextEngine),
    }
    rates: dict[tuple[str, int], list[float]] = {}
    lengths = [int(n) for n in args.lengths.split(",")]
    try:
        for length in lengths:
            costs = {name: replay_cost(engine, length) for name, engine in engines.items()}
            print(
                f"worker Python per token, {length}-token reply replayed without decoding: "
                f"incremental {costs['incremental']:.1f} us, whole text {costs['whole text']:.1f} us "
                f"({costs['whole text'] / costs['incremental']:.1f}x less)"
            )
        for engine in engines.values():  # warm-up: the first requests pay for page faults
            await counted(engine, USERS[:2], GenerationOptions(max_tokens=8))
        for _ in range(args.runs):
            for length in lengths:
                options = GenerationOptions(max_tokens=length, temperature=0.7)
                for name, engine in engines.items():
                    wall, users = await counted(engine, USERS, options)
                    rates.setdefault((name, length), []).append(sum(n for _, _, n in users) / wall)
    finally:
        for engine in engines.values():
            await engine.close()
    for (name, length), values in rates.items():
        print(f"{name:12s} {length:4d} tokens, 8 users: {median(values):7.1f} tok/s  (runs: {values})")
    for length in sorted({n for _, n in rates}):
        ratio = median(rates[("incremental", length)]) / median(rates[("whole text", length)])
        print(f"incremental / whole text, {length}-token replies: {ratio:.3f}x")
    print(datetime.date.today().isoformat(), machine_note())


if __name__ == "__main__":
    asyncio.run(main())
