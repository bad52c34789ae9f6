"""Summarizer: `/summarize` a place's stored messages, and the summary section of its digest.

Any length works by map-reduce on token counts: messages are packed into chunks that fit the
context beside the prompt and the reply, each chunk becomes a short note (map), notes are packed
and merged the same way until one call can take them all (reduce), and that last call answers
in JSON bounded by a schema (key points, decisions, open questions, who said what). Each step
at least halves the text, so model calls grow linearly with the number of messages. The calls
of one step (the map, each merge round) run concurrently, up to QUILL_BATCH_STREAMS of them, so
the batched engine generates their notes together.

Kept honest: every message goes in numbered (`[12] Ada: ...`), notes keep the numbers, and each
point of the final JSON carries the numbers it rests on. A point citing no message, a number
that is not one, or messages sharing none of its content words (English words, Chinese
character bigrams) is dropped before anyone sees it; the cited messages are quoted under the
summary.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints, create_model

from bot.api import (
    N_,
    ChatMessage,
    Command,
    ContextOverflow,
    EngineError,
    Option,
    Place,
    PluginContext,
    PluginSettings,
    Reply,
    Request,
    Section,
    Text,
    ToolSpec,
    _,
    content_words,
    hookimpl,
    message_link,
    ngettext,
    quote,
)

log = logging.getLogger(__name__)

# Tokens the chat template adds per message, and a margin for counting differences.
TEMPLATE_TOKENS = 16
ITEM_CHARS = 100
# JSON punctuation and keys, plus a generous token count per item, bound the final reply.
FINAL_BASE_TOKENS = 48
TOKENS_PER_ITEM = 72
MAX_CITES = 3
SECTIONS = ("key_points", "decisions", "open_questions", "who_said_what")
TITLES = (N_("Key points"), N_("Decisions"), N_("Open questions"), N_("Who said what"))
NOTES = N_("Notes")  # the title of a plain-notes fallback's points

# Bounds of the options: QUILL_SUMMARIZE_MAX_MESSAGES's own bound, and a year.
MAX_MESSAGES = 100_000
MAX_HOURS = 24 * 365


class SummarizeSettings(PluginSettings):
    """QUILL_SUMMARIZE_*: how much a summary reads, in what parts, and how long it gets."""

    default_messages: int = Field(200, ge=1, le=MAX_MESSAGES, description="Messages read when no count is given.")
    max_messages: int = Field(5000, ge=1, le=MAX_MESSAGES, description="The most messages /summarize reads.")
    chunk_tokens: int = Field(1536, ge=128, description="Tokens of messages per map step.")
    note_tokens: int = Field(160, ge=16, description="Tokens of each intermediate note.")
    max_items: int = Field(5, ge=1, le=20, description="List items per section of the result.")


_LINE_BREAKS = re.compile(r"\s*\n\s*")
_CITATION = re.compile(r"\[(\d{1,6})\]")


class Point(BaseModel):
    """One point of the summary and the numbers of the messages it rests on."""

    text: Annotated[str, StringConstraints(max_length=ITEM_CHARS)]
    ids: list[int] = Field(max_length=MAX_CITES)


def summary_model(max_items: int) -> type[BaseModel]:
    """The final reply's schema, lists and strings bounded so the grammar bounds the generation
    too: unbounded, SmolLM2-135M wrote one string until max_tokens cut the JSON. The bound costs
    speed (llama.cpp expands it into nested rules: 87.5 s against 11 s for the same 67 tokens
    with maxLength 150, on a loaded 2-core machine), so it is kept short."""
    bounded = (list[Point], Field(max_length=max_items))
    return create_model("Summary", **dict.fromkeys(SECTIONS, bounded))  # type: ignore[call-overload]


@dataclass
class Stats:
    """What a summary cost: the figures the footer shows and the scaling bench prints."""

    messages: int = 0
    tokens: int = 0
    chunks: int = 0
    merges: int = 0
    calls: int = 0
    levels: list[int] = field(default_factory=list)
    # Points the model proposed, and those dropped as uncited or unsupported.
    proposed: int = 0
    dropped: int = 0


def pack(costs: list[int], budget: int) -> list[range]:
    """Consecutive groups of items whose costs add up to at most `budget` (each cost must fit)."""
    groups: list[range] = []
    start, used = 0, 0
    for i, cost in enumerate(costs):
        if used + cost > budget and i > start:
            groups.append(range(start, i))
            start, used = i, 0
        used += cost
    if start < len(costs):
        groups.append(range(start, len(costs)))
    return groups


class Summarizer:
    """One summary's map-reduce over the lines of a chat log."""

    def __init__(self, ctx: PluginContext, concurrency: int | None = None) -> None:
        self.ctx = ctx
        # Calls of one step run together, as many as the engine decodes at once (QUILL_BATCH_STREAMS):
        # the batched engine then generates their notes in the same steps. 1: one after another.
        self.concurrency = concurrency or ctx.settings.batch_streams
        self.stats = Stats()
        self.config = ctx.config(SummarizeSettings)
        self.note_tokens = self.config.note_tokens
        self.final_tokens = FINAL_BASE_TOKENS + TOKENS_PER_ITEM * len(SECTIONS) * self.config.max_items
        self.model = summary_model(self.config.max_items)

    async def budget(self, prompt: str, final: bool) -> int:
        """Tokens of log text one call can take beside `prompt` and its reply."""
        reply = self.final_tokens if final else self.note_tokens
        system = await self.ctx.engine.count_tokens(self.ctx.prompts.render(prompt, final=final))
        room = self.ctx.engine.n_ctx - system - reply - 2 * TEMPLATE_TOKENS
        budget = min(self.config.chunk_tokens, room)
        if budget < 2 * (self.note_tokens + 1):
            raise ContextOverflow(
                Text(
                    "The model's context ({tokens} tokens, QUILL_N_CTX) is too small to summarize in parts; "
                    "raise it or lower QUILL_SUMMARIZE_NOTE_TOKENS.",
                    tokens=self.ctx.engine.n_ctx,
                )
            )
        return budget

    async def fit(self, texts: list[str], budget: int) -> tuple[list[str], list[int]]:
        """Each text with its token cost (a line break included); a text over `budget` alone is
        cut to fit, so no single message can overflow a call."""
        fitted, costs = [], []
        for body in texts:
            cost = await self.ctx.engine.count_tokens(body) + 1
            while cost > budget:
                body = body[: len(body) * budget // cost - 1] + "…"
                cost = await self.ctx.engine.count_tokens(body) + 1
            fitted.append(body)
            costs.append(cost)
        return fitted, costs

    async def plan(self, lines: list[str]) -> tuple[list[str], list[int], list[range]]:
        """The lines (cut where too long), their token costs, and the map step's chunks."""
        budget = min(
            await self.budget("summarize_chunk", final=False),
            await self.budget("summarize_chunk", final=True),
        )
        fitted, costs = await self.fit(lines, budget)
        self.stats.messages, self.stats.tokens = len(lines), sum(costs)
        return fitted, costs, pack(costs, await self.budget("summarize_chunk", final=False))

    async def run(self, lines: list[str]) -> BaseModel | str:
        """The summary of a chat log, one line per message."""
        fitted, costs, chunks = await self.plan(lines)
        if sum(costs) <= await self.budget("summarize_chunk", final=True):
            return await self.final("summarize_chunk", fitted)
        self.stats.chunks = len(chunks)
        notes = await self.together([partial(self.note, "summarize_chunk", [fitted[i] for i in c]) for c in chunks])
        return await self.final("summarize_merge", await self.condense(notes))

    async def together(self, calls: list[Callable[[], Awaitable[str]] | str]) -> list[str]:
        """The results of `calls` in order (a text is its own result), at most `concurrency`
        running at once; the first failure cancels the others and is raised as it is."""
        gate = asyncio.Semaphore(self.concurrency)

        async def bounded(call: Callable[[], Awaitable[str]] | str) -> str:
            if isinstance(call, str):
                return call
            async with gate:
                return await call()

        tasks = [asyncio.ensure_future(bounded(call)) for call in calls]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def condense(self, notes: list[str]) -> list[str]:
        """Merge notes, a packed group per call, until all of them fit the final call. Merged
        notes are note-sized and a budget holds at least two, so each round halves the count."""
        final_budget = await self.budget("summarize_merge", final=True)
        merge_budget = await self.budget("summarize_merge", final=False)
        self.stats.levels.append(len(notes))
        while True:
            notes, costs = await self.fit(notes, merge_budget)
            if sum(costs) <= final_budget:
                return notes
            merged: list[Callable[[], Awaitable[str]] | str] = []
            for group in pack(costs, merge_budget):
                if len(group) == 1 and costs[group[0]] <= self.note_tokens + 1:
                    merged.append(notes[group[0]])  # already note-sized: its turn comes next round
                else:
                    merged.append(partial(self.note, "summarize_merge", [notes[i] for i in group]))
                    self.stats.merges += 1
            notes = await self.together(merged)
            self.stats.levels.append(len(notes))

    async def note(self, prompt: str, texts: list[str]) -> str:
        self.stats.calls += 1
        options = self.ctx.options(max_tokens=self.note_tokens)
        result = await self.ctx.engine.chat(self._messages(prompt, texts, final=False), options)
        self.ctx.progress()  # a part is done: a long summary is stopped only if it stalls
        # Cut to the note size whatever re-tokenizing says, so every merge round halves the notes.
        (note,), _ = await self.fit([result.text.strip() or "(nothing notable)"], self.note_tokens + 1)
        return note

    async def final(self, prompt: str, texts: list[str]) -> BaseModel | str:
        """The structured summary; short plain notes if the JSON came back unusable."""
        self.stats.calls += 1
        options = self.ctx.options(max_tokens=self.final_tokens)
        messages = self._messages(prompt, texts, final=True)
        try:
            return await self.ctx.engine.chat_structured(messages, self.model, options)
        except ContextOverflow:
            raise
        except EngineError as exc:
            log.warning("structured summary unusable, falling back to notes: %s", exc)
            self.stats.calls += 1
            notes = self._messages(prompt, texts, final=False)
            result = await self.ctx.engine.chat(notes, self.ctx.options(max_tokens=2 * self.note_tokens))
            return result.text.strip()

    def _messages(self, prompt: str, texts: list[str], *, final: bool) -> list[ChatMessage]:
        system = self.ctx.prompts.render(prompt, final=final)
        return [ChatMessage("system", system), ChatMessage("user", "\n".join(texts))]


def checked(summary: BaseModel | str, sources: list[str], stats: Stats) -> list[tuple[str, Point]]:
    """(section title, point) for each point that cites messages supporting it. `sources` are the
    message texts by number (1-based), "" for the bot's own answers: a point resting on what the
    model said before is the model's word, not the team's. A plain-notes fallback counts only
    lines citing `[n]`."""
    proposed: list[tuple[str, Point]] = []
    if isinstance(summary, str):
        for line in summary.splitlines():
            ids = [int(n) for n in _CITATION.findall(line)][:MAX_CITES]
            text = _CITATION.sub("", line).strip(" -*•\t")[:ITEM_CHARS]
            if text:
                proposed.append((NOTES, Point(text=text, ids=ids)))
    else:
        for key, title in zip(SECTIONS, TITLES, strict=True):
            proposed += [(title, p) for p in getattr(summary, key, []) if p.text.strip()]
    kept = [(title, p) for title, p in proposed if supported(p, sources)]
    stats.proposed, stats.dropped = len(proposed), len(proposed) - len(kept)
    return kept


def supported(point: Point, sources: list[str]) -> bool:
    """Cites at least one message, only messages that exist, and shares a content word with them."""
    if not point.ids or any(not 1 <= n <= len(sources) for n in point.ids):
        return False
    cited: set[str] = set().union(*(content_words(sources[n - 1]) for n in point.ids))
    return bool(content_words(point.text) & cited)


def render(points: list[tuple[str, Point]], stats: Stats, sources: list[str]) -> str:
    """The checked points as Markdown sections, each with its citation numbers, then the cited
    messages themselves (`sources` already quoted, by number), and what it cost."""
    parts = []
    for title in dict.fromkeys(t for t, _point in points):
        items = [f"- {p.text.strip()} " + "".join(f"[{n}]" for n in p.ids) for t, p in points if t == title]
        parts.append(f"**{_(title)}**\n" + "\n".join(items))
    cited = sorted({n for _n, p in points for n in p.ids})
    if cited:
        parts.append(f"**{_('Sources')}**\n" + "\n".join(f"[{n}] {sources[n - 1]}" for n in cited))
    if not points:
        if stats.dropped:
            why = _("{count} dropped as uncited or unsupported", count=stats.dropped)
        else:
            why = _("it proposed none")
        parts.append(
            _(
                "The model's summary had no point that cites the messages it rests on ({why}); "
                "/digest lists the questions and decisions found in them.",
                why=why,
            )
        )
    figures = {"messages": stats.messages, "parts": max(stats.chunks, 1), "dropped": stats.dropped}
    figures["calls"] = ngettext("{count} model call", "{count} model calls", stats.calls)
    if stats.dropped:
        footer = _("{messages} messages, {parts} part(s), {calls}, {dropped} unsupported point(s) dropped.", **figures)
    else:
        footer = _("{messages} messages, {parts} part(s), {calls}.", **figures)
    return "\n\n".join(parts) + f"\n\n_{footer}_"


def log_lines(messages: list[Any]) -> list[str]:
    """One numbered line per message, "[n] Name: text", line breaks folded so a message stays one
    line; the numbers are what summary points cite."""
    return [
        f"[{i}] {m.author_name or m.author_id}: {_LINE_BREAKS.sub(' / ', m.content)}"
        for i, m in enumerate(messages, start=1)
    ]


async def cited_summary(ctx: PluginContext, place: Place, messages: list[Any]) -> tuple[str, list[tuple[str, Point]]]:
    """The summary of stored messages, rendered with its checked points; also the points."""
    summarizer = Summarizer(ctx)
    summary = await summarizer.run(log_lines(messages))
    people = [m.content if m.role == "user" else "" for m in messages]
    points = checked(summary, people, summarizer.stats)
    sources = [quote(m.content, m.author_name or m.author_id, message_link(place, m.external_id)) for m in messages]
    return render(points, summarizer.stats, sources), points


async def summarize(ctx: PluginContext, request: Request) -> Reply:
    config = ctx.config(SummarizeSettings)
    cap = config.max_messages
    count, hours = request.number("messages"), request.number("hours")
    if count is not None and count > cap:
        return Reply(_("I summarize at most {cap} messages (QUILL_SUMMARIZE_MAX_MESSAGES).", cap=cap), failed=True)
    limit = count or (cap if hours else config.default_messages)
    since = datetime.now(UTC) - timedelta(hours=hours) if hours else None
    conv = await ctx.memory.conversation(*request.place)
    assert conv.id is not None
    messages = await ctx.memory.recent_messages(conv.id, limit, since)
    if not messages:
        return Reply(_("There are no stored messages here to summarize yet."))
    text, _points = await cited_summary(ctx, request.place, messages)
    if hours:
        title = _("Summary of the last {hours} hour(s)", hours=hours)
    else:
        title = _("Summary of the last {count} messages", count=len(messages))
    return Reply(text, title=title)


@hookimpl
async def digest_sections(context: PluginContext, place: Place, since: datetime) -> Section | None:
    """The digest's summary of what was said in `place` since `since`: None when nothing was,
    or when no point of it could be checked (the digest's own sections then speak for the
    period, never a "nothing notable")."""
    conv = await context.memory.conversation(*place)
    assert conv.id is not None
    messages = await context.memory.recent_messages(conv.id, context.config(SummarizeSettings).max_messages, since)
    if not messages:
        return None
    text, points = await cited_summary(context, place, messages)
    return Section(_("Summary"), text) if points else None


@hookimpl
def register_settings(register: Callable[[type], None]) -> None:
    register(SummarizeSettings)


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(
        Command(
            "summarize",
            N_("summarize this channel's recent messages: key points, decisions, open questions, who said what"),
            summarize,
            options=(
                Option("messages", N_("how many recent messages (default 200)"), kind=int, min=1, max=MAX_MESSAGES),
                Option("hours", N_("only messages from the last N hours"), kind=int, min=1, max=MAX_HOURS),
            ),
            tool=ToolSpec(answers=True, status=N_("summarizing this channel…")),
        )
    )
