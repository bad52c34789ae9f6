"""Moderation: flags messages with sensitive terms (and, if enabled, a model's toxic/spam/ok
label) and reports them to the mod channel. It never deletes anything itself: where an admin
turned deletion on, the report asks the transport to delete the message (`delete_original`).

Configuration: QUILL_MODERATION_* settings for every guild, and `/moderation` per guild (stored
as one scope setting, read once per message).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable
from typing import Any

from bot.api import ChatMessage, Command, PluginContext, Reply, Request, hookimpl

log = logging.getLogger(__name__)

KEY = "moderation"
LABELS = ("ok", "toxic", "spam")
GRAMMAR = "root ::= " + " | ".join(f'"{label}"' for label in LABELS)
EXCERPT_CHARS = 300
USAGE = (
    "Usage: /moderation [status] | add <term> | remove <term> | channel <channel id>|here | "
    "classify on|off | delete on|off"
)


def _normal(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def matched_terms(text: str, terms: list[str]) -> list[str]:
    """The terms found in `text` as whole words, ignoring case and look-alike forms."""
    body = _normal(text)
    return [t for t in terms if re.search(rf"(?<!\w){re.escape(_normal(t))}(?!\w)", body)]


async def classify(ctx: PluginContext, text: str) -> str:
    """The model's label for a message, constrained by a grammar to one of LABELS."""
    system = ctx.prompts.render("moderate_classify")
    options = ctx.options(max_tokens=4, temperature=0.0, grammar=GRAMMAR)
    result = await ctx.engine.chat([ChatMessage("system", system), ChatMessage("user", text[:2000])], options)
    return result.text.strip()


async def _config(ctx: PluginContext, guild_id: str) -> dict[str, Any]:
    """The guild's configuration over the global settings."""
    stored = await ctx.memory.get_setting(guild_id, "", KEY, {})
    s = ctx.settings
    config: dict[str, Any] = {
        "terms": [],
        "channel": s.moderation_channel,
        "classify": s.moderation_classify,
        "delete": False,
    }
    config.update({k: v for k, v in dict(stored).items() if v is not None})
    config["all_terms"] = list(dict.fromkeys([*s.moderation_terms, *config["terms"]]))
    return config


@hookimpl
async def on_message(context: PluginContext, request: Request) -> Reply | None:
    """Report a flagged message to the mod channel; say nothing where nothing is wrong."""
    config = await _config(context, request.guild_id)
    if request.channel_id == config["channel"]:
        return None  # the mod channel itself, reports included
    reasons = [f"term “{t}”" for t in matched_terms(request.text, config["all_terms"])]
    if not reasons and config["classify"]:
        label = await classify(context, request.text)
        if label != "ok":
            reasons.append(f"model: {label}")
    if not reasons:
        return None
    if not config["channel"]:
        log.warning("message %s flagged (%s) but no mod channel is set", request.message_id, ", ".join(reasons))
        return None
    excerpt = request.text[:EXCERPT_CHARS] + ("…" if len(request.text) > EXCERPT_CHARS else "")
    who = request.author_name or request.author_id
    where = f"<#{request.channel_id}>" if request.transport == "discord" else request.channel_id
    text = f"Flagged: message {request.message_id or '(no id)'} by {who} in {where}: {', '.join(reasons)}"
    if config["delete"]:
        text += " (deleted)"
    quoted = "\n".join("> " + line for line in excerpt.splitlines())
    return Reply(f"{text}\n{quoted}", channel_id=config["channel"], delete_original=bool(config["delete"]))


async def moderation(ctx: PluginContext, request: Request) -> Reply:
    action, _, value = request.text.partition(" ")
    action, value = action.lower() or "status", value.strip()
    stored: dict[str, Any] = dict(await ctx.memory.get_setting(request.guild_id, "", KEY, {}))
    terms: list[str] = list(stored.get("terms", []))
    switch = {"on": True, "off": False}.get(value.lower())
    if action == "status":
        config = await _config(ctx, request.guild_id)
        return Reply(
            f"Terms: {', '.join(config['all_terms']) or '(none)'}\n"
            f"Mod channel: {config['channel'] or '(none: flagged messages are only logged)'}\n"
            f"Model classification: {'on' if config['classify'] else 'off'}\n"
            f"Delete flagged messages: {'on' if config['delete'] else 'off'}"
        )
    if action == "add" and value:
        stored["terms"] = [*terms, value] if value not in terms else terms
        answer = f"Messages with “{value}” will be reported."
    elif action == "remove" and value in terms:
        stored["terms"] = [t for t in terms if t != value]
        answer = f"“{value}” is no longer flagged."
    elif action == "remove" and value:
        return Reply(f"“{value}” is not one of this guild's terms (global terms are in the settings).", failed=True)
    elif action == "channel" and value:
        stored["channel"] = request.channel_id if value.lower() == "here" else value.strip("<#>")
        answer = f"Reports go to {stored['channel']}."
    elif action in ("classify", "delete") and switch is not None:
        stored[action] = switch
        what = "Model classification" if action == "classify" else "Deleting flagged messages"
        answer = f"{what} is {value.lower()}."
    else:
        return Reply(USAGE, failed=True)
    await ctx.memory.set_setting(request.guild_id, "", KEY, stored)
    return Reply(answer)


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(
        Command(
            "moderation",
            "configure moderation: flagged terms, the mod channel, model classification, deletion",
            moderation,
            "[status|add <term>|remove <term>|channel <id>|here|classify on|off|delete on|off]",
            admin=True,
        )
    )
