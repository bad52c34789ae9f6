"""Confirmations on Discord: a question with Confirm and Cancel buttons that only the person who
asked can press, and that expire (QUILL_TOOL_CONFIRM_TIMEOUT). Anything but a press of Confirm by
that person, in time, is a no."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import discord

from bot.api import N_, _
from bot.transports.discord.delivery import DeliveryFailed

log = logging.getLogger(__name__)

CONFIRMED = N_("Confirmed.")
CANCELLED = N_("Cancelled: nothing was changed.")
EXPIRED = N_("Expired: nothing was changed.")
NOT_YOURS = N_("Only the person who asked can answer this.")


class ConfirmView(discord.ui.View):
    """Confirm / Cancel for one person; `confirmed` is True only after their press of Confirm."""

    def __init__(self, asker_id: int, question: str) -> None:
        # No time-out of discord.py's own: it only runs for views Discord's store holds, and
        # `confirmer` keeps the clock itself.
        super().__init__(timeout=None)
        self.asker_id = asker_id
        self.question = question
        self.confirmed = False
        self.message: Any = None  # the posted question, edited once answered or expired
        # Labels in the asker's language: the view is made while the request's locale is in force.
        confirm = discord.ui.Button(label=_("Confirm"), style=discord.ButtonStyle.danger)
        cancel = discord.ui.Button(label=_("Cancel"), style=discord.ButtonStyle.secondary)
        self.not_yours, self.labels = _(NOT_YOURS), {True: _(CONFIRMED), False: _(CANCELLED)}
        self.expired = _(EXPIRED)
        confirm.callback = self._pressed(True)
        cancel.callback = self._pressed(False)
        self.add_item(confirm)
        self.add_item(cancel)

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id == self.asker_id:
            return True
        await interaction.response.send_message(self.not_yours, ephemeral=True)
        return False

    def _pressed(self, confirmed: bool) -> Callable[[discord.Interaction], Awaitable[None]]:
        async def callback(interaction: discord.Interaction) -> None:
            if self.is_finished():  # a second press after the first was taken
                return
            self.confirmed = confirmed
            self.stop()
            await interaction.response.edit_message(content=f"{self.question}\n{self.labels[confirmed]}", view=None)

        return callback

    async def expire(self) -> None:
        """Take no more presses, and say on the question that it expired."""
        self.stop()
        if self.message is None:
            return
        try:
            await self.message.edit(content=f"{self.question}\n{self.expired}", view=None)
        except discord.HTTPException as exc:
            log.debug("expired confirmation not updated: %s", exc)


def confirmer(
    send: Callable[..., Awaitable[Any]], asker_id: int, timeout: Callable[[], float]
) -> Callable[[str], Awaitable[bool]]:
    """The `Request.confirm` of a Discord request: `send` posts the question where it was asked."""

    async def confirm(question: str) -> bool:
        view = ConfirmView(asker_id, question)
        try:
            view.message = await send(
                content=question, view=view, allowed_mentions=discord.AllowedMentions(users=[discord.Object(asker_id)])
            )
        except (discord.HTTPException, DeliveryFailed) as exc:
            log.warning("could not ask for confirmation: %s", exc)
            view.stop()
            return False
        try:
            await asyncio.wait_for(view.wait(), timeout())
        except TimeoutError:
            await view.expire()
        return view.confirmed

    return confirm
