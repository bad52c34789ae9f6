"""Warm follow-up: time to first token of a conversation's second turn against its first.

The first turn carries a long pasted text (~700 tokens), so its prefill dominates; the second
turn should evaluate only its new tokens, the shared prefix (system prompt + history) being
reused from the model's cache.

    python -m bench.warm_followup [--runs 5]

Target: second / first <= 0.3.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from bench.common import bench_settings, bot_reply, machine_note, median, start_app, timed
from bot.api import Request

PASTE = "Here are our release notes, please keep them in mind. " + " ".join(
    f"Item {n}: change {n} fixes a bug in module {n % 7} and adds a test." for n in range(40)
)


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    app = await start_app(bench_settings(max_reply_tokens=16))
    firsts, seconds = [], []
    for i in range(args.runs):
        place = {"transport": "bench", "channel_id": f"conv{i}", "author_id": "bench"}
        turns = []
        for text in (f"Run {i}. {PASTE}", "Which module does item 3 touch?"):
            _, ttft, _ = await timed(bot_reply(app, Request(text=text, **place)))
            turns.append(ttft)
        firsts.append(turns[0])
        seconds.append(turns[1])
    tokens = await app.engine.count_tokens(PASTE)
    await app.close()
    print(f"machine: {machine_note()}; first turn ~{tokens} tokens of pasted text; runs: {args.runs}")
    print(f"TTFT first turn:  {median(firsts) * 1000:8.1f} ms (median)")
    print(f"TTFT second turn: {median(seconds) * 1000:8.1f} ms (median)")
    print(f"ratio second/first: {median(seconds) / median(firsts):.3f}  (target <= 0.3)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
