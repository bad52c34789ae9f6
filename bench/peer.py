"""quill's batched engine side by side with llama.cpp's own `llama-server`, same model, threads
and requests, alternating run by run in one invocation, on three workloads:

- (a) 8 users at once, short prompts;
- (b) help-channel replay: conversations sharing a ~500-token system prompt, each history
  growing turn by turn to ~1,500 tokens, turns arriving in a random (seeded) order with 2-4 in
  flight; time to first token p50/p95 and aggregate tokens/s. llama-server keeps each slot's
  prompt and up to 8 GB of others in host memory (`--cache-ram`); quill keeps many
  conversations' states in host memory (512 MB, then disk) and shares the prefix;
- (c) one user alone, asking the 8 short prompts one after another.

Both sides' replies are counted by the same tokenizer (quill's), from their text: a count from
the text can be lower than the tokens generated, and counting one side otherwise would bias the
ratio by as much as the gap it measures.

The server comes from `--server PATH`, or from the cache `bench/build_llama_server.sh` fills
(`--build` runs it: 5 minutes on 2 idle cores, 40+ on busy ones); without either the bench says so and skips.

    python -m bench.peer [--runs 2] [--server PATH | --build] [--conversations 32] [--turns 7]
                         [--kv per-stream|pool] [--loads acb]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import TOPICS, machine_note, make_engine, median, parser
from bot.engine import ChatMessage, GenerationOptions
from bot.engine.local import LocalEngine
from tests.openai_servers import BUILD_SCRIPT, LlamaServer, built_llama_server

SLOTS, SERVER_CTX = 8, 16384  # llama-server --parallel 8 -c 16384: 2,048 tokens a slot


def short_prompts(load: str, run: int) -> list[list[ChatMessage]]:
    """8 short prompts, new in each run and workload: neither side serves them from a cache
    (llama-server keeps up to 8 GB of prompts in host memory, quill 512 MB plus its disk)."""
    return [[ChatMessage("user", f"({load}{run}) Write a long story about {topic}.")] for topic in TOPICS]


# One request's outcome: seconds to first token, the reply's text.
Outcome = tuple[float, str]
Ask = Callable[[list[ChatMessage], GenerationOptions], Awaitable[Outcome]]


async def sse_events(response: httpx.Response) -> AsyncIterator[dict]:
    async for line in response.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def server_asker(client: httpx.AsyncClient, seed: int) -> Ask:
    async def ask(messages: list[ChatMessage], options: GenerationOptions) -> Outcome:
        body = {
            "messages": [m.as_dict() for m in messages],
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
            "seed": seed,
            "stream": True,
        }
        start = time.perf_counter()
        first, parts = None, []
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for event in sse_events(response):
                choices = event.get("choices") or []
                piece = choices[0].get("delta", {}).get("content") if choices else None
                if piece:
                    first = first if first is not None else time.perf_counter() - start
                    parts.append(piece)
        return (first if first is not None else time.perf_counter() - start), "".join(parts)

    return ask


def quill_asker(engine: LocalEngine) -> Ask:
    async def ask(messages: list[ChatMessage], options: GenerationOptions) -> Outcome:
        start = time.perf_counter()
        first, parts = None, []
        async for piece in engine.stream(messages, options):
            first = first if first is not None else time.perf_counter() - start
            parts.append(piece)
        return (first if first is not None else time.perf_counter() - start), "".join(parts)

    return ask


# A workload's outcome: its wall time and each request's outcome.
Run = tuple[float, list[Outcome]]


@dataclass
class Figures:
    wall: float
    firsts: list[float]
    tokens: list[int]

    @classmethod
    async def of(cls, run: Run, engine: LocalEngine) -> Figures:
        """Counted after the run, so counting never competes with it."""
        wall, outcomes = run
        return cls(wall, [first for first, _ in outcomes], [await engine.count_tokens(text) for _, text in outcomes])

    @property
    def rate(self) -> float:
        return sum(self.tokens) / self.wall

    def ttft(self, q: float) -> float:
        values = sorted(self.firsts)
        return values[min(len(values) - 1, int(q * len(values)))]


async def together(ask: Ask, prompts: list[list[ChatMessage]], options: GenerationOptions) -> Run:
    start = time.perf_counter()
    outcomes = await asyncio.gather(*(ask(p, options) for p in prompts))
    return time.perf_counter() - start, list(outcomes)


async def one_by_one(ask: Ask, prompts: list[list[ChatMessage]], options: GenerationOptions) -> Run:
    start = time.perf_counter()
    outcomes = [await ask(p, options) for p in prompts]
    return time.perf_counter() - start, outcomes


# -- (b) the help-channel replay ------------------------------------------------------------


def help_system_prompt() -> str:
    """~500 tokens of a help channel's rules and FAQ, the same for every conversation."""
    rules = [
        f"Rule {i}: be kind, answer the question asked, link the docs page on {topic}, and ask one question back."
        for i, topic in enumerate((TOPICS * 2)[:14])
    ]
    faq = [
        f"FAQ {i}: to reset a {topic} setting, open Settings, pick {topic}, press Reset."
        for i, topic in enumerate(TOPICS)
    ]
    return "You are the help desk of a hobby club's Discord server.\n" + "\n".join(rules + faq)


