"""The hooks a quill plugin can implement. Mark implementations with `bot.api.hookimpl`.

The core calls each plugin's implementation on its own (bot/hooks.py), so a hook may be a plain
function or a coroutine function, and may leave out any argument it does not use: `context` is
offered to every hook.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from datetime import datetime

    from pydantic import BaseModel

    from bot.api import Command, Place, PluginContext, Reaction, Reply, Request, Section, WebPage

hookspec = pluggy.HookspecMarker("quill")
hookimpl = pluggy.HookimplMarker("quill")

# A maintenance job: its name, its schedule ("daily 03:30") and what it runs.
JobRegistrar = Callable[[str, str, Callable[[], Awaitable[Any]]], None]


@hookspec
def register_settings(register: Callable[[type[BaseModel]], None]) -> None:
    """Declare this plugin's settings: `PluginSettings` (global, from `QUILL_<PLUGIN>_*`),
    `GuildSettings` and `ChannelSettings` (defaults of what admins set per guild or channel)."""


@hookspec
def register_commands(register: Callable[[Command], None]) -> None:
    """Register the commands this plugin offers, each with its help text and handler."""


@hookspec
def register_jobs(context: PluginContext, register: JobRegistrar) -> None:
    """Register maintenance jobs the scheduler runs on every bot process's leader (retention)."""


@hookspec
def startup(context: PluginContext) -> Awaitable[None] | None:
    """Run once the core is assembled, before any message (load a deployed adapter)."""


@hookspec
def on_message(context: PluginContext, request: Request) -> Awaitable[Reply | None] | Reply | None:
    """See every message in a place the bot can read, addressed to it or not (moderation, indexing,
    auto-translation); return a Reply (or a coroutine giving one) to post, else None."""


@hookspec
def on_reaction(context: PluginContext, reaction: Reaction) -> Awaitable[str | None] | str | None:
    """Someone reacted to a message; return a short line for the log if it meant something here
    (a 👍 approving an answer), else None."""


@hookspec
def digest_sections(
    context: PluginContext, place: Place, since: datetime
) -> Awaitable[Section | None] | Section | None:
    """Contribute a section to the digest of `place`'s activity since `since` (or None)."""


@hookspec
def forget_user(context: PluginContext, user_id: str) -> Awaitable[int] | int | None:
    """Erase what this plugin keeps about `user_id` outside quill's tables (rows in tables with a
    personal column are erased by the core); return how many items went."""


@hookspec
def export_user(context: PluginContext, user_id: str) -> Awaitable[dict[str, Any] | None] | dict[str, Any] | None:
    """What this plugin keeps about `user_id` outside quill's tables, as JSON-ready data for
    `/export me` (None: nothing)."""


@hookspec
def register_web_pages(register: Callable[[WebPage], None]) -> None:
    """Add pages to the admin panel (bot/web/pages.py): the knowledge base, schedules, ... Each
    is shown under every server an admin may manage, and gets that server in its request."""
