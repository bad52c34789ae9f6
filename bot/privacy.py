"""Data controls, a core plugin: erase, export and retention of what quill stores about people.

Rows are found through the personal columns of every table (see `bot.models.PERSONAL`), and
plugins erase what they keep elsewhere through the `forget_user` hook.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from datetime import datetime

from bot.api import Command, Option, PluginContext, Reply, Request, hookimpl
from bot.memory import MAX_RETENTION_DAYS, RETENTION_KEY
from bot.models import utcnow

log = logging.getLogger(__name__)

USAGE = "me | channel | user <id>"


async def forget(ctx: PluginContext, request: Request) -> Reply:
    what, _, rest = request.text.partition(" ")
    if what == "me":
        return await _forget_user(ctx, request.author_id, "you")
    if what not in ("channel", "user"):
        return Reply(f"Usage: /forget {USAGE}", failed=True)
    if not request.is_admin:
        hint = f" {request.admin_hint}" if request.admin_hint else ""
        return Reply(f"/forget {what} is for admins only.{hint} /forget me erases your own data.", failed=True)
    if what == "user":
        if not (user_id := rest.strip().strip("<@!>")):
            return Reply("Usage: /forget user <id or mention>", failed=True)
        return await _forget_user(ctx, user_id, f"user {user_id}")
    count = await ctx.memory.forget_place(request.transport, request.guild_id, request.channel_id)
    log.info("forgot channel %s/%s: %d messages", request.guild_id, request.channel_id, count)
    return Reply(f"Erased this channel's memory: {count} messages.")


async def _forget_user(ctx: PluginContext, user_id: str, who: str) -> Reply:
    counts = await ctx.memory.forget_user(user_id)
    for result in ctx.hooks.forget_user(context=ctx, user_id=user_id):
        extra = await result if inspect.isawaitable(result) else result
        if extra:
            counts["plugin data"] = counts.get("plugin data", 0) + extra
    log.info("forgot user %s: %s", user_id, counts or "nothing stored")
    if not counts:
        return Reply(f"Nothing is stored about {who}.")
    listed = ", ".join(f"{n} from {table}" for table, n in sorted(counts.items()))
    return Reply(f"Erased everything stored about {who}: {listed}.")


async def export(ctx: PluginContext, request: Request) -> Reply:
    if request.text not in ("", "me"):
        return Reply("Usage: /export me", failed=True)
    data = await ctx.memory.export_user(request.author_id)
    folder = ctx.settings.data_dir / "exports"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"quill-export-{_safe(request.author_id)}-{stamp}.json"
    document = {"user_id": request.author_id, "exported_at": utcnow().isoformat(), "tables": data}
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False), encoding="utf-8")
    rows = sum(len(v) for v in data.values())
    return Reply(f"Your data: {rows} rows, in {path}", file=path)


async def retention(ctx: PluginContext, request: Request) -> Reply:
    days = request.options.get("days")
    if days is None:
        current = await ctx.memory.get_setting(request.guild_id, "", RETENTION_KEY)
        days = ctx.settings.retention_days if current is None else current
        return Reply(f"Messages here are kept {f'{days} days' if days else 'until erased'}.")
    await ctx.memory.set_setting(request.guild_id, "", RETENTION_KEY, days)
    return Reply(f"Messages older than {days} days will be deleted daily (0: never).")


async def apply_retention(ctx: PluginContext, now: datetime | None = None) -> dict[str, int]:
    """The retention job: delete old messages per guild, log how many."""
    deleted = await ctx.memory.apply_retention(ctx.settings.retention_days, now)
    log.info("retention: deleted %s", deleted or "nothing")
    return deleted


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)[:64]


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(
        Command("forget", "erase stored data: yours, or (admins) a channel's or a user's", forget, USAGE, private=True)
    )
    register(Command("export", "get everything stored about you as a JSON file", export, "me"))
    days = Option(
        "days", "days to keep messages (0: until erased)", kind=int, min=0, max=MAX_RETENTION_DAYS, positional=True
    )
    register(
        Command("retention", "show or set how many days messages are kept here", retention, admin=True, options=(days,))
    )