def help_turns(conversation: int, turns: int) -> list[tuple[str, str]]:
    """(question, canned answer) pairs: the answer goes into the history, so both engines see
    the same prompts whatever they generated; ~130 tokens a turn, ~1,500 tokens by the 7th."""
    topic = TOPICS[conversation % len(TOPICS)]
    out = []
    for t in range(turns):
        question = f"User {conversation}, question {t}: my {topic} setup shows error {100 + t}; what should I try?"
        answer = " ".join(
            f"Step {s}: check the {topic} cable {s}, restart the app, and look at log line {conversation * 10 + s}."
            for s in range(5)
        )
        out.append((question, answer))
    return out


def help_schedule(conversations: int, turns: int, seed: int) -> list[tuple[int, int]]:
    """A random order of (conversation, turn), each conversation's turns in sequence."""
    rng = random.Random(seed)
    left = {c: 0 for c in range(conversations)}
    order = []
    while left:
        c = rng.choice(sorted(left))
        order.append((c, left[c]))
        left[c] += 1
        if left[c] == turns:
            del left[c]
    return order


async def help_replay(ask: Ask, conversations: int, turns: int, seed: int, options: GenerationOptions) -> Run:
    """Replay the schedule: the next turn whose conversation is idle starts whenever fewer than
    a (seeded, redrawn each time) 2-4 requests are in flight."""
    system = help_system_prompt()
    talks = {c: help_turns(c, turns) for c in range(conversations)}
    waiting = help_schedule(conversations, turns, seed)
    rng = random.Random(seed + 1)
    busy: set[int] = set()
    running: dict[asyncio.Task, int] = {}
    outcomes: list[Outcome] = []
    start = time.perf_counter()
    while waiting or running:
        limit = rng.randint(2, 4)
        while len(running) < limit:
            turn = next(((c, t) for c, t in waiting if c not in busy), None)
            if turn is None:
                break
            waiting.remove(turn)
            c, t = turn
            history = [ChatMessage("system", system)]
            for question, answer in talks[c][:t]:
                history += [ChatMessage("user", question), ChatMessage("assistant", answer)]
            history.append(ChatMessage("user", talks[c][t][0]))
            busy.add(c)
            running[asyncio.create_task(ask(history, options))] = c
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            busy.discard(running.pop(task))
            outcomes.append(task.result())
    return time.perf_counter() - start, outcomes


# -- main -----------------------------------------------------------------------------------


def loads(value: str) -> str:
    """`--loads`: workload letters, each once."""
    if not value or set(value) - set("abc") or len(set(value)) != len(value):
        raise argparse.ArgumentTypeError(f"{value!r}: give workloads a, b and c, each at most once (like acb or bc)")
    return value


