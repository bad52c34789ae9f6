"""The value types that cross between the core, the transports and plugins.

This module imports nothing from `bot/`, so any part of quill (and any plugin, through
`bot.api`, which re-exports these) can use them without pulling in the core.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple


class QuillError(Exception):
    """A failure whose message is fit to show a user as it is (the database is unavailable,
    the model cannot take the message, a schedule cannot be parsed). Anything else that escapes
    a plugin is logged and answered with a short apology instead."""


class Text:
    """A message for a user kept as its English template and values, so that where it is shown
    it is translated into that user's language (bot/i18n.py); `str()` is the English. It lets
    this module, which imports nothing of bot/, raise errors a Chinese user reads in Chinese."""

    def __init__(self, template: str, /, **values: object) -> None:
        self.template = template
        self.values = values

    def __str__(self) -> str:
        shown = {
            k: f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v) for k, v in self.values.items()
        }
        return self.template.format(**shown) if shown else self.template

    def __repr__(self) -> str:
        return f"Text({self.template!r}, **{self.values!r})"


# Shows a question (a line saying what would run) to the asker; True only if they confirmed in time.
Confirm = Callable[[str], Awaitable[bool]]


class Place(NamedTuple):
    """Where messages happen: a channel, thread or DM of one transport ("" guild outside guilds).
    A tuple, so the repositories that take the three apart get them as `*place`."""

    transport: str
    guild_id: str
    channel_id: str


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

    # The transport's id of the message this one replies to (a Discord reply), else None.
    reply_to: str | None = None
    # Run by the model as a tool for the person who asked (bot/tools.py): the conversation turn
    # is the asker's message and the answer they saw, so a tool's own request stores nothing.
    tool_call: bool = False
    # Asks the person who sent this request to confirm an action (Discord buttons, the console's
    # y/N) and says whether they did; None where nobody can be asked (a scheduled job): actions
    # that change something are then refused. Set by the transport.
    confirm: Confirm | None = field(default=None, compare=False, repr=False)

    # The language quill's own texts use for this request. A transport sets the user's own
    # where it knows it (a slash command's `interaction.locale`, QUILL_LOCALE); the router
    # replaces it by the one resolved (an admin's /language, this, the message's language,
    # `place_locale`, English) before a handler sees it.
    locale: str = ""
    # The place's language where the transport knows one (a guild's preferred locale, the
    # console's system locale): used when neither the user nor the message says.
    place_locale: str = ""

    @property
    def place(self) -> Place:
        """Where the request came from: its conversation, settings and knowledge base scope."""
        return Place(self.transport, self.guild_id, self.channel_id)

    def number(self, name: str) -> int | None:
        """A whole-number option (already checked against its declaration); None if not given."""
        value = self.options.get(name)
        return value if isinstance(value, int) else None


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
    # The handler had nothing to give (a search that found nothing): the chat's tool loop then
    # answers as if no tool had been called, rather than showing that to someone who only chatted.
    empty: bool = False


# The context is bot.api.PluginContext; typed loosely here so this module imports nothing of bot/.
Handler = Callable[[Any, Request], Awaitable[Reply]]


class OptionError(QuillError, ValueError):
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

    def takes(self) -> Text:
        """What the option accepts, as said in a refusal."""
        if self.closed:
            return Text("one of {choices}", choices=", ".join(self.choices))
        if self.kind is int:
            return Text("a whole number from {min} to {max}", min=self.min, max=self.max)
        return Text("text of 1 to {longest} characters", longest=self.longest)

    def parse(self, value: str | int) -> str | int:
        """The value as the handler gets it (cleaned text is expected); OptionError if refused."""
        if isinstance(value, str):
            value = value.strip()
        if value == "":
            raise OptionError(Text("{name} is empty; it takes {takes}.", name=self.name, takes=self.takes()))
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
        if len(text) <= 40:
            return OptionError(
                Text("{name} takes {takes}, not {value}.", name=self.name, takes=self.takes(), value=repr(text))
            )
        return OptionError(
            Text(
                "{name} takes {takes}, not {value}… ({length} characters).",
                name=self.name,
                takes=self.takes(),
                value=repr(text[:40]),
                length=len(text),
            )
        )


@dataclass(frozen=True)
class ToolSpec:
    """How a command is offered to the model as a tool (bot/tools.py). Its name, help and
    options make the tool's schema; this says the rest.

    `changes`: it changes something (erases, schedules, configures), so the asker confirms each
    call before it runs. `answers`: its reply is a finished answer for the user (/ask's, with
    its sources), shown as it streams instead of being rewritten by the model. `status`: what
    the user sees while it runs ("searching the knowledge base…"), marked with N_. `text`: what
    the command's free text is, said to the model in English ("the question"); "" if it takes none.
    `choices`: the only values that text may take (/forget: me, channel). `examples`: messages
    that call for this tool, in English and Chinese, shown to the model as earlier turns that
    called it (with the message itself as the text): a small model learns more from these
    than from any description."""

    changes: bool = False
    answers: bool = False
    status: str = ""
    text: str = ""
    choices: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()


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
    # Offered to the model as a tool (bot/tools.py) when set.
    tool: ToolSpec | None = None


@dataclass(frozen=True)
class Reaction:
    """Someone added an emoji to a message the transport knows (`on_reaction` hook): the 👍
    that approves an answer for fine-tuning, for one."""

    place: Place
    user_id: str
    emoji: str
    # The transport's id of the message reacted to.
    message_id: str
