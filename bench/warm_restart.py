"""The first turn after a restart: warm (its conversation's state read back from disk) against
cold (the whole history evaluated again), on a console channel with a long history.

Seeds a channel with `--messages` stored messages, has quill answer once (its state is saved),
stops it (the states go to QUILL_DATA_DIR/kv), then for each run starts quill afresh twice on
copies of that data folder, with and without the saved states, and times the next message's
first token through the router (`/chat`, the batched engine, default settings otherwise). Also
times the model file's hash: computed once, then remembered.

    python -m bench.warm_restart                   # 122 messages, English, 3 runs
    python -m bench.warm_restart --language zh --runs 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bot.api import Request
from bot.app import Quill
from bot.config import Settings
from bot.engine.batched import BatchedEngine
from bot.engine.kvstore import state_key

LINES = {
    "en": (
        "I pushed the fix for the login timeout, can someone review it?",
        "We agreed to ship the release on Thursday after the QA pass.",
        "Who owns the flaky payment test? It failed three times today.",
        "Reminder: the design review moved to 3pm, same room.",
        "The staging database is full again; I cleaned the old snapshots.",
    ),
    "zh": (
        "我提交了登录超时的修复，谁能帮忙审查？",
        "我们约定周四测试通过后发布。",
        "支付测试不稳定，今天失败了三次，谁负责？",
        "提醒：设计评审改到下午三点，同一个会议室。",
        "预发布数据库又满了，我清理了旧快照。",
    ),
}
QUESTION = {"en": "So what ships on Thursday?", "zh": "那周四发布什么？"}


def settings_for(folder: Path, disk: bool) -> Settings:
    return Settings(
        data_dir=folder,
        temperature=0.0,
        seed=1,
        max_reply_tokens=16,
        embeddings=False,
        plugin_timeout=3600,  # a cold long history on a loaded machine can take minutes
        batch_disk_mb=2048 if disk else 0,
        _env_file=None,  # type: ignore[call-arg]
    )


def request(text: str) -> Request:
    return Request("console", "bench", "ada", text, author_name="Ada")


async def first_token(folder: Path, text: str, disk: bool) -> tuple[float, float, int]:
    """Start quill on `folder`, ask `text`: seconds to start, seconds to the first piece of the
    reply, prompt tokens the engine reused."""
    started = time.perf_counter()
    app = await Quill.start(settings_for(folder, disk))
    ready = time.perf_counter()
    try:
        reply = await app.router.handle(request(text))
        assert reply.stream is not None, reply.text
        ttft = 0.0
        async for _piece in reply.stream:
            if not ttft:
                ttft = time.perf_counter() - ready
        engine = app.engine
        reused = engine.stats.prompt_tokens_reused if isinstance(engine, BatchedEngine) else 0
        return ready - started, ttft, reused
    finally:
        await app.close()


async def prepare(folder: Path, messages: int, language: str) -> None:
    """A channel with `messages` stored messages, the last one answered (so its state is saved)."""
    app = await Quill.start(settings_for(folder, True))
    try:
        conv = await app.memory.conversation("console", "", "bench")
        assert conv.id is not None
        lines = LINES[language]
        for i in range(messages - 2):
            role = "assistant" if i % 4 == 3 else "user"
            await app.memory.add_message(
                conv.id,
                role=role,
                content=f"{lines[i % len(lines)]} (#{i})",
                author_id="ada" if role == "user" else "quill",
            )
        reply = await app.router.handle(request(lines[0]))
        assert reply.stream is not None, reply.text
        async for _piece in reply.stream:
            pass
    finally:
        await app.close()


def hash_cost(model: Path, scratch: Path) -> tuple[float, float]:
    cache = scratch / "hashes.json"
    started = time.perf_counter()
    state_key(model, None, cache, "bench")
    first = time.perf_counter() - started
    started = time.perf_counter()
    state_key(model, None, cache, "bench")
    return first, time.perf_counter() - started


async def run(messages: int, language: str, runs: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        base = root / "base"
        started = time.perf_counter()
        await prepare(base, messages, language)
        states = list((base / "kv").glob("*/*.qkv"))
        size = sum(p.stat().st_size for p in states) / 2**20
        print(
            f"{messages} messages ({language}) answered once in {time.perf_counter() - started:.1f} s; "
            f"{len(states)} state file(s) on disk, {size:.1f} MB; load average {os.getloadavg()[0]:.1f}"
        )
        model = settings_for(base, True).model_path
        first, again = hash_cost(model, root)
        print(
            f"model hash ({model.stat().st_size / 2**20:.0f} MB): {first:.2f} s computed, "
            f"{again * 1000:.1f} ms remembered"
        )
        warm, cold = [], []
        for i in range(runs):
            for disk in (True, False) if i % 2 == 0 else (False, True):
                folder = root / f"run{i}-{'warm' if disk else 'cold'}"
                shutil.copytree(base, folder, ignore=None if disk else shutil.ignore_patterns("kv"))
                start, ttft, reused = await first_token(folder, QUESTION[language], disk)
                (warm if disk else cold).append(ttft)
                print(
                    f"run {i + 1} {'warm' if disk else 'cold'}: start {start:.1f} s, first token {ttft:.3f} s, "
                    f"{reused} prompt tokens reused; load average {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                shutil.rmtree(folder)
        w, c = statistics.median(warm), statistics.median(cold)
        print(f"first turn after a restart: warm {w:.3f} s vs cold {c:.3f} s: {w / c:.3f}x (target <= 0.1x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=122, help="stored messages in the channel")
    parser.add_argument("--language", choices=sorted(LINES), default="en")
    parser.add_argument("--runs", type=int, default=3, help="runs of each; the medians are compared")
    args = parser.parse_args()
    asyncio.run(run(args.messages, args.language, args.runs))


if __name__ == "__main__":
    main()
