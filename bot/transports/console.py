"""The console transport: chat with quill in a terminal, no Discord token needed."""

from __future__ import annotations

import asyncio
import getpass
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from bot.api import N_, Place, Reply, Request
from bot.app import Quill
from bot.i18n import system_locale

TRANSPORT = "console"
QUIT_WORDS = {"/quit", "/exit"}
THINKING_WIDTH = 24  # wide enough to blank "… thinking 9999 s"


ADMIN_HINT = N_("Admins here are the users listed in QUILL_ADMIN_IDS.")
# Answers to a confirmation (y/N) that mean yes, in the languages quill speaks; anything else is no.
YES = frozenset({"y", "yes", "是", "是的", "好", "确认", "確認"})


class ConsoleTransport:
    """Sends lines typed in a terminal through the router and prints replies as they stream."""

    def __init__(
        self,
        app: Quill,
        *,
        channel: str = "console",
        user: str | None = None,
        out: TextIO = sys.stdout,
        read_line: Callable[[], Awaitable[str]] | None = None,
    ):
        self.app = app
        self.channel = channel
        self.user = user or getpass.getuser()
        self.out = out
        self.read_line = read_line or (lambda: asyncio.to_thread(sys.stdin.readline))
        app.scheduler.posters[TRANSPORT] = self.post

    def request(self, text: str) -> Request:
        admins = self.app.settings.admin_ids
        return Request(
            transport=TRANSPORT,
            channel_id=self.channel,
            author_id=self.user,
            author_name=self.user,
            text=text,
            is_admin=not admins or self.user in admins,
            is_dm=True,
            admin_hint=ADMIN_HINT,
            locale=self.app.settings.locale,
            place_locale=system_locale() or "",
            confirm=self.confirm,
        )

    async def confirm(self, question: str) -> bool:
        """Ask on the terminal; only a yes (y, yes, 是, 确认, ...) confirms. End of input is no."""
        self.out.write(f"\n{question} [y/N] ")
        self.out.flush()
        answer = (await self.read_line()).strip().casefold()
        if not self.out.isatty():  # a terminal echoed the answer and its line break; a pipe did not
            self.out.write("\n")
        return answer in YES

    async def ask(self, text: str) -> Reply:
        """Send one message and print the reply; returns it (with `failed` set on errors)."""
        async with self.thinking() as done:
            reply = await self.app.router.handle(self.request(text))
            await self.render(reply, done)
        return reply

    @asynccontextmanager
    async def thinking(self) -> AsyncIterator[Callable[[], None]]:
        """In a terminal, a progress line from the first moment ("… thinking 12 s", counting
        each second) until the reply starts: a first answer after a restart can take minutes
        while a long history is read. Yields the function that clears it."""
        if not self.out.isatty():
            yield lambda: None
            return
        started = time.monotonic()
        shown = [True]

        def show() -> None:
            seconds = int(time.monotonic() - started)
            self.out.write(f"\r… thinking {seconds} s" if seconds else "\r… thinking")
            self.out.flush()

        def clear() -> None:
            if shown[0]:
                shown[0] = False
                ticker.cancel()
                self.out.write("\r" + " " * THINKING_WIDTH + "\r")
                self.out.flush()

        async def tick() -> None:
            while True:
                show()
                await asyncio.sleep(1.0)

        ticker = asyncio.create_task(tick())
        try:
            yield clear
        finally:
            clear()

    async def render(self, reply: Reply, clear: Callable[[], None] = lambda: None) -> None:
        """Print a reply, streaming it piece by piece as the model produces it; `clear` removes
        the progress line before the first piece. A reply that fails mid-way gets its error on
        a line of its own (the router's apology starts with a line break)."""
        write = self.out.write
        if reply.stream is None:
            clear()
            write((f"== {reply.title} ==\n" if reply.title else "") + reply.text + "\n")
            if reply.image is not None:
                write(f"(chart: {self.save_image('charts', self.channel, reply.image)})\n")
            self.out.flush()
            return
        started = False
        async for piece in reply.stream:
            if not started:
                clear()
                if reply.title:
                    write(f"== {reply.title} ==\n")
                piece = piece.lstrip("\n")  # a stream that failed at once: its error alone
                started = True
            write(piece)
            self.out.flush()
        clear()
        write("\n")
        self.out.flush()

    async def post(self, place: Place, target: str, reply: Reply) -> None:
        """The console's scheduler poster: print the reply and append it to
        `<data dir>/posts/<target>.md`, so scheduled digests are kept to read later."""
        heading = f"## {reply.title or 'Scheduled post'} ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)"
        text = reply.text
        if reply.image is not None:  # beside the Markdown file, which shows it
            text += f"\n\n![chart]({self.save_image('posts', target, reply.image).name})"
        self.out.write(f"\n[to {target}] {heading[3:]}\n{text}\n")
        self.out.flush()
        folder = self.app.settings.data_dir / "posts"
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / f"{_file_name(target)}.md").open("a", encoding="utf-8") as fh:
            fh.write(f"{heading}\n\n{text}\n\n")

    def save_image(self, folder_name: str, target: str, png: bytes) -> Path:
        """Write a reply's PNG as `<data dir>/<folder>/<target>-<time>.png` and return its path."""
        folder = self.app.settings.data_dir / folder_name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{_file_name(target)}-{datetime.now(UTC):%Y%m%d-%H%M%S-%f}.png"
        path.write_bytes(png)
        return path

    async def repl(self, read_line: Callable[[], Awaitable[str]] | None = None) -> None:
        """Chat until end of input or /quit; the conversation persists between runs."""
        if read_line is not None:
            self.read_line = read_line
        read = self.read_line
        await self.app.scheduler.run_jobs()  # scheduled jobs run while the chat is open
        self.out.write(
            f"{self.app.settings.bot_name} on {self.app.settings.model_path.name}; "
            f"conversation '{self.channel}'. /help lists commands, /quit leaves.\n"
        )
        while True:
            if self.out.isatty():
                self.out.write("you> ")
                self.out.flush()
            line = await read()
            if not line or line.strip() in QUIT_WORDS:
                return
            if not line.strip():
                continue
            await self.ask(line)


def _file_name(target: str) -> str:
    """A channel name as a safe file name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in target) or "console"
