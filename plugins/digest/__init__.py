"""Digest: what happened in a place (or several channels) since the last digest, and `/mood`.

Its own facts need no model and quote what people wrote: message counts and the most active
people, open questions, decisions and action items, the most discussed threads (with jump links
on Discord), the channel's mood per day with the threads that need attention, and a chart of
messages and mood per day. Every plugin's `digest_sections` follow (the summarizer's cited
summary). The time of the last digest is kept per place, so a scheduled `/digest` covers exactly
the period since the one before.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import Field

from bot.api import (
    N_,
    ChannelSettings,
    Command,
    Option,
    Place,
    PluginContext,
    PluginSettings,
    Reply,
    Request,
    Section,
    ToolSpec,
    _,
    format_date,
    format_datetime,
    format_number,
    hookimpl,
    message_link,
    ngettext,
)

from . import chart, grounded, mood
from .grounded import Said

TOP = 3
LIST_LIMIT = 8
MOOD_DEFAULT_HOURS = 24
MOOD_MAX_HOURS = 24 * 31


class DigestSettings(PluginSettings):
    """QUILL_DIGEST_*: what a digest does with a quiet period, and how far back the first looks."""

    when_empty: Literal["say", "skip"] = Field(
        "say", description="A period with no activity: 'say' posts a short 'nothing new', 'skip' posts nothing."
    )
    first_hours: int = Field(24, ge=1, le=24 * 366, description="Hours the first digest of a place covers.")


class DigestChannel(ChannelSettings):
    """Where the last digest of a place ended, so the next covers exactly the time since."""

    last_run: datetime | None = Field(None, description="End of the last digest.", json_schema_extra={"internal": True})


def _link(place: Place, channel_id: str, message_id: str | None) -> str:
    """A thread with a jump link to its start where the transport has them (Discord), else its name."""
    if (link := message_link(place, message_id, channel_id)) is not None:
        return f"<#{channel_id}> ([start]({link}))"
    return f"#{channel_id}"


def activity(place: Place, rows: list[tuple[str, Any]]) -> Section:
    """Counts of the period's messages, who wrote most, and the busiest channels."""
    people = [m for _, m in rows if m.role == "user"]
    by_author = Counter(m.author_name or m.author_id for m in people)
    by_channel = Counter(channel for channel, m in rows if m.role == "user")
    first: dict[str, str | None] = {}
    for channel, m in rows:
        first.setdefault(channel, m.external_id)
    answers = len(rows) - len(people)
    lines = [
        _(
            "{messages} messages from {people} people, {answers} answers from the bot.",
            messages=len(people),
            people=len(by_author),
            answers=answers,
        )
    ]
    if by_author:
        most = ", ".join(f"{name} ({format_number(n)})" for name, n in by_author.most_common(TOP))
        lines.append(_("Most active: {people}", people=most))
    if by_channel:
        lines.append(_("Most active threads:"))
        for channel, n in by_channel.most_common(TOP):
            lines.append(
                f"- {_link(place, channel, first[channel])}: " + ngettext("{count} message", "{count} messages", n)
            )
    return Section(_("Activity"), "\n".join(lines))


async def people_said(ctx: PluginContext, rows: Sequence[tuple[str, Any]]) -> list[Said]:
    """The period's messages by people (not the bot), with reply links and moods."""
    people = [(channel, m) for channel, m in rows if m.role == "user"]
    labels = await mood.labels(ctx, [m.content for _, m in people])
    return [
        Said(
            key=m.external_id or f"row-{m.id}",
            author=m.author_name or m.author_id,
            text=m.content,
            at=m.created_at,
            channel=channel,
            external_id=m.external_id,
            reply_to=m.reply_to,
            mood=label,
        )
        for (channel, m), label in zip(people, labels, strict=True)
    ]


def _by_channel(messages: Sequence[Said]) -> list[list[Said]]:
    groups: dict[str, list[Said]] = {}
    for m in messages:
        groups.setdefault(m.channel, []).append(m)
    return list(groups.values())


def grounded_sections(place: Place, messages: Sequence[Said]) -> list[Section]:
    """Open questions, decisions and action items, the busiest threads: each a quoted message.
    Questions and threads are judged within their channel."""
    channels = _by_channel(messages)
    questions = [q for group in channels for q in grounded.open_questions(group)]
    decided = grounded.decisions(messages)
    busiest = sorted(
        (t for group in channels for t in grounded.threads(group)),
        key=lambda t: (len(t.messages), t.people),
        reverse=True,
    )[:TOP]
    sections = []
    if questions:
        sections.append(Section(_("Open questions"), grounded.bullets(place, questions, LIST_LIMIT)))
    if decided:
        sections.append(Section(_("Decisions and action items"), grounded.bullets(place, decided, LIST_LIMIT)))
    if busiest:
        lines = [
            _(
                "- {thread}: {messages} messages, {people} people",
                thread=grounded.quoted(place, t.root),
                messages=len(t.messages),
                people=t.people,
            )
            for t in busiest
        ]
        sections.append(Section(_("Most discussed threads"), "\n".join(lines)))
    return sections


