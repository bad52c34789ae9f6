"""Chat: plain conversation with memory of the place it happens in."""

from __future__ import annotations

from collections.abc import Callable

from bot.api import N_, Command, PluginContext, Reply, Request, _, hookimpl


async def chat(ctx: PluginContext, request: Request) -> Reply:
    if not request.text:
        return Reply(_("Usage: /chat <message>"), failed=True)
    system = ctx.prompts.render("chat_system", bot_name=ctx.settings.bot_name)
    return await ctx.converse(request, system)


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(
        Command("chat", N_("talk with the assistant; it remembers this channel's conversation"), chat, "<message>")
    )
