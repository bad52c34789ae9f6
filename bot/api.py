"""What a plugin sees of the core: requests, replies, commands and the context object.

Plugins import from here and from nothing else in `bot/`, so the core can change behind it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.config import Settings
from bot.engine import (
    MESSAGE_OVERHEAD_TOKENS,
    ChatMessage,
    ContextOverflow,
    Engine,
    EngineError,
    GenerationOptions,
)
from bot.hookspecs import hookimpl
from bot.memory import Memory
from bot.prompts import PromptLoader
from bot.search import Hit, Search, Semantic
from bot.text import HAS_CJK, content_words

if TYPE_CHECKING:
    from bot.scheduler import Scheduler

__all__ = [
    "ChatMessage",
    "Command",
    "ContextOverflow",
    "EngineError",
    "GenerationOptions",
    "Hit",
    "Option",
    "OptionError",
    "Place",
    "PluginContext",
    "Reply",
    "Request",
    "Section",
    "content_words",
    "has_cjk",
    "hookimpl",
    "message_link",
    "quote",
]

BOT_AUTHOR_ID = "quill"
# Set by the router around each handler: renews its time-out (see PluginContext.progress).
RENEW_DEADLINE: ContextVar[Callable[[], None] | None] = ContextVar("quill_renew_deadline", default=None)
# Shown for an empty (whitespace only) answer, by converse and by transports, so the user is
# never left with nothing.
NO_ANSWER = "(The answer came out empty. Please try again or rephrase.)"


@dataclass(frozen=True)
class Request:
    """An incoming message or command, the same for every transport.

    `guild_id` is "" outside a guild (DMs, the console). For a command, `command` is its name,
    `options` its named options and `text` the rest of its arguments.
    """

    transport: str
    channel_id: str
    author_id: str
    text: str
    author_name: str = ""
    guild_id: str = ""
    message_id: str | None = None
    is_admin: bool = False
    mentioned: bool = False
    is_dm: bool = False
    command: str | None = None
    # Checked against the command's `Option`s before a handler sees them: ints for int options.
    options: Mapping[str, str | int] = field(default_factory=dict)
    # The text of the message this one replies to, where the transport knows it ("" otherwise).
    quoted: str = ""
    # Text files attached together (file name, text), where the transport passes several apart
    # rather than as one text (/kb-add makes a document of each).
    attachments: tuple[tuple[str, str], ...] = ()
    # Who counts as an admin on this transport, said when an admin command is refused.
    admin_hint: str = ""

    def number(self, name: str) -> int | None:
        """A whole-number option (already checked against its declaration); None if not given."""
        value = self.options.get(name)
        return value if isinstance(value, int) else None
    # The transport's id of the message this one replies to (a Discord reply), else None.
    reply_to: str | None = None


@dataclass(frozen=True)
class Place:
    """Where messages happen: a channel, thread or DM of one transport ("" guild outside guilds)."""

    transport: str
    guild_id: str
    channel_id: str


def has_cjk(text: str) -> bool:
    """Whether `text` holds Chinese (CJK) characters: such text gets the Chinese tools."""
    return HAS_CJK.search(text) is not None


def message_link(place: Place, message_id: str | None, channel_id: str | None = None) -> str | None:
    """A jump link to a message where the transport has them (Discord in a guild), else None."""
    if place.transport != "discord" or not place.guild_id or not message_id or not message_id.isdigit():
        return None
    return f"https://discord.com/channels/{place.guild_id}/{channel_id or place.channel_id}/{message_id}"


def quote(text: str, author: str, link: str | None = None, limit: int = 140) -> str:
    """A message as a digest or summary shows it: its text on one line (cut at `limit`), who
    wrote it, and a jump link where there is one."""
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"“{text}” — {author}" + (f" ([jump]({link}))" if link else "")


@dataclass(frozen=True)
class Section:
    """One titled part of a digest, in Markdown."""

    title: str
    body: str


@dataclass
class Reply:
    """What a handler answers: whole `text`, or a `stream` of text pieces.

    `failed` marks an error reply, so scripts (`quill ask`) can exit non-zero.
    """

    text: str = ""
    stream: AsyncIterator[str] | None = None
    failed: bool = False
    # Set where the reply reads better as a titled card (a Discord embed): summaries, digests.
    title: str | None = None
    # Post to this channel instead of answering where the request came from (mod reports).
    channel_id: str | None = None
    # A file to hand over with the reply (a DM attachment on Discord, a path in the console).
    file: Path | None = None
    # Ask the transport to delete the message the request came from (moderation, and only where
    # an admin turned deletion on); a transport that cannot delete ignores it.
    delete_original: bool = False
    # The stored answer's row, set once the stream has finished (by converse): the transport
    # links the message it posted to it, so a reaction approves this answer and no other.
    answer_id: int | None = None
    # A PNG shown with the reply (a digest's chart): inside the embed on Discord, written beside
    # the post in the console.
    image: bytes | None = None


Handler = Callable[["PluginContext", Request], Awaitable[Reply]]


class OptionError(ValueError):
    """An option value a command cannot take; the message names the option and what it takes."""


# The longest value of a text option that declares no `max` (a name, a language, a channel).
OPTION_MAX_CHARS = 200
# Digits past this are out of every range a command declares (and Discord's, 2**53).
_MAX_DIGITS = 18
_INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits only: str.isdigit() also takes '²' and '٣'


@dataclass(frozen=True)
class Option:
    """A named option of a command: a Discord slash-command option, or `name:value` typed
    before the free text in the console (`/translate to:fr Bonjour`).

    Its type and bounds are declared here and checked once, by the router (and by Discord for
    slash commands), so a handler only ever sees values it can use: an `int` within
    `min`..`max`, or a non-empty `str` of at most `max` characters (OPTION_MAX_CHARS when
    unset). `positional`: the command's free text is this option (`/retention 30`)."""

    name: str
    description: str
    required: bool = False
    # Suggested values (autocomplete on Discord); the only ones accepted when `closed`.
    choices: tuple[str, ...] = ()
    kind: type[int] | type[str] = str
    min: int | None = None
    max: int | None = None
    closed: bool = False
    positional: bool = False

    def __post_init__(self) -> None:
        if self.kind is int and (self.min is None or self.max is None):
            raise ValueError(f"option {self.name}: a whole-number option needs min and max")
        if self.closed and not self.choices:
            raise ValueError(f"option {self.name}: closed without choices")

    @property
    def longest(self) -> int:
        return self.max if self.max is not None else OPTION_MAX_CHARS

    def takes(self) -> str:
        """What the option accepts, as said in a refusal."""
        if self.closed:
            return "one of " + ", ".join(self.choices)
        if self.kind is int:
            return f"a whole number from {self.min:,} to {self.max:,}"
        return f"text of 1 to {self.longest:,} characters"

    def parse(self, value: str | int) -> str | int:
        """The value as the handler gets it (cleaned text is expected); OptionError if refused."""
        if isinstance(value, str):
            value = value.strip()
        if value == "":
            raise OptionError(f"{self.name} is empty; it takes {self.takes()}.")
        if self.closed:
            wanted = str(value).casefold()
            for choice in self.choices:
                if choice.casefold() == wanted:
                    return choice
            raise self._refused(value)
        if self.kind is int:
            if isinstance(value, str):
                if not _INTEGER.fullmatch(value) or len(value.lstrip("-")) > _MAX_DIGITS:
                    raise self._refused(value)
                value = int(value)
            assert self.min is not None and self.max is not None
            if isinstance(value, bool) or not self.min <= value <= self.max:
                raise self._refused(value)
            return value
        text = str(value)
        if len(text) > self.longest or (self.min is not None and len(text) < self.min):
            raise self._refused(text)
        return text

    def _refused(self, value: object) -> OptionError:
        text = str(value)
        shown = repr(text) if len(text) <= 40 else f"{text[:40]!r}… ({len(text):,} characters)"
        return OptionError(f"{self.name} takes {self.takes()}, not {shown}.")


