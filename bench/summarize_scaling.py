"""How /summarize scales: model calls, tokens and time against the number of messages.

Seeds a scratch SQLite database with up to the largest size of made-up team chat, then
summarizes the newest N messages for each size with the configured model (QUILL_* settings
apply). Model calls per 1,000 messages should stay flat: map-reduce is linear.

    python -m bench.summarize_scaling                     # 500, 1000, 2000, 5000 messages
    python -m bench.summarize_scaling --sizes 200,400     # smaller, faster
    python -m bench.summarize_scaling --plan-only         # chunking only, no generation
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bot.app import Quill
from bot.config import Settings
from plugins.summarize import Summarizer, SummarizeSettings, log_lines

COLUMNS = ("messages", "tokens", "chunks", "merges", "calls", "calls/1k", "seconds")
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
                f"{config.chunk_tokens}, note tokens {config.note_tokens}"
            )
            print(" ".join(f"{h:>8}" for h in COLUMNS))
            for size in sizes:
                lines = log_lines(await app.memory.recent_messages(conv.id, size))
                summarizer = Summarizer(app.context)
                started = time.perf_counter()
                if plan_only:
                    _, _, chunks = await summarizer.plan(lines)
                    summarizer.stats.chunks = len(chunks)
                else:
                    await summarizer.run(lines)
                s = summarizer.stats
                per_1k = 1000 * max(s.calls, s.chunks) / size
                row = (
                    size,
                    s.tokens,
                    s.chunks,
                    s.merges,
                    s.calls,
                    f"{per_1k:.1f}",
                    f"{time.perf_counter() - started:.1f}",
                )
                print(" ".join(f"{v:>8}" for v in row))
        finally:
            await app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,1000,2000,5000", help="comma-separated message counts")
    parser.add_argument("--plan-only", action="store_true", help="count tokens and chunks, no generation")
    args = parser.parse_args()
    asyncio.run(run(sorted(int(s) for s in args.sizes.split(",")), args.plan_only))


if __name__ == "__main__":
    main()
