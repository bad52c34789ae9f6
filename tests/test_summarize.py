"""Summarizer: map-reduce by tokens over stored messages, on the real model and database."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from bot.api import Place, Request
from bot.app import Quill
from bot.engine import ChatMessage, ChatResult, GenerationOptions, Model
from bot.engine.batched import BatchedEngine
from bot.engine.local import LocalEngine
from plugins.summarize import (
    Point,
    Stats,
    Summarizer,
    SummarizeSettings,
    checked,
    log_lines,
    pack,
    render,
    summary_model,
)
from tests.conftest import make_settings

NAMES = ("Ada", "Bea", "Cy")


class CountingEngine:
    """The real engine, with a count of the generations asked of it."""

    def __init__(self, inner: LocalEngine) -> None:
        self.inner = inner
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def chat(self, messages: Sequence[ChatMessage], options: GenerationOptions) -> ChatResult:
        self.calls += 1
        return await self.inner.chat(messages, options)

    async def chat_structured(
        self, messages: Sequence[ChatMessage], model: type[Model], options: GenerationOptions
    ) -> Model:
        self.calls += 1
        return await self.inner.chat_structured(messages, model, options)


@pytest.fixture
async def small_app(tmp_path: Path, engine: LocalEngine) -> AsyncIterator[Quill]:
    """SQLite only, small chunks and notes: several map and merge steps on few messages."""
    quill = await Quill.start(make_settings(tmp_path), engine=engine)
    config = quill.context.config(SummarizeSettings)
    config.chunk_tokens, config.note_tokens, config.max_items = 128, 16, 1
    yield quill
    await quill.close(close_engine=False)


async def seed(app: Quill, count: int, channel: str = "c1", start: int = 0) -> int:
    conv = await app.memory.conversation("discord", "g1", channel)
    for i in range(start, start + count):
        name = NAMES[i % len(NAMES)]
        await app.memory.add_message(
            conv.id,
            role="user",
            content=f"message {i}: the release plan item {i}",
            author_id=name,
            author_name=name,
        )
    return conv.id


def request(text: str = "", **options: str) -> Request:
    return Request("discord", "c1", "u1", text, guild_id="g1", options=options)


def test_pack_keeps_order_and_budget() -> None:
    assert pack([3, 3, 3, 3, 3], 7) == [range(0, 2), range(2, 4), range(4, 5)]
    assert pack([7, 1, 7], 7) == [range(0, 1), range(1, 2), range(2, 3)]
    assert pack([], 7) == []


async def test_500_messages_are_chunked_to_fit_with_full_coverage(app: Quill) -> None:
    conv_id = await seed(app, 500)
    messages = await app.memory.recent_messages(conv_id, 5000)
    lines = log_lines(messages)
    summarizer = Summarizer(app.context)
    fitted, costs, chunks = await summarizer.plan(lines)
    assert fitted == lines  # no message was too long to fit
    assert [i for chunk in chunks for i in chunk] == list(range(500))  # each once, in order
    budget = await summarizer.budget("summarize_chunk", final=False)
    assert math.ceil(sum(costs) / budget) <= len(chunks) <= 2 * math.ceil(sum(costs) / budget)
    system = app.context.prompts.render("summarize_chunk", final=False)
    for chunk in chunks:
        prompt = await app.engine.count_tokens(system) + await app.engine.count_tokens(
            "\n".join(fitted[i] for i in chunk)
        )
        assert prompt + summarizer.note_tokens + 32 <= app.engine.n_ctx


async def test_a_message_longer_than_a_chunk_is_cut_not_overflowing(small_app: Quill) -> None:
    summarizer = Summarizer(small_app.context)
    fitted, costs, chunks = await summarizer.plan(["Ada: " + "very long words " * 400, "Bea: short"])
    budget = await summarizer.budget("summarize_chunk", final=False)
    assert len(chunks) == 2 and costs[0] <= budget and fitted[0].endswith("…")


async def test_model_calls_grow_linearly_with_the_messages(small_app: Quill) -> None:
    counting = CountingEngine(small_app.engine)  # type: ignore[arg-type]
    ctx = dataclasses.replace(small_app.context, engine=counting)
    calls = []
    for size in (16, 32):
        conv_id = await seed(small_app, size, channel=f"size{size}")
        lines = log_lines(await small_app.memory.recent_messages(conv_id, 5000))
        summarizer = Summarizer(ctx)
        fitted, _, chunks = await summarizer.plan(lines)
        counting.calls = 0
        notes = [await summarizer.note("summarize_chunk", [fitted[i] for i in c]) for c in chunks]
        await summarizer.condense(notes)
        assert summarizer.stats.calls == counting.calls
        calls.append((len(chunks), counting.calls))
    (small_chunks, small_calls), (big_chunks, big_calls) = calls
    assert small_chunks >= 2 and big_chunks >= 2 * small_chunks - 1
    assert big_calls <= 2 * small_calls + 1  # linear, not quadratic


async def test_long_notes_are_merged_in_rounds_until_they_fit(small_app: Quill) -> None:
    summarizer = Summarizer(small_app.context)
    notes = [f"Note {i}: " + "the team discussed the release schedule and the budget " * 6 for i in range(6)]
    condensed = await summarizer.condense(notes)
    budget = await summarizer.budget("summarize_merge", final=True)
    costs = [await small_app.engine.count_tokens(n) + 1 for n in condensed]
    assert sum(costs) <= budget and len(condensed) < len(notes)
    assert summarizer.stats.merges >= 2 and summarizer.stats.levels[0] == 6 and len(summarizer.stats.levels) >= 2


async def test_summarize_command_replies_with_a_titled_summary(small_app: Quill) -> None:
    await seed(small_app, 6)
    reply = await small_app.router.handle(request("/summarize hours:1"))
    assert not reply.failed, reply.text
    assert reply.title == "Summary of the last 1 hour(s)"
    assert re.search(r"_6 messages, 1 part\(s\), 1 model call(, \d+ unsupported point\(s\) dropped)?\._$", reply.text)
    assert "Nothing notable" not in reply.text


async def test_summarize_usage_errors_and_empty_place(small_app: Quill) -> None:
    empty = await small_app.router.handle(request("/summarize"))
    assert "no stored messages" in empty.text
    for bad in ("messages:0", "messages:lots", "hours:-3"):
        reply = await small_app.router.handle(request(f"/summarize {bad}"))
        assert reply.failed and "Usage: /summarize" in reply.text
    too_many = await small_app.router.handle(request("/summarize messages:99999"))  # over the setting
    assert too_many.failed and "QUILL_SUMMARIZE_MAX_MESSAGES" in too_many.text
    past_bound = await small_app.router.handle(request("/summarize messages:999999"))  # over the option's bound
    assert past_bound.failed and "messages takes a whole number from 1 to 100,000" in past_bound.text


async def test_digest_section_covers_messages_since_a_time(small_app: Quill) -> None:
    conv_id = await seed(small_app, 4)
    since = datetime.now(UTC) - timedelta(hours=1)
    assert len(await small_app.memory.recent_messages(conv_id, 100, since)) == 4
    assert await small_app.memory.recent_messages(conv_id, 100, datetime.now(UTC)) == []
    assert await _sections(small_app, datetime.now(UTC)) == []
    # A summary shows only when one of its points cites the messages it rests on; its sources follow.
    for section in await _sections(small_app, since):
        assert section.title == "Summary" and "4 messages" in section.body and "**Sources**\n[" in section.body


async def _sections(app: Quill, since: datetime) -> list[Any]:
    results = app.plugins.hook.digest_sections(context=app.context, place=Place("discord", "g1", "c1"), since=since)
    sections = [await r for r in results]
    return [s for s in sections if s is not None]


async def test_json_cut_short_falls_back_to_plain_notes(small_app: Quill) -> None:
    summarizer = Summarizer(small_app.context)
    summarizer.final_tokens = 8  # far too few for the four JSON lists
    summary = await summarizer.final("summarize_chunk", ["Ada: ship on Thursday", "Bea: after QA"])
    assert isinstance(summary, str) and summarizer.stats.calls == 2
    points = checked(summary, ["ship on Thursday", "after QA"], summarizer.stats)
    assert all(title == "Notes" and point.ids for title, point in points)  # uncited notes never show
    assert summarizer.stats.proposed == len(points) + summarizer.stats.dropped


def test_points_citing_no_message_or_unsupported_ones_are_dropped() -> None:
    sources = [
        "We shipped the 2.3 release today, great work everyone!",
        "The login page is broken again, users are angry.",
        "我们下周一开始迁移数据库。",
    ]
    Summary = summary_model(5)
    summary = Summary(
        key_points=[
            Point(text="The 2.3 release shipped", ids=[1]),
            Point(text="The login page is broken", ids=[2]),
            Point(text="Budget approved for the offsite", ids=[1]),  # cites a message that says no such thing
            Point(text="The release shipped", ids=[9]),  # no message 9
            Point(text="The login page is broken", ids=[]),  # cites nothing
        ],
        decisions=[Point(text="下周一开始迁移数据库", ids=[3]), Point(text="预算已经批准", ids=[3])],
        open_questions=[],
        who_said_what=[],
    )
    stats = Stats()
    kept = checked(summary, sources, stats)
    assert [(title, p.text) for title, p in kept] == [
        ("Key points", "The 2.3 release shipped"),
        ("Key points", "The login page is broken"),
        ("Decisions", "下周一开始迁移数据库"),
    ]
    assert (stats.proposed, stats.dropped) == (7, 4)
    text = render(kept, stats, [f"“{s}” — ada" for s in sources])
    assert "- The 2.3 release shipped [1]" in text and "- 下周一开始迁移数据库 [3]" in text
    assert "**Sources**\n[1] “We shipped the 2.3 release today, great work everyone!” — ada" in text
    assert "Budget" not in text and "预算" not in text and "4 unsupported point(s) dropped" in text


def test_a_point_resting_only_on_the_bots_own_answers_is_dropped() -> None:
    """Seen on the default model: "I'm glad to have you all here. [2][4]" echoed its own earlier
    answers, which the summarizer numbers like everyone's messages but must not count as support."""
    sources = ["The login page is broken again.", "", "登录页面又挂了。"]  # [2] is the bot's answer
    Summary = summary_model(5)
    summary = Summary(
        key_points=[
            Point(text="I'm glad to have you all here", ids=[2]),
            Point(text="The login page broke", ids=[1, 2]),
        ],
        decisions=[],
        open_questions=[Point(text="登录页面又挂了吗", ids=[2])],
        who_said_what=[],
    )
    stats = Stats()
    assert [p.text for _, p in checked(summary, sources, stats)] == ["The login page broke"]
    assert (stats.proposed, stats.dropped) == (3, 2)


