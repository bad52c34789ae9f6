"""Retrieval quality and speed of the knowledge base, on the shipped evaluation set.

    python -m bench.retrieval [--cjk jieba|bigram] [--passages 10000]

The set (bench/data/retrieval/) is six documents written for the project (three Chinese, three
English; one FAQ of each) and questions.jsonl: per language, keyword questions (the document's
words), paraphrases (other words), FAQ questions, and off-topic questions with no answer. A
question is answered when a hit is the passage under its expected heading of its expected
document.

Prints, per language and question type: recall@1, recall@4, MRR (hits shown at the relevance
floor in force), the zero-hit rate on answerable questions and the false-hit rate on
off-topic ones; a sweep of the floor (QUILL_QA_MIN_RELEVANCE) to choose it; then indexing
throughput and query latency p50/p95 with `--passages` passages stored.

Only the lexical retriever exists today (bot/search.py); semantic and hybrid rows are printed
as not available until an embedder lands.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bot import textindex
from bot.config import Settings
from bot.memory import Memory
from bot.search import Hit, Search, relevant

DATA = Path(__file__).parent / "data" / "retrieval"
PLACE = ("bench", "g1", "help")
TOP = 4
FLOORS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


@dataclass(frozen=True)
class Question:
    lang: str
    type: str
    question: str
    doc: str
    heading: str


def load_questions() -> list[Question]:
    lines = (DATA / "questions.jsonl").read_text(encoding="utf-8").splitlines()
    return [Question(**json.loads(line)) for line in lines if line.strip()]


async def index_documents(search: Search) -> int:
    count = 0
    for path in sorted(DATA.glob("*.md")):
        count += await search.add_document(*PLACE, path.stem, path.read_text(encoding="utf-8"))
    return count


def rank_of(q: Question, hits: list[Hit]) -> int | None:
    """1-based rank of the expected passage among the document hits, None if absent."""
    docs = [h for h in hits if h.kind == "doc"]
    return next((i for i, h in enumerate(docs, 1) if h.name == q.doc and h.heading == q.heading), None)


def report(questions: list[Question], results: list[list[Hit]], floor: float) -> None:
    """The quality table at relevance floor `floor`."""
    groups: dict[tuple[str, str], list[tuple[Question, list[Hit]]]] = defaultdict(list)
    for q, hits in zip(questions, results, strict=True):
        kept = relevant(hits, floor)
        groups[(q.lang, q.type)].append((q, kept))
        if q.type != "off-topic":
            groups[(q.lang, "all answerable")].append((q, kept))
    print(f"\nlexical retrieval at floor {floor:.2f} (CJK: {textindex.CJK_MODE})")
    print("| lang | type | n | recall@1 | recall@4 | MRR | zero-hit | false-hit |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (lang, kind), rows in sorted(groups.items()):
        n = len(rows)
        if kind == "off-topic":
            false_hits = sum(1 for _, hits in rows if hits) / n
            print(f"| {lang} | {kind} | {n} | | | | | {false_hits:.2f} |")
            continue
        ranks = [rank_of(q, hits) for q, hits in rows]
        r1 = sum(1 for r in ranks if r == 1) / n
        r4 = sum(1 for r in ranks if r is not None and r <= TOP) / n
        mrr = sum(1 / r for r in ranks if r is not None) / n
        zero = sum(1 for _, hits in rows if not hits) / n
        print(f"| {lang} | {kind} | {n} | {r1:.2f} | {r4:.2f} | {mrr:.2f} | {zero:.2f} | |")
    print("| (all) | semantic, hybrid | | not available: no embedder yet | | | | |")


def sweep(questions: list[Question], results: list[list[Hit]]) -> None:
    """Zero-hit rate (answerable) against false-hit rate (off-topic) per floor, per language."""
    print("\nrelevance floor sweep (QUILL_QA_MIN_RELEVANCE)")
    print("| floor | zh recall@4 | zh zero-hit | zh false-hit | en recall@4 | en zero-hit | en false-hit |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for floor in FLOORS:
        cells = []
        for lang in ("zh", "en"):
            pairs = [(q, relevant(r, floor)) for q, r in zip(questions, results, strict=True)]
            answerable = [(q, h) for q, h in pairs if q.lang == lang and q.type != "off-topic"]
            off = [h for q, h in pairs if q.lang == lang and q.type == "off-topic"]
            r4 = sum(1 for q, h in answerable if (r := rank_of(q, h)) is not None and r <= TOP)
            cells += [
                f"{r4 / len(answerable):.2f}",
                f"{sum(1 for _, h in answerable if not h) / len(answerable):.2f}",
                f"{sum(1 for h in off if h) / len(off):.2f}",
            ]
        print(f"| {floor:.2f} | " + " | ".join(cells) + " |")


def filler_passages(n: int, seed: int = 7) -> list[str]:
    """`n` passages of shuffled sentences from the evaluation documents (both languages), so the
    index and its term statistics grow like a real team's."""
    sentences = [
        s.strip()
        for path in DATA.glob("*.md")
        for s in path.read_text(encoding="utf-8").replace("。", "。\n").replace(". ", ".\n").splitlines()
        if len(s.strip()) > 8 and not s.startswith("#")
    ]
    rng = random.Random(seed)
    return ["\n\n".join(rng.sample(sentences, 4)) for _ in range(n)]


async def speed(search: Search, questions: list[Question], passages: int) -> None:
    per_doc = 100
    texts = filler_passages(passages)
    start = time.perf_counter()
    for i in range(0, passages, per_doc):
        body = "\n\n".join(f"## Part {j}\n\n{t}" for j, t in enumerate(texts[i : i + per_doc]))
        await search.add_document(*PLACE, f"filler-{i // per_doc}", body)
    elapsed = time.perf_counter() - start
    print(f"\nindexing: {passages} passages in {elapsed:.1f} s = {passages / elapsed * 60:,.0f} passages/min")
    timings = []
    for q in questions * 2:
        start = time.perf_counter()
        await search.search(q.question, *PLACE, TOP)
        timings.append((time.perf_counter() - start) * 1000)
    timings.sort()
    p95 = timings[int(len(timings) * 0.95) - 1]
    print(f"query latency at {passages:,} passages: p50 {statistics.median(timings):.1f} ms, p95 {p95:.1f} ms")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cjk", choices=["jieba", "bigram"], default="jieba", help="how Han text is segmented")
    p.add_argument("--passages", type=int, default=10_000, help="passages stored for the speed figures (0: skip)")
    args = p.parse_args()
    textindex.CJK_MODE = args.cjk
    floor = Settings(_env_file=None).qa_min_relevance  # type: ignore[call-arg]
    with tempfile.TemporaryDirectory() as scratch:
        memory = Memory.open(f"sqlite:///{scratch}/bench.db")
        search = Search(memory.engine)
        await index_documents(search)
        questions = load_questions()
        results = [await search.search(q.question, *PLACE, 10) for q in questions]
        report(questions, results, floor)
        sweep(questions, results)
        if args.passages:
            await speed(search, questions, args.passages)
        memory.close()


if __name__ == "__main__":
    asyncio.run(main())
