"""Confirmations on Discord (bot/transports/discord/confirm.py): discord.py's own View and
Buttons, pressed through a minimal recorder of `interaction.response` (dpytest has no component
interactions, as it has no slash commands: see tests/discord_helpers.py), and a real time-out."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import discord

from bot.api import locale_scope
from bot.transports.discord.confirm import ConfirmView, confirmer

ASKER, OTHER = 111, 222


class Recorder:
    """What an interaction's response and a posted message were asked to do."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.edits: list[dict[str, Any]] = []

    async def send_message(self, content: str, **fields: Any) -> None:
        self.sent.append({"content": content, **fields})

    async def edit_message(self, **fields: Any) -> None:
        self.edits.append(fields)

    async def edit(self, **fields: Any) -> None:
        self.edits.append(fields)


def press(user_id: int) -> tuple[Any, Recorder]:
    response = Recorder()
    return SimpleNamespace(user=SimpleNamespace(id=user_id), response=response), response


def buttons(view: ConfirmView) -> dict[str, discord.ui.Button[Any]]:
    return {item.label: item for item in view.children if isinstance(item, discord.ui.Button)}


async def test_only_the_asker_can_press_and_confirm_is_a_yes() -> None:
    view = ConfirmView(ASKER, "Run /kb-remove Style?")
    stranger, seen = press(OTHER)
    assert not await view.interaction_check(stranger)
    assert seen.sent[0]["ephemeral"] and "Only the person who asked" in seen.sent[0]["content"]
    assert not view.is_finished() and not view.confirmed
    asker, answered = press(ASKER)
    assert await view.interaction_check(asker)
    await buttons(view)["Confirm"].callback(asker)
    assert view.confirmed and view.is_finished()
    assert answered.edits == [{"content": "Run /kb-remove Style?\nConfirmed.", "view": None}]


async def test_cancel_is_a_no_and_a_second_press_changes_nothing() -> None:
    view = ConfirmView(ASKER, "Run /forget channel?")
    asker, answered = press(ASKER)
    await buttons(view)["Cancel"].callback(asker)
    await buttons(view)["Confirm"].callback(asker)  # too late: the first press was taken
    assert not view.confirmed
    assert answered.edits == [{"content": "Run /forget channel?\nCancelled: nothing was changed.", "view": None}]


async def test_an_unanswered_question_expires_as_a_no_and_says_so() -> None:
    posted = Recorder()

    async def send(**fields: Any) -> Recorder:
        posted.sent.append(fields)
        return posted

    confirm = confirmer(send, ASKER, lambda: 0.3)
    assert await asyncio.wait_for(confirm("Run /forget me?"), 30) is False
    assert posted.sent[0]["content"] == "Run /forget me?" and isinstance(posted.sent[0]["view"], ConfirmView)
    assert posted.edits == [{"content": "Run /forget me?\nExpired: nothing was changed.", "view": None}]


async def test_buttons_speak_the_askers_language() -> None:
    with locale_scope("zh-CN"):
        view = ConfirmView(ASKER, "运行 /forget me？")
    assert set(buttons(view)) == {"确认", "取消"}