def per_day(ctx: PluginContext, messages: Sequence[Said]) -> dict[str, Counter[str]]:
    """Messages per mood for each day (in QUILL_SCHEDULER_TIMEZONE), oldest first."""
    zone = ZoneInfo(ctx.settings.scheduler_timezone)
    days: dict[str, Counter[str]] = {}
    for m in messages:
        days.setdefault(format_date(m.at.astimezone(zone), "EEE MM-dd"), Counter())[m.mood] += 1
    return days


def mood_section(ctx: PluginContext, place: Place, messages: Sequence[Said]) -> Section:
    """The mood per day, the threads with the most unhappy messages, and the newest unhappy and
    happy messages elsewhere, quoted: an outage or a teammate's frustration is never just a count."""
    total = Counter(m.mood for m in messages)
    lines = [_("Overall: {positive} positive, {neutral} neutral, {negative} negative.", **_moods(total))]
    for day, counts in per_day(ctx, messages).items():
        lines.append(
            _("- {day}: {positive} positive · {neutral} neutral · {negative} negative", day=day, **_moods(counts))
        )
    unhappy = sorted(
        (t for group in _by_channel(messages) for t in grounded.threads(group) if t.unhappy >= 2),
        key=lambda t: t.unhappy,
        reverse=True,
    )
    for thread in unhappy[:TOP]:
        thread_text = grounded.quoted(place, thread.root)
        lines.append(
            _("**Needs attention:** {thread}: {count} unhappy messages", thread=thread_text, count=thread.unhappy)
        )
    flagged = {m.key for t in unhappy[:TOP] for m in t.messages}
    for label, heading in (("negative", _("Unhappy:")), ("positive", _("Highlights:"))):
        said = [m for m in messages if m.mood == label and m.key not in flagged]
        if said:
            lines.append(f"{heading}\n" + grounded.bullets(place, said, TOP))
    return Section(_("Mood"), "\n".join(lines))


def _moods(counts: Counter[str]) -> dict[str, int]:
    """Each mood label's count, as a sentence's named placeholders."""
    return {label: counts[label] for label in mood.LABELS}


# The chart's legend: each mood's name as the reader's language writes it.
MOOD_NAMES = {"positive": N_("positive"), "neutral": N_("neutral"), "negative": N_("negative")}


def mood_chart(ctx: PluginContext, messages: Sequence[Said]) -> bytes:
    legend = {label: _(name) for label, name in MOOD_NAMES.items()}
    return chart.draw(per_day(ctx, messages), _("Messages per day, by mood"), legend)


async def digest(ctx: PluginContext, request: Request) -> Reply:
    here = request.place
    config = ctx.config(DigestSettings)
    channels = request.text.replace(",", " ").split() or [request.channel_id]
    now = datetime.now(UTC)
    last = (await ctx.scoped(DigestChannel, here)).last_run
    since = last or now - timedelta(hours=config.first_hours)
    rows = await ctx.memory.messages_since(here.transport, here.guild_id, channels, since)
    messages = await people_said(ctx, rows)
    sections = [activity(here, rows)] if rows else []
    sections += grounded_sections(here, messages)
    if messages:
        sections.append(mood_section(ctx, here, messages))
    for channel in channels:
        for result in await ctx.hooks.call("digest_sections", place=here._replace(channel_id=channel), since=since):
            if isinstance(section := result.value, Section):  # a plugin that failed is left out (logged)
                title = section.title if len(channels) == 1 else f"{section.title} (#{channel})"
                sections.append(Section(title, section.body))
    await ctx.update(DigestChannel, here, last_run=now)
    title = _("Digest since {since} UTC", since=format_datetime(since))
    if not sections:
        if config.when_empty == "skip":
            return Reply()
        return Reply(_("Nothing new."), title=title)
    text = "\n\n".join(f"**{s.title}**\n{s.body}" for s in sections)
    return Reply(text, title=title, image=mood_chart(ctx, messages) if messages else None)


async def mood_command(ctx: PluginContext, request: Request) -> Reply:
    hours = request.number("hours") or MOOD_DEFAULT_HOURS
    here = request.place
    since = datetime.now(UTC) - timedelta(hours=hours)
    rows = await ctx.memory.messages_since(here.transport, here.guild_id, [here.channel_id], since)
    messages = await people_said(ctx, rows)
    title = _("Mood of the last {hours} hour(s)", hours=hours)
    if not messages:
        return Reply(_("No messages from people here in that time."), title=title)
    return Reply(mood_section(ctx, here, messages).body, title=title, image=mood_chart(ctx, messages))


@hookimpl
def register_settings(register: Callable[[type], None]) -> None:
    register(DigestSettings)
    register(mood.MoodSettings)
    register(DigestChannel)


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(
        Command(
            "digest",
            N_("what happened here (or in the channels named) since the last digest"),
            digest,
            usage="[channel ...]",
            tool=ToolSpec(answers=True, status=N_("writing the digest…")),
        )
    )
    register(
        Command(
            "mood",
            N_("this channel's mood per day (positive / neutral / negative) and what needs attention"),
            mood_command,
            options=(
                Option(
                    "hours",
                    N_("look back N hours (default 24)"),
                    kind=int,
                    min=1,
                    max=MOOD_MAX_HOURS,
                ),
            ),
        )
    )
