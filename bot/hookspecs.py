"""The hooks a quill plugin can implement. Mark implementations with `bot.api.hookimpl`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from datetime import datetime

    from bot.api import Command, Place, PluginContext, Reply, Request, Section

hookspec = pluggy.HookspecMarker("quill")
hookimpl = pluggy.HookimplMarker("quill")


@hookspec
def register_commands(register: Callable[[Command], None]) -> None:
    """Register the commands this plugin offers, each with its help text and handler."""


@hookspec
def on_message(context: PluginContext, request: Request) -> Awaitable[Reply | None] | Reply | None:
    """See every message in a place the bot can read, addressed to it or not (moderation, indexing,
    auto-translation); return a Reply (or a coroutine giving one) to post, else None."""


@hookspec
def digest_sections(
    context: PluginContext, place: Place, since: datetime
) -> Awaitable[Section | None] | Section | None:
    """Contribute a section to the digest of `place`'s activity since `since` (or None)."""


@hookspec
def forget_user(context: PluginContext, user_id: str) -> Awaitable[int] | int | None:
    """Erase what this plugin keeps about `user_id` outside quill's tables (rows in tables with a
    personal column are erased by the core); return how many items went."""
