"""How /summarize scales: model calls, tokens and time against the number of messages, with the
calls of each step one after another (sequential) and together (concurrent, QUILL_BATCH_STREAMS).

Seeds a scratch SQLite database with up to the largest size of made-up team chat, then
summarizes the newest N messages for each size with the configured model (QUILL_* settings
apply), once each way in the same run, on the same batched engine, each starting with no saved
conversation state. The engine's own accounting splits the time between prompt evaluation and
generation. Model calls per 1,000 messages should stay flat: map-reduce is linear.

    python -m bench.summarize_scaling                     # 500, 1000, 2000, 5000 messages
    python -m bench.summarize_scaling --sizes 200,400     # smaller, faster
    python -m bench.summarize_scaling --plan-only         # chunking only, no generation
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bot.app import Quill
from bot.config import Settings
from bot.engine.batched import BatchedEngine
from plugins.summarize import Summarizer, SummarizeSettings, log_lines

COLUMNS = (
    "messages",
    "tokens",
    "chunks",
    "merges",
    "calls",
    "calls/1k",
    "way",
    "seconds",
    "prompt s",
    "gen s",
    "gen tok",
)
NAMES = ("Ada", "Bea", "Cy", "Dev", "Eli")
SAYINGS = (
    "I pushed the fix for the login timeout, can someone review it?",
    "We agreed to ship the release on Thursday after the QA pass.",
    "Who owns the flaky payment test? It failed three times today.",
    "Reminder: the design review moved to 3pm, same room.",
    "Should we drop support for the old API version next quarter?",
    "The staging database is full again; I cleaned the old snapshots.",
    "Thanks, the new dashboard numbers look right to me.",
)


@dataclass
class Timing:
    seconds: float
    prompt: float
    generation: float
    tokens: int


async def timed(app: Quill, lines: list[str], concurrency: int) -> tuple[Summarizer, Timing]:
    """One summary, from no saved state, and what it cost on the engine's side."""
    engine = app.engine
    batched = isinstance(engine, BatchedEngine)
    if batched:
        await engine.forget_states(None)
        before = (engine.stats.prompt_seconds, engine.stats.generation_seconds, engine.stats.tokens_generated)
    summarizer = Summarizer(app.context, concurrency=concurrency)
    started = time.perf_counter()
    await summarizer.run(lines)
    seconds = time.perf_counter() - started
    if not batched:
        return summarizer, Timing(seconds, 0.0, 0.0, 0)
    s = engine.stats
    return summarizer, Timing(
        seconds, s.prompt_seconds - before[0], s.generation_seconds - before[1], s.tokens_generated - before[2]
    )


async def run(sizes: list[int], plan_only: bool) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings(data_dir=Path(scratch), temperature=0.0, seed=1)
        app = await Quill.start(settings)
        config = app.context.config(SummarizeSettings)
        config.max_messages = max(sizes)
        try:
            conv = await app.memory.conversation("bench", "", "team")
            assert conv.id is not None
            started = time.perf_counter()
            for i in range(max(sizes)):
                name = NAMES[i % len(NAMES)]
                await app.memory.add_message(
                    conv.id,
                    role="user",
                    content=f"{SAYINGS[i * 3 % len(SAYINGS)]} (#{i})",
                    author_id=name,
                    author_name=name,
                )
            print(f"seeded {max(sizes)} messages in {time.perf_counter() - started:.1f} s")
            print(
                f"model {settings.model_path.name}, n_ctx {app.engine.n_ctx}, chunk tokens "
                f"{config.chunk_tokens}, note tokens {config.note_tokens}, engine {settings.engine_mode}, "
                f"{settings.batch_streams} streams, KV {settings.batch_kv}, load average {os.getloadavg()[0]:.1f}"
            )
            print(" ".join(f"{h:>8}" for h in COLUMNS))
            for size in sizes:
                lines = log_lines(await app.memory.recent_messages(conv.id, size))
                if plan_only:
                    summarizer = Summarizer(app.context)
                    _, _, chunks = await summarizer.plan(lines)
                    summarizer.stats.chunks = len(chunks)
                    print(" ".join(f"{v:>8}" for v in figures(summarizer, size)))
                    continue
                results = {}
                for way, concurrency in (("seq", 1), ("conc", settings.batch_streams)):
                    summarizer, timing = await timed(app, lines, concurrency)
                    results[way] = timing
                    row = (
                        *figures(summarizer, size),
                        way,
                        f"{timing.seconds:.1f}",
                        f"{timing.prompt:.1f}",
                        f"{timing.generation:.1f}",
                        timing.tokens,
                    )
                    print(" ".join(f"{v:>8}" for v in row), flush=True)
                seq, conc = results["seq"], results["conc"]
                print(
                    f"{size} messages, concurrent vs sequential: {seq.seconds / conc.seconds:.2f}x faster overall "
                    f"(target >= 1.15x), generation {ratio(seq.generation, conc.generation)} faster "
                    f"(target >= 2x), prompt evaluation {ratio(seq.prompt, conc.prompt)}; "
                    f"load average {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
        finally:
            await app.close()


def figures(summarizer: Summarizer, size: int) -> tuple[object, ...]:
    s = summarizer.stats
    per_1k = 1000 * max(s.calls, s.chunks) / size
    return (size, s.tokens, s.chunks, s.merges, s.calls, f"{per_1k:.1f}")


def ratio(before: float, after: float) -> str:
    return f"{before / after:.2f}x" if after else "n/a (not the batched engine)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,1000,2000,5000", help="comma-separated message counts")
    parser.add_argument("--plan-only", action="store_true", help="count tokens and chunks, no generation")
    args = parser.parse_args()
    asyncio.run(run(sorted(int(s) for s in args.sizes.split(",")), args.plan_only))


if __name__ == "__main__":
    main()
