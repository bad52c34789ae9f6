"""Per-token Python cost of the batched worker: incremental detokenizing against the old way.

Before #21, `_on_token` detokenized the whole completion again on every token and searched all
of it for stop strings: quadratic in the reply's length. The baseline engine below adds exactly
that work back on top of today's path, so both run in the same process, alternating run by run,
with 8 users and replies of 64 and 512 tokens (temperature 0.7, stories that rarely stop early).

    python -m bench.token_overhead [--runs 3] [--lengths 64,512]
"""

from __future__ import annotations

import asyncio
import datetime

from bench.common import machine_note, make_engine, median, parser
from bench.engine_throughput import USERS, counted
from bot.engine import GenerationOptions
from bot.engine.batched import BatchedEngine, _Sequence


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
    try:
        for _ in range(args.runs):
            for length in (int(n) for n in args.lengths.split(",")):
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
