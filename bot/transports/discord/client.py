"""The Discord client quill runs, and its start-up: sharding, command sync, the scheduler."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import discord

from bot.api import QuillError
from bot.transports.discord.base import TRANSPORT
from bot.transports.discord.events import Events
from bot.transports.discord.slash import SlashCommands
from bot.transports.discord.translator import CatalogTranslator

if TYPE_CHECKING:
    from bot.app import Quill

log = logging.getLogger(__name__)


class DiscordStartError(QuillError):
    """The bot could not connect; the message is fit to show (it never contains the token)."""


class QuillClient(Events, SlashCommands):
    """quill on Discord: an `AutoShardedClient` (see `make_client`) that answers messages and
    slash commands (the plugins', /help and /quill) and posts scheduled replies."""

    def __init__(self, app: Quill, *, intents: discord.Intents | None = None, **options: Any) -> None:
        super().__init__(app, intents=intents, **options)
        self._add_plugin_commands()
        self._add_core_commands()

    async def setup_hook(self) -> None:
        await self.tree.set_translator(CatalogTranslator())
        if self.settings.discord_sync_commands:
            try:
                synced = await self.tree.sync()
            except discord.HTTPException as exc:
                log.error("could not sync slash commands globally: %s", exc)
            else:
                log.info("synced %d slash commands globally (shown within the hour)", len(synced))

    async def on_ready(self) -> None:
        log.info("connected to Discord as %s in %d servers", self.user, len(self.guilds))
        self.app.scheduler.posters[TRANSPORT] = self.post_scheduled
        await self.app.scheduler.run_jobs()


def make_client(app: Quill) -> QuillClient:
    """The client the settings ask for. Not sharded: one shard, one gateway connection (fine up
    to about 2,500 servers). Sharded: the shard count Discord recommends at login unless
    QUILL_DISCORD_SHARD_COUNT gives one, and optionally only some of the shards (for running
    several processes)."""
    settings = app.settings
    if not settings.discord_sharded:
        return QuillClient(app, shard_count=1)
    if settings.discord_shard_ids and settings.discord_shard_count is None:
        raise DiscordStartError("QUILL_DISCORD_SHARD_IDS needs QUILL_DISCORD_SHARD_COUNT (the total).")
    return QuillClient(app, shard_count=settings.discord_shard_count, shard_ids=settings.discord_shard_ids)


async def run_discord(app: Quill) -> None:
    """Connect and serve until stopped. Start-up faults raise DiscordStartError. (The token is
    kept out of the logs by the logging set-up, `bot.cli.setup_logging`.)"""
    token = app.settings.discord_token
    if token is None or not token.get_secret_value().strip():
        raise DiscordStartError("No Discord token: set QUILL_DISCORD_TOKEN (or DISCORD_TOKEN).")
    secret = token.get_secret_value().strip()
    client = make_client(app)
    try:
        async with client:
            await client.start(secret)
    except discord.LoginFailure:
        raise DiscordStartError(
            "Discord rejected the bot token (QUILL_DISCORD_TOKEN). Copy it again from the developer portal "
            "(Bot -> Reset Token)."
        ) from None
    except discord.PrivilegedIntentsRequired:
        raise DiscordStartError(
            "Discord refused the Message Content intent. Enable it in the developer portal: "
            "your application -> Bot -> Privileged Gateway Intents -> Message Content Intent."
        ) from None
    except (OSError, discord.HTTPException, discord.GatewayNotFound) as exc:
        raise DiscordStartError(f"Cannot reach Discord: {str(exc).replace(secret, '[redacted]')}") from None