async def main() -> None:
    p = parser(__doc__ or "")
    p.set_defaults(runs=2)
    p.add_argument("--server", type=Path, help="a llama-server binary (default: the build cache)")
    p.add_argument("--build", action="store_true", help="build llama-server into the cache first (5+ minutes)")
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=7, help="turns per conversation (7: histories to ~1,500 tokens)")
    p.add_argument("--tokens", type=int, default=64, help="reply length for (a) and (c)")
    p.add_argument("--replay-tokens", type=int, default=32, help="reply length for (b)")
    p.add_argument(
        "--kv",
        choices=["per-stream", "pool"],
        default="per-stream",
        help="quill's QUILL_BATCH_KV: per-stream gives its 8 streams 2,048 cells each, llama-server's "
        "memory exactly; pool is the default 128 MB pool shared by all (n_ctx 4,096)",
    )
    p.add_argument("--loads", default="acb", type=loads, help="workloads, in order: any of a, b, c (default acb)")
    args = p.parse_args()
    if args.build:
        subprocess.run(["bash", str(BUILD_SCRIPT)], check=True)
    binary = args.server or built_llama_server()
    if binary is None or not binary.is_file():
        print(
            f"skipped: no llama-server ({args.server or 'none in the build cache'}). Build it once with "
            "`bash bench/build_llama_server.sh` (5 minutes on 2 idle cores, 40+ on busy ones) or `--build`, "
            "or pass --server PATH."
        )
        return
    log_path = Path(f"/tmp/quill-peer-llama-server-{os.getpid()}.log")
    server = LlamaServer(binary, log_path, "--parallel", str(SLOTS), "-c", str(SERVER_CTX), threads=args.threads)
    if args.kv == "per-stream":
        engine = make_engine("batched", args.threads, batch_kv="per-stream", n_ctx=SERVER_CTX // SLOTS)
    else:
        engine = make_engine("batched", args.threads)
    short = GenerationOptions(max_tokens=args.tokens, temperature=0.7)
    replay = GenerationOptions(max_tokens=args.replay_tokens, temperature=0.7)
    figures: dict[tuple[str, str], list[Figures]] = {}

    def workload(load: str, ask: Ask, run: int) -> Awaitable[Run]:
        if load == "a":
            return together(ask, short_prompts(load, run), short)
        if load == "c":
            return one_by_one(ask, short_prompts(load, run), short)
        return help_replay(ask, args.conversations, args.turns, seed=run, options=replay)

    try:
        server.start()
        # A new connection for every request: llama-server offers keep-alive but now and then
        # closes the connection after a streamed reply, and httpx does not send a POST again on
        # a connection found closed ("Server disconnected without sending a response"). quill's
        # openai backend stops reading at [DONE], so it opens a new one after each reply too.
        no_reuse = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.root_url, timeout=600, limits=no_reuse) as client:
            askers = {"quill": quill_asker(engine), "llama-server": server_asker(client, seed=1)}
            for run in range(args.runs):
                order = list(askers.items()) if run % 2 == 0 else list(askers.items())[::-1]
                for name, ask in order:
                    for load in args.loads:
                        fig = await Figures.of(await workload(load, ask, run), engine)
                        figures.setdefault((name, load), []).append(fig)
                        # As it comes, so a run cut short still leaves figures.
                        print(
                            f"run {run} {name} ({load}): {fig.rate:.1f} tok/s, TTFT p95 {fig.ttft(0.95):.2f} s",
                            flush=True,
                        )
    finally:
        await engine.close()
        server.kill()
    report(figures, args)


def report(figures: dict[tuple[str, str], list[Figures]], args: object) -> None:
    def m(name: str, load: str, value: Callable[[Figures], float]) -> float:
        return median([value(f) for f in figures[(name, load)]])

    def line(label: str, load: str, value: Callable[[Figures], float], unit: str) -> None:
        q, s = m("quill", load, value), m("llama-server", load, value)
        runs = ", ".join(
            f"{value(a):.2f}/{value(b):.2f}"
            for a, b in zip(figures[("quill", load)], figures[("llama-server", load)], strict=True)
        )
        print(f"{label:46s} quill {q:8.2f} {unit:5s} llama-server {s:8.2f}  ratio {q / s:5.2f}x  (runs q/s: {runs})")

    print(
        f"SmolLM2-135M Q4_1, {args.threads} threads, llama-server --parallel {SLOTS} -c {SERVER_CTX}, "  # type: ignore[attr-defined]
        f"quill QUILL_BATCH_KV={args.kv}"  # type: ignore[attr-defined]
    )
    lines = {
        "a": [
            ("(a) 8 users, short prompts: aggregate", lambda f: f.rate, "tok/s"),
            ("(a) worst time to first token", lambda f: f.ttft(1.0), "s"),
        ],
        "c": [("(c) one user", lambda f: f.rate, "tok/s")],
        "b": [
            ("(b) help-channel replay: aggregate", lambda f: f.rate, "tok/s"),
            ("(b) time to first token p50", lambda f: f.ttft(0.5), "s"),
            ("(b) time to first token p95", lambda f: f.ttft(0.95), "s"),
        ],
    }
    for load in args.loads:  # type: ignore[attr-defined]
        for label, value, unit in lines[load]:
            line(label, load, value, unit)
    print("targets: (a), (c) ratio >= 1.0; (b) TTFT p95 ratio <= 0.5")
    print(datetime.date.today().isoformat(), machine_note(), f"python {sys.version.split()[0]}")


if __name__ == "__main__":
    asyncio.run(main())