@dataclass(frozen=True)
class Command:
    """A command a plugin offers; `/help` and the transports build their lists from these."""

    name: str
    help: str
    handler: Handler
    usage: str = ""
    admin: bool = False
    options: tuple[Option, ...] = ()
    # Its text is a document (/kb-add), bounded by QUILL_MAX_DOCUMENT_CHARS, not by the message
    # limit QUILL_MAX_INPUT_CHARS.
    document: bool = False
    # Its answers concern one person's data (/forget): as a slash command only they see them.
    private: bool = False


@dataclass
class PluginContext:
    """The core's services, handed to every handler."""

    engine: Engine
    memory: Memory
    settings: Settings
    prompts: PromptLoader
    # Calls every plugin's implementation of a hook (pluggy's relay), e.g. the list of results,
    # some awaitable, of `context.hooks.forget_user(...)`; set by the core once plugins load.
    hooks: Any = None
    # The job scheduler (/schedule); None where the process runs none.
    scheduler: Scheduler | None = None
    # Every plugin's `digest_sections` for a place since a time, each one guarded (a failing
    # plugin is left out), unlike a plain `hooks.digest_sections(...)` call; set by the core.
    digest_sections: Callable[[Place, datetime], Awaitable[list[Section]]] | None = None
    # The embedder and its fusion settings where QUILL_EMBEDDINGS is on (bot/embedder.py).
    semantic: Semantic | None = None

    @cached_property
    def search(self) -> Search:
        """The knowledge base and search over it and past messages (bot/search.py)."""
        return Search(self.memory.engine, self.semantic)

    def progress(self) -> None:
        """Say the request being handled is still moving (a summary's next part is done): its
        QUILL_PLUGIN_TIMEOUT starts again, so long work is stopped only when it stalls."""
        renew = RENEW_DEADLINE.get()
        if renew is not None:
            renew()

    def options(self, **overrides: object) -> GenerationOptions:
        """Generation options from the settings, with per-call overrides."""
        values: dict[str, object] = {
            "max_tokens": self.settings.max_reply_tokens,
            "temperature": self.settings.temperature,
        }
        values.update(overrides)
        return GenerationOptions(**values)  # type: ignore[arg-type]

    async def converse(self, request: Request, system_prompt: str, options: GenerationOptions | None = None) -> Reply:
        """Answer `request` as the next turn of its place's conversation.

        The user's turn is stored before generation, so nothing is lost if it fails; the
        history is rebuilt from the database and trimmed by tokens, oldest turns first, with
        the system prompt always kept; the reply is stored only once it has finished.
        """
        options = options or self.options()
        conv = await self.memory.conversation(request.transport, request.guild_id, request.channel_id)
        assert conv.id is not None
        user_tokens = await self.engine.count_tokens(request.text)
        await self.memory.add_message(
            conv.id,
            role="user",
            content=request.text,
            author_id=request.author_id,
            author_name=request.author_name,
            token_count=user_tokens,
            external_id=request.message_id,
            reply_to=request.reply_to,
        )
        system_tokens = await self.engine.count_tokens(system_prompt) + MESSAGE_OVERHEAD_TOKENS
        budget = self.engine.n_ctx - options.max_tokens - system_tokens
        if user_tokens + MESSAGE_OVERHEAD_TOKENS > budget:
            raise ContextOverflow(
                f"Your message is {user_tokens} tokens, but only {max(budget, 0)} fit beside the reply in "
                f"this model's context ({self.engine.n_ctx} tokens, QUILL_N_CTX). Please shorten it."
            )
        history = await self.memory.history(conv.id, budget, per_message=MESSAGE_OVERHEAD_TOKENS)
        messages = [ChatMessage("system", system_prompt)]
        messages += [ChatMessage(m.role, m.content) for m in history]
        reply = Reply()
        reply.stream = self._remember(conv.id, self.engine.stream(messages, options), reply)
        return reply

    async def _remember(self, conversation_id: int, pieces: AsyncIterator[str], reply: Reply) -> AsyncIterator[str]:
        """Pass the reply through and store it once complete; a reply cut short is not stored.
        A model that answers nothing (it happens on odd input) gets a line saying so, unstored."""
        parts: list[str] = []
        async for piece in pieces:
            parts.append(piece)
            yield piece
        text = "".join(parts).strip()
        if not text:
            yield NO_ANSWER
        else:
            stored = await self.memory.add_message(
                conversation_id,
                role="assistant",
                content=text,
                author_id=BOT_AUTHOR_ID,
                author_name=self.settings.bot_name,
                token_count=await self.engine.count_tokens(text),
            )
            reply.answer_id = stored.id
