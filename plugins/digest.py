"""Digest: what happened in a place (or several channels) since the last digest.

Its own facts (message counts, most active people and channels, links to where they started)
plus every plugin's `digest_sections` (the summarizer adds key topics, decisions and open
questions). The time of the last digest is kept per place, so a scheduled `/digest` covers
exactly the period since the one before.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from bot.api import Command, Place, PluginContext, Reply, Request, Section, hookimpl

LAST_RUN = "digest.last_run"
TOP = 3


def _link(place: Place, channel_id: str, message_id: str | None) -> str:
    """A jump link where the transport has them (Discord), else the channel's name."""
    if place.transport == "discord" and message_id and place.guild_id:
        return f"<#{channel_id}> ([start](https://discord.com/channels/{place.guild_id}/{channel_id}/{message_id}))"
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
    lines = [f"{len(people)} messages from {len(by_author)} people, {answers} answers from the bot."]
    if by_author:
        lines.append("Most active: " + ", ".join(f"{name} ({n})" for name, n in by_author.most_common(TOP)))
    if by_channel:
        lines.append("Most active threads:")
        for channel, n in by_channel.most_common(TOP):
            lines.append(f"- {_link(place, channel, first[channel])}: {n} messages")
    return Section("Activity", "\n".join(lines))


async def digest(ctx: PluginContext, request: Request) -> Reply:
    here = Place(request.transport, request.guild_id, request.channel_id)
    channels = request.text.replace(",", " ").split() or [request.channel_id]
    now = datetime.now(UTC)
    last = await ctx.memory.get_setting(here.guild_id, here.channel_id, LAST_RUN)
    since = datetime.fromisoformat(last) if last else now - timedelta(hours=ctx.settings.digest_first_hours)
    rows = await ctx.memory.messages_since(here.transport, here.guild_id, channels, since)
    sections = [activity(here, rows)] if rows else []
    if ctx.digest_sections is not None:
        for channel in channels:
            for section in await ctx.digest_sections(Place(here.transport, here.guild_id, channel), since):
                title = section.title if len(channels) == 1 else f"{section.title} (#{channel})"
                sections.append(Section(title, section.body))
    await ctx.memory.set_setting(here.guild_id, here.channel_id, LAST_RUN, now.isoformat())
    title = f"Digest since {since:%Y-%m-%d %H:%M} UTC"
    if not sections:
        if ctx.settings.digest_when_empty == "skip":
            return Reply()
        return Reply("Nothing new.", title=title)
    return Reply("\n\n".join(f"**{s.title}**\n{s.body}" for s in sections), title=title)


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(
        Command(
            "digest",
            "what happened here (or in the channels named) since the last digest",
            digest,
            usage="[channel ...]",
        )
    )
