"""Admin panel speed: page render time with a large database, and what serving the panel costs
the bot's replies, measured in one run.

    python -m bench.web [--passages 10000] [--messages 100000] [--renders 30] [--replies 3] [--runs 4]

Targets: every page's p95 <= 200 ms with 10,000 passages and 100,000 stored messages; replies
run at >= 0.97x their rate while a browser tab reloads a panel page every second (phases alternate
without/with, then with/without, on the same engine, so a drift of the machine's load hits both alike).
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import httpx
from sqlalchemy import insert

from bench.common import bench_settings, bot_reply, machine_note, start_app, timed
from bot.api import Request
from bot.app import Quill
from bot.metrics import percentile
from bot.models import Conversation, FinetuneRun, KnowledgeChunk, KnowledgeDoc, Message
from bot.textindex import index_text
from bot.web.app import Panel
from bot.web.server import serving

GUILD = "900000000000000001"
SPACE = f"discord-{GUILD}"
CHANNELS = 20
TOPICS = ["deploy", "release", "backup", "review", "budget", "holiday", "server", "meeting", "部署", "会议"]


def text_of(i: int) -> str:
    """A message or passage: words of a 3,000-word vocabulary (each in a small share of the rows,
    as in real chat), and one of the topic words in one row out of ten."""
    words = " ".join(f"w{(i * k * 7919) % 3000}" for k in range(1, 9))
    topic = f" about the {TOPICS[(i // 10) % len(TOPICS)]}" if i % 10 == 0 else ""
    return f"Note {i}: {words}{topic}."


def seed(quill: Quill, passages: int, messages: int) -> None:
    """Bulk rows straight into the tables (the FTS triggers index them): passages in documents of
    50, messages over 20 channels and the last 30 days."""
    engine = quill.memory.engine
    terms: dict[str, str] = {}

    def indexed(body: str) -> str:
        if body not in terms:
            terms[body] = index_text(body)
        return terms[body]

    now = datetime.now(UTC)
    with engine.begin() as conn:
        conversations = [
            conn.execute(
                insert(Conversation).values(
                    transport="discord", guild_id=GUILD, channel_id=f"channel-{c}", created_at=now
                )
            ).inserted_primary_key[0]
            for c in range(CHANNELS)
        ]
        docs = max(1, passages // 50)
        for d in range(docs):
            doc_id = conn.execute(
                insert(KnowledgeDoc).values(
                    transport="discord", guild_id=GUILD, channel_id="", name=f"doc-{d}.md", created_at=now
                )
            ).inserted_primary_key[0]
            rows = [
                {"doc_id": doc_id, "position": p, "content": text_of(d * 50 + p), "heading": f"Part {p}", "terms": ""}
                for p in range(passages // docs)
            ]
            for row in rows:
                row["terms"] = indexed(row["content"])
            conn.execute(insert(KnowledgeChunk), rows)
        batch = []
        for i in range(messages):
            body = text_of(i)
            batch.append(
                {
                    "conversation_id": conversations[i % CHANNELS],
                    "author_id": f"user-{i % 50}",
                    "author_name": f"user {i % 50}",
                    "role": "user",
                    "content": body,
                    "token_count": 12,
                    "created_at": now - timedelta(seconds=i * 26),  # 100,000 over ~30 days
                    "terms": indexed(body),
                }
            )
            if len(batch) == 5000:
                conn.execute(insert(Message), batch)
                batch = []
        if batch:
            conn.execute(insert(Message), batch)
        conn.execute(
            insert(FinetuneRun).values(
                status="deployed",
                base_model="m",
                dataset_path="d",
                dataset_sha256="0" * 64,
                n_train=40,
                n_heldout=8,
                note="",
                created_at=now,
                figures='{"losses": [' + ", ".join(f"{2.5 - i / 100:.2f}" for i in range(200)) + "]}",
            )
        )


PAGES = [
    "/",
    f"/s/{SPACE}/settings?channel=channel-0",
    f"/s/{SPACE}/conversations?channel=channel-0",
    f"/s/{SPACE}/conversations?channel=channel-0&q=deploy+budget",
    f"/s/{SPACE}/qa/kb",
    f"/s/{SPACE}/qa/kb?doc=doc-7.md",
    f"/s/{SPACE}/qa/search?q=when+is+the+deploy+review",
    f"/s/{SPACE}/schedule/schedules",
    f"/s/{SPACE}/finetune/runs",
    f"/s/{SPACE}/finetune/runs?run=1",
    f"/s/{SPACE}/privacy/privacy",
]


async def render_times(panel: Panel, renders: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {page: [] for page in PAGES}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=panel.app()), base_url="http://panel") as client:
        link = urlsplit(panel.login_link())
        assert (await client.get(f"{link.path}?{link.query}")).status_code == 303
        for page in PAGES:
            assert (await client.get(page)).status_code == 200, page  # warm-up (template compile, caches)
        for _ in range(renders):
            for page in PAGES:
                start = time.perf_counter()
                response = await client.get(page)
                times[page].append(time.perf_counter() - start)
                assert response.status_code == 200, page
    return times


def refresher(base: str, link: str, stop: threading.Event, counts: list[int]) -> None:
    """A browser tab in another thread, reloaded every second: the overview, then a server's
    conversations, then its knowledge base, in turn."""
    pages = ("/", f"/s/{SPACE}/conversations?channel=channel-0", f"/s/{SPACE}/qa/kb")
    with httpx.Client(timeout=30) as client:
        client.get(link)
        while not stop.is_set():
            page = pages[counts[0] % len(pages)]
            assert client.get(base + page).status_code == 200, page
            counts[0] += 1
            stop.wait(1.0)


async def reply_rate(quill: Quill, replies: int, phase: int) -> float:
    """Pieces per second over `replies` conversations answered one after another."""
    pieces, seconds = 0, 0.0
    for i in range(replies):
        request = Request("console", f"bench-{phase}-{i}", "u", f"Question {phase}.{i}: name three uses of a wiki.")
        text, _first, total = await timed(bot_reply(quill, request))
        pieces += max(1, len(text.split()))
        seconds += total
    return pieces / seconds


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--passages", type=int, default=10_000)
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--renders", type=int, default=30)
    p.add_argument("--replies", type=int, default=3)
    p.add_argument("--runs", type=int, default=4, help="pairs of reply phases, without/with the panel (ABBA)")
    args = p.parse_args()
    port = 18765
    settings = bench_settings(embeddings=False, max_reply_tokens=64, web_port=port)
    quill = await start_app(settings)
    try:
        start = time.perf_counter()
        await asyncio.to_thread(seed, quill, args.passages, args.messages)
        print(
            f"seeded {args.passages:,} passages and {args.messages:,} messages in {time.perf_counter() - start:.1f} s"
        )
        times = await render_times(Panel(quill, live=True, port=port), args.renders)
        worst = 0.0
        print(f"page render over {args.renders} requests each (httpx in-process, ms): p50  p95")
        for page, values in times.items():
            p50, p95 = percentile(values, 0.5) or 0.0, percentile(values, 0.95) or 0.0
            worst = max(worst, p95)
            print(f"  {page:60s} {p50 * 1000:6.1f} {p95 * 1000:6.1f}")
        print(f"worst page p95: {worst * 1000:.1f} ms (target <= 200 ms): {'PASS' if worst <= 0.2 else 'FAIL'}")

        async with serving(quill) as panel:
            assert panel is not None
            without, with_panel, loads = [], [], [0]
            await reply_rate(quill, 1, -1)  # warm the engine
            for run in range(args.runs):
                # ABBA order: a drift of the machine's load over the run weighs on both sides alike.
                for with_it in (False, True) if run % 2 == 0 else (True, False):
                    if not with_it:
                        without.append(await reply_rate(quill, args.replies, 2 * run + with_it))
                        continue
                    stop = threading.Event()
                    thread = threading.Thread(target=refresher, args=(panel.base_url, panel.login_link(), stop, loads))
                    thread.start()
                    try:
                        with_panel.append(await reply_rate(quill, args.replies, 2 * run + with_it))
                    finally:
                        stop.set()
                        await asyncio.to_thread(thread.join)
        print("  per phase, without: " + ", ".join(f"{r:.2f}" for r in without))
        print("  per phase, with:    " + ", ".join(f"{r:.2f}" for r in with_panel))
        rate_without, rate_with = sum(without) / len(without), sum(with_panel) / len(with_panel)
        ratio = rate_with / rate_without
        print(
            f"replies (words/s): without the panel {rate_without:.1f}, with it refreshed every second "
            f"{rate_with:.1f} ({loads[0]} page loads): {ratio:.3f}x (target >= 0.97): "
            + ("PASS" if ratio >= 0.97 else "FAIL")
        )
        print(machine_note())
    finally:
        await quill.close()


if __name__ == "__main__":
    asyncio.run(main())
