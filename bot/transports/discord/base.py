"""The discord.py client bound to a quill core: what every part of the transport builds on."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from bot.memory import StorageError

if TYPE_CHECKING:
    from bot.app import Quill

log = logging.getLogger(__name__)

TRANSPORT = "discord"
# discord.py waits out rate limits itself; one longer than this raises RateLimited instead.
MAX_RATE_LIMIT_WAIT = 30.0


class ClientBase(discord.AutoShardedClient):
    """An `AutoShardedClient` (one shard unless sharding is asked for, see `make_client`) that
    serves one quill core, never pings anyone and has a slash-command tree."""

    def __init__(self, app: Quill, *, intents: discord.Intents | None = None, **options: Any) -> None:
        if intents is None:
            intents = discord.Intents.default()
            intents.message_content = True  # privileged: enable it in the developer portal
        super().__init__(
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
            max_ratelimit_timeout=MAX_RATE_LIMIT_WAIT,
            **options,
        )
        self.app = app
        self.settings = app.settings
        self.tree = app_commands.CommandTree(self)

    @property
    def me(self) -> discord.ClientUser:
        """The bot's own user: known from login on, so in every event handler."""
        assert self.user is not None, "used before login"
        return self.user


async def storing(write: Awaitable[Any]) -> None:
    """Run a memory write for a Discord event; a database fault is logged, not raised."""
    try:
        await write
    except StorageError as exc:
        log.warning("memory not updated: %s", exc)
