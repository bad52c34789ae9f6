"""What a plugin sees of the core: requests, replies, commands, settings and the context object.

Plugins import from here and from nothing else in `bot/`, so the core can change behind it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from bot.charts import chart_font
from bot.config import Settings
from bot.engine import (
    MESSAGE_OVERHEAD_TOKENS,
    ChatMessage,
    ContextOverflow,
    Engine,
    EngineError,
    GenerationOptions,
)
from bot.hooks import RENEW_DEADLINE, HookResult, Hooks
from bot.hookspecs import JobRegistrar, hookimpl
from bot.i18n import (
    N_,
    LanguageChannel,
    LanguageUser,
    _,
    current_locale,
    error_text,
    format_date,
    format_datetime,
    format_number,
    language_code,
    language_label,
    locale_scope,
    ngettext,
)
from bot.i18n import available as available_locales
from bot.i18n import normalize as normalize_locale
from bot.memory import Memory, off_loop
from bot.metrics import ReplyMetrics
from bot.models import ModerationReport
from bot.plugin_config import (
    ChannelSettings,
    GuildSettings,
    MemberSettings,
    PluginSettings,
    SettingError,
    SettingsRegistry,
    UserSettings,
)
from bot.prompts import PromptLoader
from bot.search import Hit, Search, Semantic, relevant
from bot.text import HAS_CJK, content_words
from bot.types import (
    Command,
    Handler,
    Option,
    OptionError,
    Place,
    QuillError,
    Reaction,
    Reply,
    Request,
    Section,
    Text,
    ToolSpec,
)
from bot.web.charts import Series, line_chart
from bot.web.pages import Download, Page, Redirect, Upload, WebPage, WebRequest

if TYPE_CHECKING:
    from bot.scheduler import Scheduler
    from bot.tools import Toolbox

__all__ = [
    "N_",
    "ChannelSettings",
    "ChatMessage",
    "Command",
    "ContextOverflow",
    "Download",
    "EngineError",
    "GenerationOptions",
    "GuildSettings",
    "Handler",
    "Hit",
    "HookResult",
    "JobRegistrar",
    "LanguageChannel",
    "LanguageUser",
    "MemberSettings",
    "ModerationReport",
    "Option",
    "OptionError",
    "Page",
    "Place",
    "PluginContext",
    "PluginSettings",
    "QuillError",
    "Reaction",
    "Redirect",
    "Reply",
    "Request",
    "Section",
    "Series",
    "SettingError",
    "Text",
    "ToolSpec",
    "Upload",
    "UserSettings",
    "WebPage",
    "WebRequest",
    "_",
    "available_locales",
    "chart_font",
    "content_words",
    "current_locale",
    "error_text",
    "format_date",
    "format_datetime",
    "format_number",
    "guild_tag",
    "has_cjk",
    "hookimpl",
    "language_code",
    "language_label",
    "line_chart",
    "locale_scope",
    "message_link",
    "ngettext",
    "normalize_locale",
    "off_loop",
    "place_tag",
    "quote",
    "relevant",
    "state_tags",
    "user_tag",
]

S = TypeVar("S", bound=BaseModel)


BOT_AUTHOR_ID = "quill"
# Shown for an empty (whitespace only) answer, by converse and by transports, so the user is
# never left with nothing.
NO_ANSWER = N_("(The answer came out empty. Please try again or rephrase.)")


def has_cjk(text: str) -> bool:
    """Whether `text` holds Chinese (CJK) characters: such text gets the Chinese tools."""
    return HAS_CJK.search(text) is not None


def message_link(place: Place, message_id: str | None, channel_id: str | None = None) -> str | None:
    """A jump link to a message where the transport has them (Discord in a guild), else None."""
    if place.transport != "discord" or not place.guild_id or not message_id or not message_id.isdigit():
        return None
    return f"https://discord.com/channels/{place.guild_id}/{channel_id or place.channel_id}/{message_id}"


def state_tags(place: Place | None = None, users: Iterable[str] = ()) -> frozenset[str]:
    """Labels for a model request holding the messages of `place` and `users`
    (`GenerationOptions.tags`): the engine keeps conversation states by them, and erasing a
    place's (`place_tag`), a guild's (`guild_tag`) or a user's (`user_tag`) messages drops the
    states labelled with it (`Engine.forget_states`)."""
    tags = {user_tag(user) for user in users if user}
    if place is not None:
        tags |= {place_tag(place), guild_tag(place.guild_id)}
    return frozenset(tags)


def place_tag(place: Place) -> str:
    return f"place:{place.transport}:{place.guild_id}:{place.channel_id}"


def guild_tag(guild_id: str) -> str:
    """Every place of this guild ("": DMs and the console, as retention counts them)."""
    return f"guild:{guild_id}"


def user_tag(user_id: str) -> str:
    return f"user:{user_id}"


def quote(text: str, author: str, link: str | None = None, limit: int = 140) -> str:
    """A message as a digest or summary shows it: its text on one line (cut at `limit`), who
    wrote it, and a jump link where there is one."""
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"“{text}” — {author}" + (f" ([jump]({link}))" if link else "")


@dataclass
class PluginContext:
    """The core's services, handed to every handler and hook."""

    engine: Engine
    memory: Memory
    settings: Settings
    prompts: PromptLoader
    # Calls a hook on every plugin, each guarded and timed, results gathered (bot/hooks.py):
    # `await context.hooks.call("digest_sections", place=..., since=...)`.
    hooks: Hooks
    # Every plugin's declared settings (bot/plugin_config.py); read them with config / scoped.
    registry: SettingsRegistry
    # The job scheduler (/schedule); None where the process runs none.
    scheduler: Scheduler | None = None
    # The embedder and its fusion settings where QUILL_EMBEDDINGS is on (bot/embedder.py).
    semantic: Semantic | None = None
    # Replies in flight and their timings over the last hour (the admin panel's overview).
    metrics: ReplyMetrics = field(default_factory=ReplyMetrics)
    # The tools the model may call (bot/tools.py); set once the router has the commands.
    toolbox: Toolbox | None = None

    def config(self, model: type[S]) -> S:
        """A plugin's global settings (`PluginSettings`), as read from the environment at start."""
        return self.registry.get(model)

    async def scoped(self, model: type[S], place: Place, *, user: str = "") -> S:
        """A plugin's `GuildSettings` or `ChannelSettings` for `place`, or its `UserSettings` /
        `MemberSettings` for the person `user` (their id on the place's transport), defaults
        where unset."""
        entry = self.registry.entry(model)
        guild, channel, person = _scope_of(entry.scope, place, user)
        return self.registry.build(model, await self.memory.get_settings(guild, channel, entry.plugin, person))

    async def update(self, model: type[S], place: Place, *, user: str = "", **changes: Any) -> S:
        """Change some of `place`'s (or the person `user`'s) settings of `model`, each validated
        by its declaration (SettingError names the one refused); a value equal to the default is
        stored as unset, so a later change of default reaches it."""
        entry = self.registry.entry(model)
        if unknown := sorted(set(changes) - set(model.model_fields)):
            raise KeyError(f"{entry.plugin} has no {entry.scope} setting {', '.join(unknown)}")
        current = await self.scoped(model, place, user=user)
        try:
            updated = model.model_validate({**current.model_dump(), **changes})
        except ValidationError as exc:
            problem = exc.errors()[0]
            name = ".".join(str(part) for part in problem["loc"]) or "value"
            raise SettingError(f"{entry.plugin} setting {name}: {problem['msg']}") from exc
        defaults = model()
        values, cleared = {}, []
        for name in changes:
            value = getattr(updated, name)
            if value == getattr(defaults, name):
                cleared.append(entry.key(name))
            else:
                values[entry.key(name)] = updated.model_dump(mode="json", include={name})[name]
        guild, channel, person = _scope_of(entry.scope, place, user)
        await self.memory.set_settings(guild, channel, values, cleared, person)
        return updated

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
        started = time.monotonic()
        conversation_id, history, options = await self.turn(request, system_prompt, options)
        messages = [ChatMessage("system", system_prompt), *history]
        reply = Reply()
        # A tool's own answer is stored by the tool loop, as the user saw it (bot/tools.py).
        keep = None if request.tool_call else conversation_id
        pieces = self.metrics.measure(self.engine.stream(messages, options), started)
        reply.stream = self.remember(keep, pieces, reply)
        return reply

    async def converse_with_tools(
        self, request: Request, system_prompt: str, options: GenerationOptions | None = None
    ) -> Reply:
        """`converse`, letting the model first call the tools this request may use (bot/tools.py):
        commands offered as tools and MCP servers' tools, as the asker, confirmed by them when a
        tool changes something."""
        if self.toolbox is None:
            return await self.converse(request, system_prompt, options)
        return await self.toolbox.answer(request, system_prompt, options)

    async def turn(
        self, request: Request, system_prompt: str, options: GenerationOptions
    ) -> tuple[int, list[ChatMessage], GenerationOptions]:
        """Store the user's turn and return its conversation's id and history (the turn
        included), trimmed to leave room for `system_prompt` and the reply, and `options` tagged
        with whose messages that history holds. A tool's own request
        (`request.tool_call`) is not stored: its text ends the history instead."""
        conv = await self.memory.conversation(*request.place)
        assert conv.id is not None
        user_tokens = await self.engine.count_tokens(request.text)
        if not request.tool_call:
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
                Text(
                    "Your message is {tokens} tokens, but only {room} fit beside the reply in "
                    "this model's context ({context} tokens, QUILL_N_CTX). Please shorten it.",
                    tokens=user_tokens,
                    room=max(budget, 0),
                    context=self.engine.n_ctx,
                )
            )
        if request.tool_call:
            budget -= user_tokens + MESSAGE_OVERHEAD_TOKENS
        history = await self.memory.history(conv.id, budget, per_message=MESSAGE_OVERHEAD_TOKENS)
        messages = [ChatMessage(m.role, m.content) for m in history]
        if request.tool_call:
            messages.append(ChatMessage("user", request.text))
        # Whose messages the prompt holds: the engine files the conversation's saved state under
        # them, so /forget and retention can drop it (Engine.forget_states).
        authors = {m.author_id for m in history if m.role == "user"} | {request.author_id}
        return conv.id, messages, replace(options, tags=options.tags | state_tags(request.place, authors))

    async def remember(
        self, conversation_id: int | None, pieces: AsyncIterator[str], reply: Reply
    ) -> AsyncIterator[str]:
        """Pass the reply through and store it once complete (in conversation `conversation_id`;
        None: not stored); a reply cut short is not stored. A model that answers nothing (it
        happens on odd input) gets a line saying so, unstored."""
        parts: list[str] = []
        async for piece in pieces:
            parts.append(piece)
            yield piece
        text = "".join(parts).strip()
        if not text:
            yield _(NO_ANSWER)
        elif conversation_id is not None:
            await self.remember_answer(conversation_id, text, reply)

    async def remember_answer(self, conversation_id: int, text: str, reply: Reply) -> None:
        """Store `text` as the assistant's turn; `reply.answer_id` links it to the posted message."""
        if not text.strip():
            return
        stored = await self.memory.add_message(
            conversation_id,
            role="assistant",
            content=text.strip(),
            author_id=BOT_AUTHOR_ID,
            author_name=self.settings.bot_name,
            token_count=await self.engine.count_tokens(text),
        )
        reply.answer_id = stored.id


def _scope_of(scope: str, place: Place, user: str) -> tuple[str, str, str]:
    """The (guild_id, channel_id, user_id) a scoped setting is stored under: channel "" for a
    guild's, guild "" for a person's own everywhere."""
    if scope in {"user", "member"} and not user:
        raise KeyError(f"{scope} settings need the person's id (user=...)")
    if scope == "guild":
        return place.guild_id, "", ""
    if scope == "channel":
        return place.guild_id, place.channel_id, ""
    if scope == "member":
        return place.guild_id, "", user
    if scope == "user":
        return "", "", user
    raise KeyError(f"{scope} settings are not stored per place")
