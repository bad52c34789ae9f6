"""Who administers quill on Discord, its help channels, and the commands the transport itself
adds: /help and the /quill admin group (sync, helpchannel add/remove/list)."""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

import discord
from discord import app_commands
from pydantic import Field

from bot.api import N_, GuildSettings, Place, Request, _, locale_scope
from bot.transports.discord.base import TRANSPORT, ClientBase

log = logging.getLogger(__name__)

ADMIN_REFUSAL = N_("This needs the Manage Server permission (or your id in QUILL_ADMIN_IDS).")


class DiscordGuild(GuildSettings):
    """A server's Discord settings kept by quill (`/quill help-channel`)."""

    namespace: ClassVar[str | None] = TRANSPORT

    help_channels: list[str] = Field(
        default_factory=list, description="Channels where each new question gets a thread of its own."
    )


class Admin(ClientBase):
    """The client's part that knows admins and help channels, and answers /help and /quill."""

    def is_admin(self, user: discord.abc.User, permissions: discord.Permissions | None = None) -> bool:
        """Admins: members with Manage Server, or ids listed in QUILL_ADMIN_IDS."""
        if str(user.id) in self.settings.admin_ids:
            return True
        if permissions is None:
            permissions = getattr(user, "guild_permissions", None)
        return bool(permissions and (permissions.manage_guild or permissions.administrator))

    async def help_channels(self, guild_id: str) -> list[str]:
        """The channel ids marked as help channels in a guild (read each time: another process
        sharing the database may have changed them)."""
        return (await self.app.context.scoped(DiscordGuild, Place(TRANSPORT, guild_id, ""))).help_channels

    async def _respond(self, interaction: discord.Interaction, text: str) -> None:
        """A short private (ephemeral) answer to an interaction."""
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException as exc:
            log.warning("could not answer an interaction: %s", exc)

    async def _speaking(self, interaction: discord.Interaction) -> str:
        """The locale to answer an interaction of the transport's own commands in, found as the
        router finds it for plugin commands (a channel's /language, the user's client language)."""
        request = Request(
            transport=TRANSPORT,
            guild_id=str(interaction.guild_id or ""),
            channel_id=str(interaction.channel_id or ""),
            author_id=str(interaction.user.id),
            text="",
            locale=str(interaction.locale),
            place_locale=str(interaction.guild_locale or ""),
        )
        return (await self.app.router.localized(request)).locale

    async def _refused(self, interaction: discord.Interaction) -> bool:
        """True (and the user told why) unless the user may run admin commands."""
        if self.is_admin(interaction.user, interaction.permissions):
            return False
        log.warning("refused an admin command for user %s", interaction.user.id)
        with locale_scope(await self._speaking(interaction)):
            await self._respond(interaction, _(ADMIN_REFUSAL))
        return True

    def _add_core_commands(self) -> None:
        """/help, and the /quill group of admin commands (sync, help channels)."""

        @self.tree.command(name="help", description=N_("list quill's commands"))
        async def help_command(interaction: discord.Interaction) -> None:
            admin = self.is_admin(interaction.user, interaction.permissions)
            with locale_scope(await self._speaking(interaction)):
                await self._respond(interaction, self.app.router.help_text(admin))

        admin = app_commands.Group(
            name="quill",
            description=N_("quill administration (Manage Server)"),
            default_permissions=discord.Permissions(manage_guild=True),
            guild_only=True,
        )
        channels = app_commands.Group(
            name="helpchannel", description=N_("channels where every question gets a thread"), parent=admin
        )

        @admin.command(name="sync", description=N_("publish the slash commands to Discord"))
        @app_commands.describe(
            scope=N_("guild: this server, now; global: all servers, within an hour; clear: remove this server's copies")
        )
        async def sync(interaction: discord.Interaction, scope: Literal["guild", "global", "clear"] = "guild") -> None:
            if await self._refused(interaction):
                return
            await interaction.response.defer(ephemeral=True, thinking=True)
            with locale_scope(await self._speaking(interaction)):
                await self._respond(interaction, await self.sync_commands(scope, interaction.guild))

        @channels.command(name="add", description=N_("make a channel a help channel"))
        @app_commands.describe(channel=N_("the channel (default: this one)"))
        async def add(interaction: discord.Interaction, channel: discord.TextChannel | None = None) -> None:
            await self._edit_help_channels(interaction, channel, add=True)

        @channels.command(name="remove", description=N_("stop treating a channel as a help channel"))
        @app_commands.describe(channel=N_("the channel (default: this one)"))
        async def remove(interaction: discord.Interaction, channel: discord.TextChannel | None = None) -> None:
            await self._edit_help_channels(interaction, channel, add=False)

        @channels.command(name="list", description=N_("list this server's help channels"))
        async def list_(interaction: discord.Interaction) -> None:
            ids = await self.help_channels(str(interaction.guild_id))
            with locale_scope(await self._speaking(interaction)):
                listed = " ".join(f"<#{i}>" for i in ids) or _("none")
                await self._respond(interaction, _("Help channels: {channels}", channels=listed))

        self.tree.add_command(admin)

    async def sync_commands(self, scope: str, guild: discord.abc.Snowflake | None) -> str:
        """Publish the slash commands; the answer says what happened."""
        try:
            if scope == "global":
                synced = await self.tree.sync()
                return _(
                    "Synced {count} commands globally; Discord may take up to an hour to show them.", count=len(synced)
                )
            assert guild is not None  # /quill is guild-only
            if scope == "clear":
                self.tree.clear_commands(guild=guild)
                await self.tree.sync(guild=guild)
                return _("Removed this server's copies of the commands; the global ones remain.")
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
            return _("Synced {count} commands to this server; they are usable now.", count=len(synced))
        except discord.HTTPException as exc:
            log.error("slash command sync (%s) failed: %s", scope, exc)
            return _("Discord refused the sync: {error}", error=exc)

    async def _edit_help_channels(
        self, interaction: discord.Interaction, channel: discord.abc.GuildChannel | None, *, add: bool
    ) -> None:
        if await self._refused(interaction):
            return
        locale = await self._speaking(interaction)
        target = channel or interaction.channel
        if target is None or isinstance(target, discord.Thread) or interaction.guild_id is None:
            with locale_scope(locale):
                await self._respond(interaction, _("Pick a text channel of this server."))
            return
        guild_id = str(interaction.guild_id)
        ids = await self.help_channels(guild_id)
        key = str(target.id)
        ids = sorted({*ids, key}) if add else [i for i in ids if i != key]
        await self.app.context.update(DiscordGuild, Place(TRANSPORT, guild_id, ""), help_channels=ids)
        with locale_scope(locale):
            if add:
                done = _("<#{channel}> is now a help channel: each new question gets a thread.", channel=key)
            else:
                done = _("<#{channel}> is no longer a help channel.", channel=key)
            await self._respond(interaction, done)
