"""Helpers the engine benchmarks share: engines on the embedded model, conversations, medians."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from bot.api import Request
from bot.app import Quill
from bot.config import Settings
from bot.engine import ChatMessage
from bot.engine.batched import BatchedEngine
from bot.engine.local import LocalEngine

TOPICS = ["gardening", "chess", "baking", "sailing", "astronomy", "pottery", "cycling", "jazz"]


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--runs", type=int, default=3, help="runs per figure; the median is printed")
    p.add_argument("--threads", type=int, default=2)
    return p


def make_engine(
    mode: str, threads: int, engine_class: type[LocalEngine] | None = None, **overrides: object
) -> LocalEngine:
    """A started engine in `mode` ("single" or "batched") on the embedded model; `engine_class`
    replaces the mode's class (a benchmark's baseline variant).

    Close one before using another: llama.cpp's OpenMP threads belong to the thread that starts
    them (each engine's worker), and with two such teams alive libgomp counts more threads than
    cores and cuts every team's spin-waits short; on 2 cores both engines then decoded 2.4x
    slower (bot/embedder.py)."""
    values: dict[str, object] = {
        "data_dir": Path(tempfile.mkdtemp(prefix="quill-bench-")),
        "n_ctx": 4096,
        "n_threads": threads,
        "seed": 1,
        "_env_file": None,
    }
    values.update(overrides)
    settings = Settings(**values)  # type: ignore[arg-type]
    engine_class = engine_class or (BatchedEngine if mode == "batched" else LocalEngine)
    engine = engine_class(settings)
    engine.start()
    return engine


def conversation(i: int, words: int) -> list[ChatMessage]:
    """The first turn of conversation `i`: a system prompt of about `words` * 1.3 tokens that
    shares no prefix with another conversation's, and one question."""
    topic = TOPICS[i % len(TOPICS)]
    notes = " ".join(f"Note {n} on {topic}: keep it simple and friendly." for n in range(words // 8))
    return [
        ChatMessage("system", f"Conversation {i}. You help with {topic}. {notes}"),
        ChatMessage("user", f"Give me one tip about {topic}."),
    ]


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine_note() -> str:
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} CPU cores, load average {load:.1f} at the end (other jobs share the machine)"


# -- the whole bot (router, plugins, memory) rather than the engine alone -------------------


def bench_settings(**overrides: object) -> Settings:
    """Greedy decoding on the embedded model, a throw-away SQLite file."""
    values: dict[str, object] = {
        "data_dir": Path(tempfile.mkdtemp(prefix="quill-bench-")),
        "n_ctx": 4096,
        "n_threads": 2,
        "temperature": 0.0,
        "seed": 1,
        "_env_file": None,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


async def start_app(settings: Settings) -> Quill:
    return await Quill.start(settings)


async def bot_reply(app: Quill, request: Request) -> AsyncIterator[str]:
    """The bot's answer as a stream, the routing and storing before generation included."""
    reply = await app.router.handle(request)
    if reply.stream is None:
        raise RuntimeError(f"no streamed reply: {reply.text}")
    async for piece in reply.stream:
        yield piece


async def timed(pieces: AsyncIterator[str]) -> tuple[str, float, float]:
    """Consume a stream: (text, seconds to first piece, seconds in all)."""
    start = time.perf_counter()
    first = None
    parts = []
    async for piece in pieces:
        if first is None:
            first = time.perf_counter() - start
        parts.append(piece)
    total = time.perf_counter() - start
    return "".join(parts), first if first is not None else total, total
