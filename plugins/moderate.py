"""Moderation: flags messages with sensitive terms (and, if enabled, a model's toxic/spam/ok
label) and reports them to the mod channel. It never deletes anything itself: where an admin
turned deletion on, the report asks the transport to delete the message (`delete_original`).

Configuration: QUILL_MODERATION_* settings for every guild (`ModerationSettings`), and
`/moderation` per guild (`ModerationGuild`, read once per message).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from bot.api import (
    N_,
    ChatMessage,
    Command,
    GuildSettings,
    ModerationReport,
    Page,
    Place,
    PluginContext,
    PluginSettings,
    Redirect,
    Reply,
    Request,
    ToolSpec,
    WebPage,
    WebRequest,
    _,
    has_cjk,
    hookimpl,
    message_link,
)

log = logging.getLogger(__name__)

LABELS = ("ok", "toxic", "spam")
GRAMMAR = "root ::= " + " | ".join(f'"{label}"' for label in LABELS)
EXCERPT_CHARS = 300
PAGE_REPORTS = 100
TEMPLATES = Path(__file__).parent / "templates" / "moderate"
USAGE = N_(
    "Usage: /moderation [status] | add <term> | remove <term> | channel <channel id>|here | "
    "classify on|off | delete on|off"
)


class ModerationSettings(PluginSettings):
    """QUILL_MODERATION_*: what every guild gets unless it sets its own."""

    model_config = SettingsConfigDict(env_prefix="QUILL_MODERATION_")
    terms: list[str] = Field(default_factory=list, description="Terms flagged everywhere (JSON list).")
    channel: str = Field(
        "", description="The default mod channel for reports; empty: flagged messages are only logged."
    )
    classify: bool = Field(False, description="Ask the model to label each message toxic / spam / ok.")


class ModerationGuild(GuildSettings):
    """A guild's own moderation (/moderation); unset values follow ModerationSettings."""

    terms: list[str] = Field(default_factory=list, description="Terms flagged in this guild, beside the global ones.")
    channel: str | None = Field(None, max_length=64, description="Where reports go (a channel id).")
    classify: bool | None = Field(None, description="Model classification here (unset: the global setting).")
    delete: bool = Field(False, description="Ask the transport to delete flagged messages.")


@dataclass(frozen=True)
class InForce:
    """A guild's moderation as it applies: its own values over the global ones."""

    own_terms: list[str]
    terms: list[str]
    channel: str
    classify: bool
    delete: bool


