"""Glue between quill's Discord client and dpytest's simulated Discord, for tests/test_discord.py.

dpytest 0.7.0 drives messages, DMs, typing and edits, but lacks threads and slash commands
(`app_commands`, dpytest issue #92). So threads are created here through discord.py's own
THREAD_CREATE parsing, and slash commands arrive as real INTERACTION_CREATE payloads parsed by
discord.py itself, with only the webhook HTTP layer (how Discord receives interaction answers)
replaced by a recorder: the command tree, option parsing, autocomplete and the callbacks all run
as in production.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any
from unittest import mock

import discord
import discord.ext.test as dpytest
from discord.ext.test import backend, factories, runner
from discord.webhook.async_ import AsyncWebhookAdapter

from bot.transports.discord import QuillClient


class FakeDiscordApi:
    """What dpytest's fake HTTP client lacks: threads from messages and command sync."""

    def __init__(self, client: QuillClient) -> None:
        self.client = client
        self.threads: list[discord.Thread] = []
        self.synced: dict[str, list[dict[str, Any]]] = {}

    async def start_thread_with_message(
        self, channel_id: int, message_id: int, *, name: str, auto_archive_duration: int, **_: Any
    ) -> dict[str, Any]:
        channel = self.client.get_channel(channel_id)
        data = {
            "id": factories.make_id(),
            "type": discord.ChannelType.public_thread.value,
            "guild_id": channel.guild.id,
            "parent_id": channel_id,
            "owner_id": self.client.me.id,
            "name": name,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": auto_archive_duration,
                "archive_timestamp": "2026-11-23T00:00:00+00:00",
                "locked": False,
            },
            "message_count": 0,
            "member_count": 1,
            "rate_limit_per_user": 0,
            "newly_created": True,
        }
        backend.get_state().parse_thread_create(data)
        self.threads.append(channel.guild.get_thread(data["id"]))
        return data

    async def bulk_upsert_global_commands(self, application_id: int, payload: list[dict[str, Any]]) -> list:
        return self._upsert("global", application_id, payload)

    async def bulk_upsert_guild_commands(
        self, application_id: int, guild_id: int, payload: list[dict[str, Any]]
    ) -> list:
        return self._upsert(str(guild_id), application_id, payload)

    def _upsert(self, scope: str, application_id: int, payload: list[dict[str, Any]]) -> list:
        self.synced[scope] = payload
        return [{**c, "id": factories.make_id(), "application_id": application_id} for c in payload]


# dpytest 0.7.0's configure() refuses every AutoShardedClient ("Sharded clients not yet
# supported"), and quill's client always is one (a single shard unless sharding is asked for).
# dpytest's fake state and HTTP client serve it as they serve a plain Client, since the tests
# never reach a shard's gateway connection; so configure() runs with its guard (its module's
# `discord.AutoShardedClient`, read only there) seeing a class that no client is an instance of.
UNGUARDED = SimpleNamespace(Client=discord.Client, AutoShardedClient=type("NotAClient", (), {}))


def attach(client: QuillClient) -> FakeDiscordApi:
    """Configure dpytest for `client` (channels general/mods/help, members ada/bob) and fill
    the gaps listed above."""
    with mock.patch.object(runner, "discord", UNGUARDED):
        dpytest.configure(client, text_channels=["general", "mods", "help"], members=["ada", "bob"])
    api = FakeDiscordApi(client)
    http = client.http
    http.start_thread_with_message = api.start_thread_with_message
    http.bulk_upsert_global_commands = api.bulk_upsert_global_commands
    http.bulk_upsert_guild_commands = api.bulk_upsert_guild_commands
    # dpytest swaps the client's connection state and HTTP client after the command tree was
    # bound to the originals; point the tree at the ones in use.
    state = client._connection
    state._command_tree = client.tree
    state.application_id = client.me.id
    client.tree._state, client.tree._http = state, http
    return api


