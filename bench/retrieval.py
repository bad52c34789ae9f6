"""Retrieval quality and speed of the knowledge base, on the shipped evaluation set.

    python -m bench.retrieval [--cjk jieba|bigram] [--passages 10000] [--questions all|tune|holdout]

The set (bench/sets/retrieval/) is six documents written for the project (three Chinese, three
English; one FAQ of each) and questions.jsonl: per language, keyword questions (the document's
words), paraphrases (other words), FAQ questions, and off-topic questions with no answer. A
question is answered when a hit is the passage under its expected heading of its expected
document.

Prints, per language and question type: recall@1, recall@4, MRR (hits shown at the relevance
floor in force), the zero-hit rate on answerable questions and the false-hit rate on
off-topic ones; a sweep of the floor (QUILL_QA_MIN_RELEVANCE) to choose it; then indexing
throughput and query latency p50/p95 with `--passages` passages stored.

Three retrievers: lexical (bot/search.py's BM25 and relevance), semantic only (the embedder in
force, QUILL_EMBEDDING_MODEL / QUILL_EMBEDDING_MODEL_PATH, with weight 1 in both languages) and
hybrid (the per-language weights in force); `--no-embeddings` skips the last two. Query latency
with embeddings is measured on 10,000 stored vectors, those of the filler passages being random
unit vectors (the search's arithmetic is the same, and each question is embedded for real),
because embedding 10,000 passages on 2 cores takes long; embedding throughput is measured on its
own.

`--questions tune` keeps the questions of every other answer section (and every other off-topic
question), `holdout` the rest: choose settings on one half, check them on the other.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from sqlalchemy import text

from bot import textindex
from bot.config import Settings
from bot.embedder import local_embedder
from bot.memory import Memory
from bot.search import Hit, Retrieval, Search, Semantic, relevant

DATA = Path(__file__).parent / "sets" / "retrieval"
PLACE = ("bench", "g1", "help")
TOP = 4
FLOORS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
WEIGHTS = (0.0, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class Question:
    lang: str
    type: str
    question: str
    doc: str
    heading: str


def load_questions(half: str = "all") -> list[Question]:
    """The evaluation questions, or one `half` of them: "tune" or "holdout", split by answer
    section (a section's keyword and paraphrase questions stay together) and off-topic ones
    alternately."""
    lines = (DATA / "questions.jsonl").read_text(encoding="utf-8").splitlines()
    questions = [Question(**json.loads(line)) for line in lines if line.strip()]
    if half == "all":
        return questions
    sections = list(dict.fromkeys((q.lang, q.doc, q.heading) for q in questions if q.type != "off-topic"))
    off_topic = [q for q in questions if q.type == "off-topic"]

    def slot(q: Question) -> int:
        return off_topic.index(q) if q.type == "off-topic" else sections.index((q.lang, q.doc, q.heading))

    return [q for q in questions if slot(q) % 2 == (half == "holdout")]


async def index_documents(search: Search) -> int:
    count = 0
    for path in sorted(DATA.glob("*.md")):
        count += await search.add_document(*PLACE, path.stem, path.read_text(encoding="utf-8"))
    return count


def rank_of(q: Question, hits: list[Hit]) -> int | None:
    """1-based rank of the expected passage among the document hits, None if absent."""
    docs = [h for h in hits if h.kind == "doc"]
    return next((i for i, h in enumerate(docs, 1) if h.name == q.doc and h.heading == q.heading), None)


def report(questions: list[Question], results: list[list[Hit]], floor: float, label: str) -> None:
    """The quality table at relevance floor `floor`."""
    groups: dict[tuple[str, str], list[tuple[Question, list[Hit]]]] = defaultdict(list)
    for q, hits in zip(questions, results, strict=True):
        kept = relevant(hits, floor)
        groups[(q.lang, q.type)].append((q, kept))
        if q.type != "off-topic":
            groups[(q.lang, "all answerable")].append((q, kept))
    print(f"\n{label} retrieval at floor {floor:.2f} (CJK: {textindex.CJK_MODE})")
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


def sweep_row(questions: list[Question], results: list[list[Hit]], floor: float) -> str:
    """recall@4, zero-hit and false-hit rates per language at `floor`, as table cells."""
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
    return " | ".join(cells)


SWEEP_HEADER = "zh recall@4 | zh zero-hit | zh false-hit | en recall@4 | en zero-hit | en false-hit |"


def sweep(questions: list[Question], results: list[list[Hit]]) -> None:
    """Zero-hit rate (answerable) against false-hit rate (off-topic) per floor, per language."""
    print("\nrelevance floor sweep, lexical (QUILL_QA_MIN_RELEVANCE)")
    print("| floor | " + SWEEP_HEADER)
    print("| --- " * 7 + "|")
    for floor in FLOORS:
        print(f"| {floor:.2f} | {sweep_row(questions, results, floor)} |")


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


async def ask_all(search: Search, questions: list[Question], mode: Retrieval) -> list[list[Hit]]:
    return [await search.search(q.question, *PLACE, 10, mode=mode) for q in questions]


async def embed_all(search: Search) -> float:
    """Embed every pending row; returns passages per minute."""
    start, total = time.perf_counter(), 0
    while (done := (await search.embed_pending())[0]) > 0:
        total += done
    return total / (time.perf_counter() - start) * 60


async def semantic_runs(memory: Memory, questions: list[Question], settings: Settings, floor: float) -> Semantic:
    """Semantic-only and hybrid tables, and sweeps of QUILL_EMBEDDING_MIN_SIMILARITY and of the
    Chinese and English weights around the settings in force (the embedder's own where empty)."""
    embedder = local_embedder(settings)
    await embedder.start()
    # The quality runs ask each question many times: embed it once (the latency figure does not).
    embedder.embed_query = functools.lru_cache(maxsize=None)(embedder.embed_query)  # type: ignore[method-assign]
    chosen = Semantic.of(embedder, floor, settings.embedding_weights, settings.embedding_min_similarity)
    both = replace(chosen, weights={"en": 1.0, "zh": 1.0})
    rate = await embed_all(Search(memory.engine, both))
    print(f"\nembedder {embedder.model_id}: {rate:,.0f} passages/min embedded")
    report(questions, await ask_all(Search(memory.engine, both), questions, "semantic"), floor, "semantic only")
    print("\nhybrid: QUILL_EMBEDDING_MIN_SIMILARITY sweep at the floor in force")
    print("| min similarity | " + SWEEP_HEADER)
    print("| --- " * 7 + "|")
    middle = statistics.mean(chosen.min_similarity.values())
    step = round((1.0 - middle) / 7, 2)
    for similarity in (middle + step * i for i in range(-3, 4)):
        trial = replace(chosen, min_similarity=dict.fromkeys(chosen.min_similarity, similarity))
        results = await ask_all(Search(memory.engine, trial), questions, "hybrid")
        print(f"| {similarity:.2f} | {sweep_row(questions, results, floor)} |")
    print("\nhybrid: QUILL_EMBEDDING_WEIGHTS sweep (the same weight for both languages)")
    print("| weight | " + SWEEP_HEADER)
    print("| --- " * 7 + "|")
    for weight in WEIGHTS:
        trial = replace(chosen, weights={"en": weight, "zh": weight})
        results = await ask_all(Search(memory.engine, trial), questions, "hybrid")
        print(f"| {weight:.2f} | {sweep_row(questions, results, floor)} |")
    report(questions, await ask_all(Search(memory.engine, chosen), questions, "hybrid"), floor, "hybrid")
    del embedder.embed_query
    return chosen


def store_random_vectors(memory: Memory, model_id: str, dim: int) -> None:
    """Unit vectors for every passage still without one (the filler), for the latency figure."""
    rng = np.random.default_rng(3)
    with memory.engine.begin() as conn:
        ids = (
            conn.execute(
                text(
                    "SELECT c.id FROM knowledge_chunk c LEFT JOIN chunk_vector x ON x.chunk_id = c.id "
                    "WHERE x.chunk_id IS NULL"
                )
            )
            .scalars()
            .all()
        )
        vectors = rng.standard_normal((len(ids), dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        conn.execute(
            text("INSERT INTO chunk_vector (chunk_id, model, vector) VALUES (:i, :m, :v)"),
            [{"i": i, "m": model_id, "v": v.tobytes()} for i, v in zip(ids, vectors, strict=True)],
        )


async def latency(search: Search, questions: list[Question], passages: int, label: str) -> None:
    timings = []
    for q in questions * 2:
        start = time.perf_counter()
        await search.search(q.question, *PLACE, TOP)
        timings.append((time.perf_counter() - start) * 1000)
    timings.sort()
    p95 = timings[int(len(timings) * 0.95) - 1]
    print(f"{label} query latency at {passages:,} passages: p50 {statistics.median(timings):.1f} ms, p95 {p95:.1f} ms")


async def speed(search: Search, questions: list[Question], passages: int) -> None:
    per_doc = 100
    texts = filler_passages(passages)
    start = time.perf_counter()
    for i in range(0, passages, per_doc):
        body = "\n\n".join(f"## Part {j}\n\n{t}" for j, t in enumerate(texts[i : i + per_doc]))
        await search.add_document(*PLACE, f"filler-{i // per_doc}", body)
    elapsed = time.perf_counter() - start
    print(f"\nlexical indexing: {passages} passages in {elapsed:.1f} s = {passages / elapsed * 60:,.0f} passages/min")
    await latency(Search(search.engine), questions, passages, "lexical")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cjk", choices=["jieba", "bigram"], default="jieba", help="how Han text is segmented")
    p.add_argument("--passages", type=int, default=10_000, help="passages stored for the speed figures (0: skip)")
    p.add_argument("--no-embeddings", action="store_true", help="lexical figures only")
    p.add_argument("--questions", choices=["all", "tune", "holdout"], default="all", help="which half of the set")
    args = p.parse_args()
    textindex.CJK_MODE = args.cjk
    settings = Settings()  # the data folder (the embedder GGUF) and the weights in force
    floor = settings.qa_min_relevance
    with tempfile.TemporaryDirectory() as scratch:
        memory = Memory.open(f"sqlite:///{scratch}/bench.db")
        search = Search(memory.engine)
        await index_documents(search)
        questions = load_questions(args.questions)
        results = await ask_all(search, questions, "lexical")
        report(questions, results, floor, "lexical")
        sweep(questions, results)
        semantic = None if args.no_embeddings else await semantic_runs(memory, questions, settings, floor)
        if args.passages:
            await speed(search, questions, args.passages)
            if semantic is not None:
                store_random_vectors(memory, semantic.embedder.model_id, semantic.embedder.dim)
                await latency(Search(memory.engine, semantic), questions, args.passages, "hybrid")
                semantic.embedder.close()
        memory.close()


if __name__ == "__main__":
    asyncio.run(main())
