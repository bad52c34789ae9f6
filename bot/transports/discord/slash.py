"""Plugin commands as Discord slash commands.

discord.py reads a slash command's options from its callback's signature, so each `Command`
gets a callback whose `inspect.Signature` lists its `Option`s, typed and bounded as declared:
whole numbers as `Range[int, min, max]`, text as `Range[str, min, max]`, closed choices as a
choice list, suggested ones as autocomplete, plus a `text` option for the free text of a
command that takes one. Discord then refuses what is out of bounds before it is sent; the
router checks again, as for console text."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import discord
from discord import app_commands

from bot.api import Command, Option, Request, _, locale_scope
from bot.transports.discord.admin import ADMIN_REFUSAL, Admin
from bot.transports.discord.base import TRANSPORT
from bot.transports.discord.confirm import confirmer
from bot.transports.discord.delivery import Delivery, InteractionDestination

log = logging.getLogger(__name__)

DESCRIPTION_LIMIT = 100  # Discord's limit for command and option descriptions
AUTOCOMPLETE_LIMIT = 25
TEXT_OPTION = "text"
SLASH_TEXT_LIMIT = 6000  # Discord's longest string option

Run = Callable[[discord.Interaction, Command, str, dict[str, str | int]], Awaitable[None]]


class SlashCommands(Admin, Delivery):
    """The client's part that publishes the plugins' commands and runs them for interactions."""

    def _add_plugin_commands(self) -> None:
        """One slash command per plugin command; one Discord cannot take is logged and skipped."""
        for command in self.app.router.commands.values():
            try:
                slash = slash_command(command, self.run_slash_command)
            except (TypeError, ValueError) as exc:
                log.error("/%s cannot be a slash command (%s); mention the bot to use it", command.name, exc)
            else:
                self.tree.add_command(slash)

    def interaction_request(
        self, interaction: discord.Interaction, command: str, text: str, options: dict[str, str | int]
    ) -> Request:
        return Request(
            transport=TRANSPORT,
            guild_id=str(interaction.guild_id or ""),
            channel_id=str(interaction.channel_id),
            author_id=str(interaction.user.id),
            author_name=interaction.user.display_name,
            text=text,
            is_admin=self.is_admin(interaction.user, interaction.permissions),
            is_dm=interaction.guild_id is None,
            command=command,
            options=options,
            admin_hint=ADMIN_REFUSAL,
            locale=str(interaction.locale),
            place_locale=str(interaction.guild_locale or ""),
            confirm=confirmer(
                lambda **fields: interaction.followup.send(wait=True, ephemeral=True, **fields),
                interaction.user.id,
                lambda: self.settings.tool_confirm_timeout,
            ),
        )

    async def run_slash_command(
        self, interaction: discord.Interaction, command: Command, text: str, options: dict[str, str | int]
    ) -> None:
        """Run a plugin command for a slash command and answer in the interaction."""
        request = self.interaction_request(interaction, command.name, text, options)
        if command.admin and not request.is_admin:
            log.warning("refused admin command /%s for user %s", command.name, request.author_id)
            with locale_scope((await self.app.router.localized(request)).locale):
                refusal = _("/{name} is for admins. {hint}", name=command.name, hint=_(ADMIN_REFUSAL))
            await self._respond(interaction, refusal)
            return
        try:  # a private command (/forget) answers, and refuses, only the one who asked
            await interaction.response.defer(thinking=True, ephemeral=command.private)
        except discord.HTTPException as exc:  # the interaction expired (over 3 s) or was answered
            log.warning("could not acknowledge /%s: %s", command.name, exc)
            return
        reply = await self.app.router.run_command(command.name, request)
        destination = InteractionDestination(interaction, ephemeral=command.private)
        if await self._deliver(reply, destination) and reply.file is not None:
            await self._send_file(reply.file, functools.partial(interaction.followup.send, ephemeral=True), destination)


def slash_command(command: Command, run: Run) -> app_commands.Command[Any, ..., None]:
    """The slash command for a plugin's `Command`, whose callback hands the given values to
    `run`. Raises TypeError or ValueError when Discord cannot take it (a name it refuses)."""
    options = sorted(command.options, key=lambda o: not o.required)  # Discord wants required first
    takes_text = bool(command.usage) and all(o.name != TEXT_OPTION for o in options)
    params = [inspect.Parameter("interaction", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=discord.Interaction)]
    descriptions: dict[str, str | app_commands.locale_str] = {}
    if takes_text:
        params.append(_parameter(TEXT_OPTION, str, required=command.usage.startswith("<")))
        descriptions[TEXT_OPTION] = short(command.usage.strip("<>[]"))
    completers, choices = {}, {}
    for option in options:
        params.append(_parameter(option.name, _annotation(option), required=option.required))
        descriptions[option.name] = described(option.description)
        if option.closed:
            choices[option.name] = [app_commands.Choice(name=c, value=c) for c in option.choices]
        elif option.choices:
            completers[option.name] = _completer(option.choices)

    async def callback(interaction: discord.Interaction, **values: str | int | None) -> None:
        text = str(values.pop(TEXT_OPTION, None) or "") if takes_text else ""
        given = {name: value for name, value in values.items() if value is not None}
        await run(interaction, command, text, given)

    callback.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    app_commands.describe(**descriptions)(callback)
    if completers:
        app_commands.autocomplete(**completers)(callback)
    if choices:
        app_commands.choices(**choices)(callback)
    slash = app_commands.Command(name=command.name, description=described(command.help), callback=callback)
    if command.admin:
        slash.default_permissions = discord.Permissions(manage_guild=True)
    return slash


def described(text: str) -> app_commands.locale_str:
    """A description for Discord that its translator (translator.py) finds by the whole text."""
    return app_commands.locale_str(short(text), msgid=text)


def short(text: str) -> str:
    """A description within Discord's 100 characters (it must not be empty)."""
    text = " ".join(text.split()) or "-"
    return text if len(text) <= DESCRIPTION_LIMIT else text[: DESCRIPTION_LIMIT - 1] + "…"


def _annotation(option: Option) -> Any:
    """The slash option's type: bounded as the Option declares it."""
    if option.closed:
        return str
    if option.kind is int:
        return app_commands.Range[int, option.min, option.max]
    return app_commands.Range[str, option.min or 1, min(option.longest, SLASH_TEXT_LIMIT)]


def _parameter(name: str, annotation: Any, *, required: bool) -> inspect.Parameter:
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=annotation,
        default=inspect.Parameter.empty if required else None,
    )


def _completer(choices: tuple[str, ...]) -> Callable[..., Awaitable[list[app_commands.Choice[str]]]]:
    """Autocomplete from an option's suggested values; the user may still type any value."""

    async def complete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        wanted = current.lower()
        found = [c for c in choices if wanted in c.lower()]
        return [app_commands.Choice(name=c, value=c) for c in found[:AUTOCOMPLETE_LIMIT]]

    return complete
