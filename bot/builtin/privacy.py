"""Data controls, a core plugin: erase, export and retention of what quill stores about people.

Rows are found through the personal columns of every table (see `bot.models.PERSONAL`), and
plugins erase and export what they keep elsewhere through the `forget_user` and `export_user`
hooks (Red-DiscordBot pairs `red_delete_data_for_user` with `red_get_data_for_user` the same way).
Each plugin is called on its own, so one that fails is named in the reply and the others still run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from bot.api import (
    N_,
    Command,
    Download,
    GuildSettings,
    HookResult,
    JobRegistrar,
    Option,
    Page,
    PluginContext,
    PluginSettings,
    Redirect,
    Reply,
    Request,
    ToolSpec,
    WebPage,
    WebRequest,
    _,
    guild_tag,
    hookimpl,
    ngettext,
    place_tag,
    user_tag,
)
from bot.memory import MAX_RETENTION_DAYS
from bot.models import utcnow

log = logging.getLogger(__name__)

USAGE = "me | channel | user <id>"
TEMPLATES = Path(__file__).parent / "templates" / "privacy"
# Named like a plugin where an erase failed: the engine's saved conversation states.
ENGINE = "engine"


class RetentionSettings(PluginSettings):
    """QUILL_RETENTION_*: how long messages are kept where a guild sets nothing, and when the
    retention job runs."""

    model_config = SettingsConfigDict(env_prefix="QUILL_RETENTION_")
    days: int = Field(0, ge=0, le=MAX_RETENTION_DAYS, description="Days messages are kept; 0: until erased.")
    when: str = Field("daily 03:30", description="When old messages are deleted (a schedule, as /schedule takes).")


class PrivacyGuild(GuildSettings):
    """A guild's own retention (/retention)."""

    retention_days: int | None = Field(
        None, ge=0, le=MAX_RETENTION_DAYS, description="Days messages are kept here; unset: QUILL_RETENTION_DAYS."
    )


def _failed(results: list[HookResult]) -> str:
    """The plugins whose hook failed, for the reply ("" when none did)."""
    return ", ".join(sorted({r.plugin for r in results if r.failed}))


async def forget(ctx: PluginContext, request: Request) -> Reply:
    what, _sep, rest = request.text.partition(" ")
    if what == "me":
        return await _forget_user(ctx, request.author_id, _("you"))
    if what not in ("channel", "user"):
        return Reply(_("Usage: /forget {usage}", usage=USAGE), failed=True)
    if not request.is_admin:
        hint = f" {_(request.admin_hint)}" if request.admin_hint else ""
        refusal = _("/forget {what} is for admins only.{hint} /forget me erases your own data.", what=what, hint=hint)
        return Reply(refusal, failed=True)
    if what == "user":
        if not (user_id := rest.strip().strip("<@!>")):
            return Reply(_("Usage: /forget user <id or mention>"), failed=True)
        return await _forget_user(ctx, user_id, _("user {id}", id=user_id))
    count = await ctx.memory.forget_place(*request.place)
    states_kept = await _forget_states(ctx, [place_tag(request.place)])
    log.info("forgot channel %s/%s: %d messages", request.guild_id, request.channel_id, count)
    erased = ngettext(
        "Erased this channel's memory: {count} message.", "Erased this channel's memory: {count} messages.", count
    )
    if states_kept:
        not_erased = _("Not erased: what the plugin(s) {plugins} keep; that failed and is logged.", plugins=ENGINE)
        return Reply(f"{erased} {not_erased}", failed=True)
    return Reply(erased)


async def _forget_user(ctx: PluginContext, user_id: str, who: str) -> Reply:
    """Erase quill's rows, then ask every plugin in turn; the reply lists what went and names
    any plugin that failed, so a partial erase is never reported as a whole one."""
    counts = await ctx.memory.forget_user(user_id)
    states_kept = await _forget_states(ctx, [user_tag(user_id)])
    results = await ctx.hooks.call("forget_user", user_id=user_id)
    if erased := sum(int(r.value) for r in results if not r.failed and r.value):
        counts["plugin data"] = erased
    log.info("forgot user %s: %s", user_id, counts or "nothing stored")
    failed = ", ".join(filter(None, [_failed(results), ENGINE if states_kept else ""]))
    not_erased = _("Not erased: what the plugin(s) {plugins} keep; that failed and is logged.", plugins=failed)
    failures = f" {not_erased}" if failed else ""
    if not counts:
        return Reply(_("Nothing is stored about {who}.", who=who) + failures, failed=bool(failures))
    listed = ", ".join(_("{count} from {table}", count=n, table=table) for table, n in sorted(counts.items()))
    if failures:
        erased = _("Erased part of what is stored about {who}: {listed}.", who=who, listed=listed)
    else:
        erased = _("Erased everything stored about {who}: {listed}.", who=who, listed=listed)
    return Reply(erased + failures, failed=bool(failures))


