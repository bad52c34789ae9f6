"""Chat: plain conversation with memory of the place it happens in, in which the model may call
the tools the asker may use (bot/tools.py); and the date and time, a tool it often needs."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from bot.api import N_, Command, PluginContext, Reply, Request, ToolSpec, _, format_datetime, hookimpl


async def chat(ctx: PluginContext, request: Request) -> Reply:
    if not request.text:
        return Reply(_("Usage: /chat <message>"), failed=True)
    system = ctx.prompts.render("chat_system", bot_name=ctx.settings.bot_name)
    return await ctx.converse_with_tools(request, system)


async def now(ctx: PluginContext, request: Request) -> Reply:
    """The date and time in UTC, written the reader's way, with the ISO form the model can read."""
    moment = datetime.now(UTC)
    return Reply(
        _("It is {when} (UTC), {iso}.", when=format_datetime(moment), iso=moment.isoformat(timespec="minutes"))
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(
        Command("chat", N_("talk with the assistant; it remembers this channel's conversation"), chat, "<message>")
    )
    register(
        Command(
            "time",
            N_("the current date and time"),
            now,
            tool=ToolSpec(status=N_("checking the time…"), examples=("What is the date today?", "现在几点了？")),
        )
    )