class InFlightEngine(CountingEngine):
    """The real engine, counting generations and the most of them in flight at once."""

    def __init__(self, inner: LocalEngine) -> None:
        super().__init__(inner)
        self.running = self.most = 0

    async def chat(self, messages: Sequence[ChatMessage], options: GenerationOptions) -> ChatResult:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            return await super().chat(messages, options)
        finally:
            self.running -= 1


CHINESE = ("阿达", "贝拉", "赛")


async def seed_language(app: Quill, count: int, language: str, channel: str) -> int:
    conv = await app.memory.conversation("discord", "g1", channel)
    for i in range(count):
        if language == "zh":
            name, text = CHINESE[i % 3], f"第{i}条消息：发布计划的第{i}项，周四上线前要完成测试。"
        else:
            name, text = NAMES[i % 3], f"message {i}: the release plan item {i}, tested before Thursday."
        await app.memory.add_message(conv.id, role="user", content=text, author_id=name, author_name=name)
    return conv.id


@pytest.fixture
async def batched_app(tmp_path: Path, batched_engine: BatchedEngine) -> AsyncIterator[Quill]:
    """The batched engine (4 streams) with small chunks and notes: several calls per step."""
    settings = make_settings(tmp_path, n_ctx=batched_engine.n_ctx, batch_streams=batched_engine.settings.batch_streams)
    quill = await Quill.start(settings, engine=batched_engine)
    config = quill.context.config(SummarizeSettings)
    config.chunk_tokens, config.note_tokens, config.max_items = 128, 16, 1
    yield quill
    await quill.close(close_engine=False)


