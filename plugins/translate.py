"""Translator: `/translate to:<lang> <text>`, and per-channel auto-translation (off by default).

The source language is detected with lingua (low-accuracy mode: all 75 languages in ~65 MB,
loaded once, off the event loop). Code blocks, inline code, URLs, mentions, emoji and Markdown
markers never reach the model as text: they become markers (⟦1⟧) it must keep; the reply is
checked and the originals put back. A reply that lost or duplicated a marker is thrown away and
the text between the protected pieces is translated piece by piece instead, so the protected
pieces come back byte for byte whatever the model does.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Callable
from typing import Any

from lingua import Language, LanguageDetectorBuilder
from pydantic import Field

from bot.api import (
    N_,
    ChannelSettings,
    ChatMessage,
    Command,
    Option,
    PluginContext,
    Reply,
    Request,
    ToolSpec,
    _,
    hookimpl,
    language_code,
    language_label,
)

EXAMPLES = N_("fr (French), de (German), es (Spanish), pt (Portuguese), ja (Japanese), zh (Chinese)")
MARKER = re.compile(r"⟦(\d+)⟧")

# What must come back untouched, longest constructs first.
_PROTECTED = re.compile(
    r"```[\s\S]*?```"  # fenced code block
    r"|`[^`\n]+`"  # inline code
    r"|\]\(<?https?://[^\s)]+>?\)|\[(?=[^\]\n]*\]\()"  # Markdown link syntax around its label
    r"|<?https?://[^\s<>]+[^\s<>.,;:!?)\]'\"]>?"  # URL (trailing punctuation left to the text)
    r"|<(?:@[!&]?|#)\d+>|<a?:\w+:\d+>|<t:\d+(?::[tTdDfFR])?>|@everyone|@here"  # Discord mentions, emoji
    r"|:[a-z0-9_+-]+:"  # :shortcode: emoji
    r"|[\U0001F000-\U0001FAFF\u2600-\u27BF\uFE0F]+"  # Unicode emoji
    r"|(?m:^(?:#{1,3} |> |[-*] |\d+\. ))"  # heading, quote and list markers
    r"|\*\*|__|~~|\|\||(?<![\w*])\*(?=\S)|(?<=\S)\*(?![\w*])|(?<!\w)_(?=\w)|(?<=\w)_(?!\w)"  # emphasis
)
_SENTENCE_END = re.compile(r"((?<=[.!?])\s+|\n+)")
_LETTER = re.compile(r"[^\W\d_]")

Segment = tuple[bool, str]  # (translatable, text)


def split_segments(text: str) -> list[Segment]:
    """The text as protected pieces and translatable sentences; joined, they give the text back."""
    segments: list[Segment] = []
    pos = 0
    for match in _PROTECTED.finditer(text):
        segments += _sentences(text[pos : match.start()])
        segments.append((False, match.group()))
        pos = match.end()
    return segments + _sentences(text[pos:])


def _sentences(chunk: str) -> list[Segment]:
    return [(bool(_LETTER.search(p)), p) for p in _SENTENCE_END.split(chunk) if p]


def resolve_language(name: str) -> Language | None:
    """A language from its ISO 639-1/639-3 code or its name in English, in Chinese or in itself
    (`fr`, `German`, `中文`, `英文`, `日本語`, `español`), any case."""
    key = name.strip().casefold()
    if code := language_code(name):
        key = code.split("_")[0].casefold()  # zh_Hant: Chinese all the same
    for language in Language.all():
        codes = (language.name, language.iso_code_639_1.name, language.iso_code_639_3.name)
        if key in (c.casefold() for c in codes):
            return language
    return None


def language_name(language: Language | None) -> str:
    if language is None:
        return _("an unknown language")
    return language_label(language.iso_code_639_1.name, language.name.title())


@functools.cache
def _detector() -> Any:
    return LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().build()


async def detect(text: str) -> Language | None:
    """The language of `text`, or None when unsure; the first call loads the models (~1 s)."""
    return await asyncio.to_thread(lambda: _detector().detect_language_of(text))


class Translator:
    """Translates one text, protected pieces kept, in units that fit the model's reply."""

    def __init__(self, ctx: PluginContext, source: Language | None, target: Language) -> None:
        self.ctx = ctx
        self.source, self.target = language_name(source), language_name(target)

    async def translate(self, text: str) -> str:
        units = await self._units(split_segments(text))
        return "".join([await self._unit(unit) for unit in units])

    async def _units(self, segments: list[Segment]) -> list[list[Segment]]:
        """Consecutive segments grouped so each group's text takes at most half a reply."""
        budget = self.ctx.settings.max_reply_tokens // 2
        units: list[list[Segment]] = [[]]
        used = 0
        for segment in segments:
            cost = await self.ctx.engine.count_tokens(segment[1]) if segment[0] else 0
            if units[-1] and used + cost > budget:
                units.append([])
                used = 0
            units[-1].append(segment)
            used += cost
        return units

    async def _unit(self, unit: list[Segment]) -> str:
        if not any(translatable for translatable, _ in unit):
            return "".join(text for _, text in unit)
        if any(not t for t, _ in unit) and "⟦" not in "".join(text for _, text in unit):
            protected = [text for translatable, text in unit if not translatable]
            numbered = iter(range(1, len(protected) + 1))
            masked = "".join(text if t else f"⟦{next(numbered)}⟧" for t, text in unit)
            reply = await self._ask(masked, markers=True)
            found = [int(n) for n in MARKER.findall(reply)]
            if sorted(found) == list(range(1, len(protected) + 1)):
                return MARKER.sub(lambda m: protected[int(m.group(1)) - 1], reply)
        # Piece by piece: the protected pieces are never shown to the model at all.
        parts = []
        for translatable, text in unit:
            parts.append(await self._keep_spacing(text) if translatable else text)
        return "".join(parts)

    async def _keep_spacing(self, text: str) -> str:
        core = text.strip()
        lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()) :]
        return lead + await self._ask(core, markers=False) + trail

    async def _ask(self, text: str, *, markers: bool) -> str:
        system = self.ctx.prompts.render("translate_system", source=self.source, target=self.target, markers=markers)
        tokens = await self.ctx.engine.count_tokens(text)
        options = self.ctx.options(max_tokens=min(self.ctx.settings.max_reply_tokens, 2 * tokens + 16))
        result = await self.ctx.engine.chat([ChatMessage("system", system), ChatMessage("user", text)], options)
        return result.text.strip()