async def post(
    channel: discord.abc.Messageable,
    author: discord.Member,
    content: str,
    *,
    reply_to: discord.Message | None = None,
) -> discord.Message:
    """A user's message, as Discord would deliver it (in threads too, and as a reply), then wait
    until the bot has handled it."""
    guild = author.guild
    data = factories.make_message_dict(
        channel,
        author,
        content=content,
        mentions=backend.find_user_mentions(content, guild),
        guild_id=guild.id,
    )
    if reply_to is not None:
        data["message_reference"] = {
            "message_id": reply_to.id,
            "channel_id": reply_to.channel.id,
            "guild_id": guild.id,
        }
    state = backend.get_state()
    backend._cur_config.messages.setdefault(channel.id, []).append(data)  # type: ignore[union-attr]
    state.parse_message_create(data)
    await dpytest.run_all_events()
    return state._get_message(data["id"])


async def bot_messages(client: discord.Client, channel: discord.abc.Messageable) -> list[discord.Message]:
    """The bot's messages in a channel, oldest first, as they are now (after edits)."""
    found = [m async for m in channel.history(limit=200)]
    return sorted((m for m in found if m.author.id == client.user.id), key=lambda m: m.id)  # type: ignore[union-attr]


class RecordingWebhookAdapter(AsyncWebhookAdapter):
    """Records what the bot sends Discord in answer to interactions, and answers like Discord."""

    def __init__(self, client: discord.Client, channel: discord.abc.Messageable) -> None:
        super().__init__()
        self.client, self.channel = client, channel
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    async def request(self, route: Any, session: Any, *, payload: Any = None, multipart: Any = None, **_: Any):
        if multipart:
            payload = json.loads(next(p["value"] for p in multipart if p["name"] == "payload_json"))
        self.calls.append((route.method, route.path, payload or {}))
        if route.path.endswith("/callback"):
            return {"interaction": {"id": str(route.webhook_id), "type": 2}}
        message = factories.make_message_dict(
            self.channel, self.client.user, content=(payload or {}).get("content") or ""
        )
        message["embeds"] = (payload or {}).get("embeds") or []
        return message

    def texts(self) -> list[str]:
        """Every text the bot showed: response contents, edits and follow-ups, in order."""
        shown = []
        for _, _, payload in self.calls:
            data = payload.get("data", payload)
            if data.get("content"):
                shown.append(data["content"])
        return shown

    def ephemeral(self) -> bool:
        """Whether the first answer was private to the user."""
        _, _, payload = self.calls[0]
        return bool(payload.get("data", {}).get("flags", 0) & discord.MessageFlags(ephemeral=True).value)


def interaction_payload(
    client: discord.Client,
    channel: discord.TextChannel,
    member: discord.Member,
    command: list[str],
    options: list[dict[str, Any]],
    *,
    permissions: discord.Permissions | None = None,
    autocomplete: bool = False,
) -> dict[str, Any]:
    """An INTERACTION_CREATE payload for `/command ...` (names of group, subgroup, command)."""
    for name in reversed(command[1:]):
        kind = 1 if not options or options[0].get("type") != 1 else 2
        options = [{"name": name, "type": kind, "options": options}]
    return {
        "id": str(factories.make_id()),
        "application_id": str(client.user.id),  # type: ignore[union-attr]
        "type": 4 if autocomplete else 2,
        "token": "interaction-token",
        "version": 1,
        "guild_id": str(channel.guild.id),
        "channel_id": str(channel.id),
        "channel": {
            "id": str(channel.id),
            "type": 0,
            "guild_id": str(channel.guild.id),
            "name": channel.name,
        },
        "member": {
            "user": factories.dict_from_user(member._user),
            "roles": [],
            "joined_at": "2026-11-01T00:00:00+00:00",
            "deaf": False,
            "mute": False,
            "flags": 0,
            "permissions": str((permissions or discord.Permissions.none()).value),
        },
        "data": {"id": str(factories.make_id()), "name": command[0], "type": 1, "options": options},
        "locale": "en-US",
        "guild_locale": "en-US",
        "app_permissions": "0",
        "attachment_size_limit": 8 * 1024 * 1024,
    }


async def invoke(payload: dict[str, Any]) -> None:
    """Deliver an interaction to the client as the gateway would, and wait for its handler."""
    backend.get_state().parse_interaction_create(payload)
    await asyncio.sleep(0)
    for task in asyncio.all_tasks():
        if task.get_name() == "CommandTree-invoker":
            await task
    await dpytest.run_all_events()