def _normal(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def _pattern(term: str) -> str:
    """Whole words, where words are spaced: Chinese is written without spaces, so an edge of the
    term that is a CJK character needs no boundary (机密 is found in 这是机密文件)."""
    term = _normal(term)
    before = "" if has_cjk(term[:1]) else r"(?<!\w)"
    after = "" if has_cjk(term[-1:]) else r"(?!\w)"
    return before + re.escape(term) + after


def matched_terms(text: str, terms: list[str]) -> list[str]:
    """The terms found in `text` as whole words, ignoring case and look-alike forms."""
    body = _normal(text)
    return [t for t in terms if t.strip() and re.search(_pattern(t), body)]


async def classify(ctx: PluginContext, text: str) -> str:
    """The model's label for a message, constrained by a grammar to one of LABELS."""
    system = ctx.prompts.render("moderate_classify")
    options = ctx.options(max_tokens=4, temperature=0.0, grammar=GRAMMAR)
    result = await ctx.engine.chat([ChatMessage("system", system), ChatMessage("user", text[:2000])], options)
    return result.text.strip()


async def in_force(ctx: PluginContext, request: Request) -> InForce:
    """The guild's configuration over the global settings."""
    everywhere = ctx.config(ModerationSettings)
    here = await ctx.scoped(ModerationGuild, request.place)
    return InForce(
        own_terms=here.terms,
        terms=list(dict.fromkeys([*everywhere.terms, *here.terms])),
        channel=everywhere.channel if here.channel is None else here.channel,
        classify=everywhere.classify if here.classify is None else here.classify,
        delete=here.delete,
    )


@hookimpl
async def on_message(context: PluginContext, request: Request) -> Reply | None:
    """Report a flagged message to the mod channel; say nothing where nothing is wrong."""
    config = await in_force(context, request)
    if request.channel_id == config.channel:
        return None  # the mod channel itself, reports included
    reasons = [_("term “{term}”", term=t) for t in matched_terms(request.text, config.terms)]
    if not reasons and config.classify:
        label = await classify(context, request.text)
        if label != "ok":
            reasons.append(_("model: {label}", label=label))
    if not reasons:
        return None
    excerpt = request.text[:EXCERPT_CHARS] + ("…" if len(request.text) > EXCERPT_CHARS else "")
    await context.memory.add_report(
        ModerationReport(
            transport=request.transport,
            guild_id=request.guild_id,
            channel_id=request.channel_id,
            message_id=request.message_id or "",
            author_id=request.author_id,
            author_name=request.author_name,
            excerpt=excerpt,
            reasons=", ".join(reasons),
            deleted=config.delete and bool(config.channel),
        )
    )
    if not config.channel:
        log.warning("message %s flagged (%s) but no mod channel is set", request.message_id, ", ".join(reasons))
        return None
    who = request.author_name or request.author_id
    where = f"<#{request.channel_id}>" if request.transport == "discord" else request.channel_id
    message = request.message_id or _("(no id)")
    text = _(
        "Flagged: message {message} by {who} in {where}: {reasons}",
        message=message,
        who=who,
        where=where,
        reasons=", ".join(reasons),
    )
    if config.delete:
        text += " " + _("(deleted)")
    quoted = "\n".join("> " + line for line in excerpt.splitlines())
    return Reply(f"{text}\n{quoted}", channel_id=config.channel, delete_original=config.delete)


async def change_terms(ctx: PluginContext, place: Place, action: str, term: str) -> tuple[str, bool]:
    """Add or remove one of a guild's own terms, for /moderation and the panel alike; the answer
    and whether it failed."""
    term = term.strip()
    terms = (await ctx.scoped(ModerationGuild, place)).terms
    if not term:
        return _(USAGE), True
    if action == "add":
        if term not in terms:
            await ctx.update(ModerationGuild, place, terms=[*terms, term])
        return _("Messages with “{term}” will be reported.", term=term), False
    if term not in terms:
        return _("“{term}” is not one of this guild's terms (global terms are in the settings).", term=term), True
    await ctx.update(ModerationGuild, place, terms=[t for t in terms if t != term])
    return _("“{term}” is no longer flagged.", term=term), False


async def moderation(ctx: PluginContext, request: Request) -> Reply:
    action, _sep, value = request.text.partition(" ")
    action, value = action.lower() or "status", value.strip()
    config = await in_force(ctx, request)
    switch = {"on": True, "off": False}.get(value.lower())
    if action == "status":
        on, off = _("on"), _("off")
        lines = [
            _("Terms: {terms}", terms=", ".join(config.terms) or _("(none)")),
            _("Mod channel: {channel}", channel=config.channel or _("(none: flagged messages are only logged)")),
            _("Model classification: {state}", state=on if config.classify else off),
            _("Delete flagged messages: {state}", state=on if config.delete else off),
        ]
        return Reply("\n".join(lines))
    if action in ("add", "remove") and value:
        answer, failed = await change_terms(ctx, request.place, action, value)
        return Reply(answer, failed=failed)
    changes: dict[str, object]
    if action == "channel" and value:
        channel = request.channel_id if value.lower() == "here" else value.strip("<#>")
        changes = {"channel": channel}
        answer = _("Reports go to {channel}.", channel=channel)
    elif action in ("classify", "delete") and switch is not None:
        changes = {action: switch}
        state = _("on") if switch else _("off")
        if action == "classify":
            answer = _("Model classification is {state}.", state=state)
        else:
            answer = _("Deleting flagged messages is {state}.", state=state)
    else:
        return Reply(_(USAGE), failed=True)
    await ctx.update(ModerationGuild, request.place, **changes)
    return Reply(answer)


@hookimpl
def register_settings(register: Callable[[type], None]) -> None:
    register(ModerationSettings)
    register(ModerationGuild)


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(
        Command(
            "moderation",
            N_("configure moderation: flagged terms, the mod channel, model classification, deletion"),
            moderation,
            "[status|add <term>|remove <term>|channel <id>|here|classify on|off|delete on|off]",
            admin=True,
            tool=ToolSpec(
                changes=True,
                status=N_("changing moderation…"),
                text="status, add <term>, remove <term>, classify on|off or delete on|off",
            ),
        )
    )


# -- admin panel page -----------------------------------------------------------------------


async def moderation_page(ctx: PluginContext, request: WebRequest) -> Page | Redirect:
    """A server's recent reports (newest first, with jump links) to dismiss, and its own terms
    to add or remove as /moderation does."""
    place = request.place
    if request.method == "POST":
        action = request.form.get("action", "")
        if action == "dismiss":
            report = request.form.get("report", "")
            if report.isdigit() and await ctx.memory.delete_report(place.transport, place.guild_id, int(report)):
                return Redirect(request.url(), _("Report dismissed."))
            return Redirect(request.url(), _("There is no such report here."), error=True)
        if action in ("add", "remove"):
            answer, failed = await change_terms(ctx, place, action, request.form.get("term", ""))
            return Redirect(request.url(), answer, error=failed)
        return Redirect(request.url(), _(USAGE), error=True)
    reports = await ctx.memory.reports(place.transport, place.guild_id, PAGE_REPORTS)
    rows = [(r, message_link(place, r.message_id, r.channel_id)) for r in reports]
    everywhere = ctx.config(ModerationSettings).terms
    own = (await ctx.scoped(ModerationGuild, place)).terms
    return Page("moderation.html", {"rows": rows, "own": own, "everywhere": everywhere})


@hookimpl
def register_web_pages(register: Callable[[WebPage], None]) -> None:
    register(WebPage("moderation", N_("Moderation"), moderation_page, TEMPLATES, post=True))
