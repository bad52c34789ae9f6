"""How soon a Discord user sees an answer: time to the first visible text, time to the whole
reply, and the number of edits, for mentions answered by the real model through discord.py
(dpytest's simulated Discord). Prints figures; asserts nothing.

    python -m bench.discord_reply [--questions 5] [--max-tokens 96] [--edit-interval 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import discord
import discord.ext.test as dpytest
from discord.ext.test import callbacks

from bot.app import Quill
from bot.transports.discord import QuillClient
from tests.conftest import make_settings
from tests.discord_helpers import attach, post

QUESTIONS = [
    "What is a good name for a cat?",
    "Give me three tips for writing clear emails.",
    "Explain what a database index is.",
    "Write a haiku about autumn.",
    "How do I boil an egg?",
]


async def main(args: argparse.Namespace) -> None:
    settings = make_settings(
        Path(tempfile.mkdtemp()), max_reply_tokens=args.max_tokens, discord_edit_interval=args.edit_interval
    )
    app = await Quill.start(settings)
    intents = discord.Intents.default()
    intents.message_content = intents.members = True
    client = QuillClient(app, intents=intents)
    attach(client)
    await client._async_setup_hook()
    events: list[tuple[str, float]] = []

    async def sent(message: Any) -> None:
        events.append(("send", time.monotonic()))

    async def edited(*_: Any) -> None:
        events.append(("edit", time.monotonic()))

    callbacks.set_callback(sent, "send_message")
    callbacks.set_callback(edited, "edit_message")
    config = dpytest.get_config()
    general, ada = config.channels[0], config.members[0]
    first, whole, edits = [], [], []
    for i in range(args.questions):  # one conversation: later turns carry the earlier ones
        events.clear()
        started = time.monotonic()
        await post(general, ada, f"{client.user.mention} {QUESTIONS[i % len(QUESTIONS)]}")
        first.append(events[0][1] - started)
        whole.append(time.monotonic() - started)
        edits.append(sum(kind == "edit" for kind, _ in events))
    await app.close()
    print(f"questions: {args.questions}, max tokens: {args.max_tokens}, edit interval: {args.edit_interval} s")
    for label, values in (("first visible text", first), ("whole reply", whole)):
        low, mid, high = min(values), statistics.median(values), max(values)
        print(f"{label:>18}: median {mid:.2f} s (min {low:.2f}, max {high:.2f})")
    print(f"edits per reply:    {edits}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--edit-interval", type=float, default=1.0)
    asyncio.run(main(parser.parse_args()))
