"""In-process engine against the server backend (llama-cpp-python's own OpenAI-compatible server
on 127.0.0.1), same model, prompt and threads, same run: time to first token and decode speed for
one user, then N users at once.

    python -m bench.engine_backends [--runs 3] [--users 8] [--tokens 64]

Each run's prompt starts differently, so no run reuses another's cached prefix (cold TTFT).
The two backends take turns, never generating at the same time. Both models stay loaded
(the server's in its own process), so memory is not what differs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import bench_settings, machine_note, median, start_app, timed
from bot.app import Quill
from bot.engine import ChatMessage, Engine, GenerationOptions

# The scripted and real test servers live with the tests; the bench starts the same real one.
from tests.openai_servers import LlamaCppServer

QUESTIONS = [
    "Explain how a bicycle stays upright.",
    "Write a short note inviting the team to lunch.",
    "What should I pack for a weekend hike?",
    "Give three tips for writing clear emails.",
    "Describe the water cycle in simple words.",
    "How do I make a cup of good tea?",
    "Suggest names for a grey cat.",
    "Why is the sky blue?",
]


def prompt(n: int) -> list[ChatMessage]:
    return [
        ChatMessage("system", f"Session {n}. You are quill, a helpful and friendly assistant."),
        ChatMessage("user", QUESTIONS[n % len(QUESTIONS)]),
    ]


async def one(engine: Engine, n: int, tokens: int) -> tuple[float, float, int]:
    """(seconds to first piece, seconds in all, tokens generated) for prompt n."""
    options = GenerationOptions(max_tokens=tokens, temperature=0.0)
    text, ttft, total = await timed(engine.stream(prompt(n), options))
    return ttft, total, await engine.count_tokens(text)


def decode_rate(results: Sequence[tuple[float, float, int]]) -> float:
    return median([(p - 1) / (total - ttft) for ttft, total, p in results if p > 1 and total > ttft])


async def single(apps: dict[str, Quill], runs: int, tokens: int) -> None:
    """One user at a time, the backends taking turns run by run, so a change in the machine's
    load between runs hits both alike."""
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in apps}
    for i in range(runs + 1):
        for name, app in apps.items():
            result = await one(app.engine, 10 * i + len(results[name]) + 1000 * (name == "server"), tokens)
            if i:  # the first round warms up: first-request costs stay out of the figures
                results[name].append(result)
    for name, runs_ in results.items():
        ttft = median([t for t, _, _ in runs_]) * 1000
        print(f"{name:>10}, 1 user: TTFT {ttft:7.0f} ms, decode {decode_rate(runs_):5.1f} tok/s (medians)")


async def together(name: str, app: Quill, users: int, tokens: int, offset: int) -> None:
    start = time.perf_counter()
    results = await asyncio.gather(*(one(app.engine, offset + u, tokens) for u in range(users)))
    wall = time.perf_counter() - start
    firsts = sorted(t for t, _, _ in results)
    print(
        f"{name:>10}, {users} users at once: TTFT min/median/max {firsts[0]:5.2f}/{median(firsts):5.2f}/"
        f"{firsts[-1]:5.2f} s, all done in {wall:5.1f} s, aggregate {sum(p for _, _, p in results) / wall:5.1f} tok/s"
    )


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    print(f"machine: {machine_note()}; {args.tokens} tokens a reply, greedy")
    settings = bench_settings(n_ctx=2048)
    server = LlamaCppServer(Path(settings.data_dir) / "server.log")
    server.start()
    try:
        remote_settings = bench_settings(
            n_ctx=2048, engine_backend="openai", openai_base_url=server.url, openai_timeout=600
        )
        apps = {"in-process": await start_app(settings), "server": await start_app(remote_settings)}
        await single(apps, args.runs, args.tokens)
        for n, (name, app) in enumerate(apps.items()):
            await together(name, app, args.users, args.tokens, 5000 + 100 * n)
        for app in apps.values():
            await app.close()
    finally:
        server.kill()
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