async def translate_into(
    ctx: PluginContext, text: str, target: Language, *, sure: bool = False
) -> tuple[str, Language | None]:
    """The translation of `text` and its detected source language ("" when there is nothing to
    translate, it is already in `target`, or `sure` is asked and the language is unclear)."""
    plain = " ".join(text for translatable, text in split_segments(text) if translatable)
    if not plain.strip():
        return "", None
    source = await detect(plain)
    if source == target or (sure and source is None):
        return "", source
    return await Translator(ctx, source, target).translate(text), source


async def translate(ctx: PluginContext, request: Request) -> Reply:
    target = resolve_language(request.options.get("to", ""))
    if target is None:
        return Reply(
            _(
                "I don't know the language “{language}”. Give a name or a code, e.g. {examples}.",
                language=request.options.get("to"),
                examples=_(EXAMPLES),
            ),
            failed=True,
        )
    text = request.text or request.quoted  # no text: the message it replies to
    if not text:
        return Reply(_("Usage: /translate to:<language> <text> (or reply to a message with it)"), failed=True)
    translation, source = await translate_into(ctx, text, target)
    if not translation:
        if source == target:
            return Reply(_("That is already in {language}.", language=language_name(target)))
        return Reply(_("Nothing to translate: that is only code, links, mentions or emoji."), failed=True)
    return Reply(f"{translation}\n\n_({language_name(source)} → {language_name(target)})_")


class TranslateChannel(ChannelSettings):
    """A channel's auto-translation (/autotranslate)."""

    auto: str | None = Field(
        None, max_length=8, description="Translate every message not in this language (ISO 639-1 code); empty: off."
    )


async def autotranslate(ctx: PluginContext, request: Request) -> Reply:
    choice = request.text.strip()
    if choice.casefold() == "off":
        await ctx.update(TranslateChannel, request.place, auto=None)
        return Reply(_("Auto-translation is off in this channel."))
    target = resolve_language(choice) if choice else None
    if target is None:
        usage = _("Usage: /autotranslate <language>|off, with a language such as {examples}.", examples=_(EXAMPLES))
        return Reply(usage, failed=True)
    await ctx.update(TranslateChannel, request.place, auto=target.iso_code_639_1.name)
    return Reply(
        _("Messages in this channel not in {language} will be translated into it.", language=language_name(target))
    )


@hookimpl
async def on_message(context: PluginContext, request: Request) -> Reply | None:
    """Auto-translation: a message of a channel that has it on, not already in its language."""
    code = (await context.scoped(TranslateChannel, request.place)).auto
    target = resolve_language(code) if code else None
    if target is None or request.text.startswith("/"):
        return None
    # Only a clearly detected language: "ok" or "+1" in a channel is not worth a translation.
    translation, source = await translate_into(context, request.text, target, sure=True)
    if not translation:
        return None
    who = request.author_name or request.author_id
    return Reply(f"{who} ({language_name(source)} → {language_name(target)}): {translation}")


@hookimpl
def register_settings(register: Callable[[type], None]) -> None:
    register(TranslateChannel)


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(
        Command(
            "translate",
            N_("translate text into another language; code, links, mentions, emoji and formatting are kept"),
            translate,
            "<text>",
            options=(
                Option("to", N_("target language (name or code)"), required=True, choices=("en", "fr", "de", "es")),
            ),
            tool=ToolSpec(answers=True, status=N_("translating…"), text="the text to translate"),
        )
    )
    register(
        Command(
            "autotranslate",
            N_("translate every message of this channel into one language, or turn it off (default)"),
            autotranslate,
            "<language>|off",
            admin=True,
        )
    )