async def _export_document(ctx: PluginContext, user_id: str) -> tuple[dict[str, Any], int, str]:
    """Everything stored about `user_id` (quill's rows and each plugin's), the row count, and the
    plugins whose export failed."""
    data: dict[str, Any] = dict(await ctx.memory.export_user(user_id))
    results = await ctx.hooks.call("export_user", user_id=user_id)
    plugins = {r.plugin: r.value for r in results if not r.failed and r.value}
    document = {"user_id": user_id, "exported_at": utcnow().isoformat(), "tables": data, "plugins": plugins}
    return document, sum(len(v) for v in data.values()), _failed(results)


async def export(ctx: PluginContext, request: Request) -> Reply:
    if request.text not in ("", "me"):
        return Reply(_("Usage: /export me"), failed=True)
    document, rows, failed = await _export_document(ctx, request.author_id)
    folder = ctx.settings.data_dir / "exports"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"quill-export-{_safe(request.author_id)}-{stamp}.json"
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    absent = _("Missing: what the plugin(s) {plugins} keep; that failed and is logged.", plugins=failed)
    missing = f" {absent}" if failed else ""
    return Reply(_("Your data: {rows} rows, in {path}", rows=rows, path=path) + missing, file=path, failed=bool(failed))


async def retention(ctx: PluginContext, request: Request) -> Reply:
    days = request.options.get("days")
    if days is None:
        current = (await ctx.scoped(PrivacyGuild, request.place)).retention_days
        days = ctx.config(RetentionSettings).days if current is None else current
        if days:
            return Reply(ngettext("Messages here are kept {count} day.", "Messages here are kept {count} days.", days))
        return Reply(_("Messages here are kept until erased."))
    await ctx.update(PrivacyGuild, request.place, retention_days=days)
    return Reply(_("Messages older than {days} days will be deleted daily (0: never).", days=days))


async def apply_retention(ctx: PluginContext, now: datetime | None = None) -> dict[str, int]:
    """The retention job: delete old messages per guild, log how many."""
    key = ctx.registry.entry(PrivacyGuild).key("retention_days")
    deleted = await ctx.memory.apply_retention(ctx.config(RetentionSettings).days, key, now)
    if deleted:
        await _forget_states(ctx, [guild_tag(guild) for guild in deleted])
    log.info("retention: deleted %s", deleted or "nothing")
    return deleted


async def _forget_states(ctx: PluginContext, tags: list[str]) -> bool:
    """Drop the engine's saved conversation states (host memory, disk) that may hold erased
    messages; True when that failed (logged), so the reply never calls the erase whole."""
    try:
        dropped = await ctx.engine.forget_states(tags)
    except Exception:
        log.exception("could not drop the model's saved states for %s", tags)
        return True
    log.info("dropped %d saved model state(s) for %s", dropped, tags)
    return False


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)[:64]


@hookimpl
def register_settings(register: Callable[[type], None]) -> None:
    register(RetentionSettings)
    register(PrivacyGuild)


@hookimpl
def register_jobs(context: PluginContext, register: JobRegistrar) -> None:
    async def run() -> None:
        await apply_retention(context)

    register("quill-retention", context.config(RetentionSettings).when, run)


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(
        Command(
            "forget",
            N_("erase stored data: yours, or (admins) a channel's or a user's"),
            forget,
            USAGE,
            private=True,
            tool=ToolSpec(
                changes=True,
                status=N_("erasing stored data…"),
                text="me (your own data) or channel (this channel's messages)",
                choices=("me", "channel"),
            ),
        )
    )
    register(Command("export", N_("get everything stored about you as a JSON file"), export, "me"))
    days = Option(
        "days", N_("days to keep messages (0: until erased)"), kind=int, min=0, max=MAX_RETENTION_DAYS, positional=True
    )
    register(
        Command(
            "retention", N_("show or set how many days messages are kept here"), retention, admin=True, options=(days,)
        )
    )


async def privacy_page(ctx: PluginContext, request: WebRequest) -> Page | Redirect | Download:
    """Export or erase a user (as /export and /forget user do), and the retention in force here."""
    if request.method == "POST":
        user_id = request.form.get("user", "").strip().strip("<@!>")[:64]
        if not user_id:
            return Redirect(request.url(), _("Give a user id."), error=True)
        if request.form.get("action") == "export":
            if not request.every:  # a user's data from every server: not for one server's admin
                return Redirect(request.url(), _("Only an admin of every server may export a user."), error=True)
            document, _rows, _failed_plugins = await _export_document(ctx, user_id)
            body = json.dumps(document, indent=2, ensure_ascii=False, default=str).encode()
            return Download(f"quill-export-{_safe(user_id)}.json", body)
        if request.form.get("action") == "erase":
            log.info("panel: %s erases user %s", request.user, user_id)
            reply = await _forget_user(ctx, user_id, _("user {id}", id=user_id))
            return Redirect(request.url(), reply.text, error=reply.failed)
        return Redirect(request.url(), _("Usage: /forget {usage}", usage=USAGE), error=True)
    own = (await ctx.scoped(PrivacyGuild, request.place)).retention_days
    days = ctx.config(RetentionSettings).days if own is None else own
    return Page("privacy.html", {"days": days, "own": own is not None})


@hookimpl
def register_web_pages(register: Callable[[WebPage], None]) -> None:
    register(WebPage("privacy", N_("Privacy"), privacy_page, TEMPLATES, post=True))
