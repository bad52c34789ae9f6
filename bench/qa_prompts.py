"""Does a Chinese /ask prompt help the default model answer Chinese questions? Old prompt
(`prompts/qa_system.j2`, English) against new (`prompts/zh-CN/qa_system.j2`) on the same sources.

The Chinese questions of the retrieval set (`bench/sets/retrieval/`, keyword, paraphrase and
FAQ types) are searched in its six documents (lexical search, so no embedder is needed and both
prompts get exactly the same sources); each question with a hit is answered twice, greedily,
once under each prompt, all through the batched engine. Printed per prompt:

- in Chinese: answers whose letters are mostly Han characters;
- cites a source: answers with a `[n]` that is one of the sources;
- cites the right source: a `[n]` whose source is the passage the question is about;
- grounded: the share of the answer's Han character pairs found in its sources (mean), and the
  answers with at least half of theirs found there;
- answer length and wall time.

    python -m bench.qa_prompts [--max-tokens 128] [--sample N]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import time
from dataclasses import dataclass

from bench.common import bench_settings, machine_note
from bench.retrieval import PLACE, Question, index_documents, load_questions
from bot.api import ChatMessage, Place
from bot.app import Quill
from bot.search import Hit
from plugins.qa import QaSettings, fit_sources, source_label

HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
LATIN = re.compile(r"[A-Za-z]")
CITED = re.compile(r"\[(\d+)\]")
PROMPTS = {"old (English)": "en", "new (zh-CN)": "zh-CN"}


@dataclass
class Answer:
    text: str
    hits: list[Hit]
    sources: str
    seconds: float


def han_pairs(text: str) -> set[str]:
    runs = re.findall(r"[\u3400-\u4dbf\u4e00-\u9fff]+", text)
    return {run[i : i + 2] for run in runs for i in range(len(run) - 1)}


def scores(q: Question, a: Answer) -> dict[str, float]:
    han, latin = len(HAN.findall(a.text)), len(LATIN.findall(a.text))
    cited = {int(n) for n in CITED.findall(a.text) if 1 <= int(n) <= len(a.hits)}
    right = any(a.hits[n - 1].name == q.doc and a.hits[n - 1].heading == q.heading for n in cited)
    pairs = han_pairs(a.text)
    grounded = len(pairs & han_pairs(a.sources)) / len(pairs) if pairs else 0.0
    return {
        "in Chinese": float(han > 0 and han >= latin),
        "cites a source": float(bool(cited)),
        "cites the right source": float(right),
        "grounded (mean share)": grounded,
        "grounded (>= half)": float(grounded >= 0.5),
        "answer chars": float(len(a.text)),
    }


async def answer(app: Quill, q: Question, hits: list[Hit], locale: str, max_tokens: int) -> Answer:
    ctx = app.context
    texts = await fit_sources(ctx, hits)
    labels = [source_label(h, Place(*PLACE)) for h in hits]
    sources = [{"number": i, "label": lab, "text": t} for i, (lab, t) in enumerate(zip(labels, texts, strict=True), 1)]
    system = ctx.prompts.render("qa_system", locale=locale, bot_name=ctx.settings.bot_name, sources=sources)
    start = time.perf_counter()
    messages = [ChatMessage("system", system), ChatMessage("user", q.question)]
    result = await ctx.engine.chat(messages, ctx.options(max_tokens=max_tokens, temperature=0.0))
    return Answer(result.text.strip(), hits, "\n".join(texts), time.perf_counter() - start)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-tokens", type=int, default=128, help="longest answer")
    p.add_argument("--sample", type=int, default=0, help="only N questions, evenly spaced over the set (0: all)")
    p.add_argument("--show", type=int, default=3, help="print this many answer pairs")
    args = p.parse_args()
    app = await Quill.start(bench_settings(embeddings=False))
    await index_documents(app.context.search)
    questions = [q for q in load_questions() if q.lang == "zh" and q.type != "off-topic"]
    if 0 < args.sample < len(questions):
        questions = [questions[i * len(questions) // args.sample] for i in range(args.sample)]
    limit = app.context.config(QaSettings).max_sources
    asked = []
    for q in questions:
        hits = await app.context.search.search(
            q.question, *PLACE, limit, min_relevance=app.settings.qa_min_relevance, mode="lexical"
        )
        if hits:
            asked.append((q, hits))
    print(f"{len(asked)} of {len(questions)} Chinese questions have sources; each answered under both prompts")
    started = time.perf_counter()
    jobs = [answer(app, q, hits, locale, args.max_tokens) for q, hits in asked for locale in PROMPTS.values()]
    answers = await asyncio.gather(*jobs)
    wall = time.perf_counter() - started
    by_prompt = {name: answers[i :: len(PROMPTS)] for i, name in enumerate(PROMPTS)}
    rows = {name: [scores(q, a) for (q, _hits), a in zip(asked, got, strict=True)] for name, got in by_prompt.items()}
    metrics = list(next(iter(rows.values()))[0])
    print(f"{'metric':<26}" + "".join(f"{name:>18}" for name in PROMPTS))
    for metric in metrics:
        print(f"{metric:<26}" + "".join(f"{statistics.mean(r[metric] for r in rows[n]):>18.2f}" for n in PROMPTS))
    for name, got in by_prompt.items():
        print(f"{name}: median {statistics.median(a.seconds for a in got):.1f} s an answer (all at once)")
    for (q, _hits), *pair in list(zip(asked, *by_prompt.values(), strict=True))[: args.show]:
        print(f"\nQ: {q.question}")
        for name, a in zip(PROMPTS, pair, strict=True):
            print(f"  {name}: {a.text[:200]!r}")
    print(f"\nwall {wall:.0f} s; {machine_note()}")
    await app.close()


if __name__ == "__main__":
    asyncio.run(main())