@pytest.mark.parametrize("language", ["en", "zh"])
async def test_map_and_merge_calls_run_together_same_calls_as_one_by_one(batched_app: Quill, language: str) -> None:
    """The calls of a step are generated together by the batched engine (more than one in flight,
    steps advancing several), and make as many calls, chunks and merge rounds as one by one."""
    engine: BatchedEngine = batched_app.engine  # type: ignore[assignment]
    watching = InFlightEngine(engine)  # type: ignore[arg-type]
    ctx = dataclasses.replace(batched_app.context, engine=watching)
    conv_id = await seed_language(batched_app, 24, language, f"together-{language}")
    lines = log_lines(await batched_app.memory.recent_messages(conv_id, 5000))
    runs = {}
    for concurrency in (1, None):
        summarizer = Summarizer(ctx, concurrency=concurrency)
        fitted, _, chunks = await summarizer.plan(lines)
        watching.calls = watching.most = 0
        shared = engine.stats.shared_steps
        notes = await summarizer.together(
            [partial(summarizer.note, "summarize_chunk", [fitted[i] for i in c]) for c in chunks]
        )
        condensed = await summarizer.condense(notes)
        runs[concurrency] = (summarizer.stats, watching.calls, watching.most, engine.stats.shared_steps - shared)
        assert len(notes) == len(chunks) >= 3 and all(isinstance(n, str) and n for n in notes)
        assert condensed and all(isinstance(n, str) for n in condensed)
    (alone, alone_calls, alone_most, alone_shared), (together, calls, most, shared) = runs[1], runs[None]
    assert alone_most == 1 and alone_shared == 0
    assert most > 1 and most <= engine.settings.batch_streams and shared > 0
    assert (together.calls, together.chunks, together.merges) == (alone.calls, alone.chunks, alone.merges)
    assert calls == alone_calls == together.calls


async def test_summarize_on_the_batched_engine_replies_in_the_same_format(batched_app: Quill) -> None:
    """The whole command with its calls together, on Chinese messages (English ones: the test
    above and test_summarize_command_replies_with_a_titled_summary). Slow on a loaded machine
    (the final JSON under its grammar): one language only."""
    await seed_language(batched_app, 24, "zh", "c1")
    reply = await batched_app.router.handle(request("/summarize"))
    assert not reply.failed, reply.text
    assert reply.title == "Summary of the last 24 messages"
    footer = reply.text.rsplit("\n\n", 1)[-1]
    dropped = r"(, \d+ unsupported point\(s\) dropped)?"
    assert re.fullmatch(rf"_24 messages, (?:[2-9]|[1-9]\d+) part\(s\), \d+ model calls{dropped}\._", footer)
