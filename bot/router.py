"""The router: turns a transport's request into a call to the plugin that handles it.

`/name args` goes to the command `name`; anything else to the conversation command
(QUILL_CONVERSATION_COMMAND). Every handler runs guarded: a plugin that raises or hangs gets
logged and answered with a short apology, and the others keep working.
"""

from __future__ import annotations

import asyncio
import logging
import re
import unicodedata
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace

from bot.api import PluginContext
from bot.hooks import deadline
from bot.i18n import LanguageChannel, LanguageUser, _, error_text, locale_scope, resolve
from bot.types import Command, OptionError, QuillError, Reply, Request

log = logging.getLogger(__name__)

# Zero-width and bidi-control characters carry no meaning for the model and hide text from people.
# (U+2066-U+2069 are the isolates, U+061C the Arabic letter mark.)
_INVISIBLE = re.compile("[\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")


_OPTION = re.compile(r'(\w+):(?:"([^"]*)"|(\S*))\s*')


def parse_options(command: Command, args: str) -> tuple[dict[str, str], str]:
    """Split `name:value` (or `name:"two words"`) options off the front of a command's text."""
    names = {o.name for o in command.options}
    options: dict[str, str] = {}
    while (match := _OPTION.match(args)) and match.group(1) in names:
        options[match.group(1)] = match.group(2) if match.group(2) is not None else match.group(3)
        args = args[match.end() :]
    return options, args.strip()


def check_options(command: Command, given: Mapping[str, str | int], text: str) -> tuple[dict[str, str | int], str]:
    """The options as the handler gets them (each parsed by its declaration, unknown names
    dropped) and the text left; a positional option takes the text when not named. Raises
    OptionError for the first value refused."""
    options: dict[str, str | int] = {}
    for option in command.options:
        value = given.get(option.name)
        if value is None and option.positional and text:
            value, text = text, ""
        if value is not None:
            options[option.name] = option.parse(clean_text(value) if isinstance(value, str) else value)
    return options, text


def usage_line(command: Command) -> str:
    """`/name opt:<what> [opt:<what>] usage`: required options bare, optional ones bracketed
    (a positional option by its name alone: `/retention [days]`)."""
    parts = [f"/{command.name}"]
    for o in command.options:
        shown = o.name if o.positional else f"{o.name}:<{_(o.description)}>"
        parts.append(f"<{shown}>" if o.positional and o.required else shown if o.required else f"[{shown}]")
    if command.usage:
        parts.append(command.usage)
    return " ".join(parts)


def clean_text(text: str) -> str:
    """Drop invisible and control characters (keeping newlines and tabs) and lone surrogates."""
    text = text.encode("utf-8", errors="replace").decode("utf-8")
    text = _INVISIBLE.sub("", text)
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")
    return unicodedata.normalize("NFC", text).strip()


class Router:
    """Holds the commands the plugins registered and dispatches requests to them."""

    def __init__(self, context: PluginContext) -> None:
        self.context = context
        self.plugins = context.hooks.pm
        self.commands: dict[str, Command] = {}
        # Each plugin's hook is called on its own, so one that raises cannot hide the others'.
        for plugin, hook in context.hooks.implementations("register_commands"):
            context.hooks.collect_one(plugin, hook, register=self._registrar(plugin))

    def _registrar(self, plugin: str) -> Callable[[Command], None]:
        def register(command: Command) -> None:
            if command.name in self.commands or command.name == "help":
                log.error("plugin %s: command /%s is already taken; ignored", plugin, command.name)
                return
            self.commands[command.name] = command

        return register

    def help_text(self, is_admin: bool) -> str:
        """The commands this user may run, each with its help, in the current locale."""
        lines = [_("Commands:"), "  /help  " + _("this list")]
        for cmd in sorted(self.commands.values(), key=lambda c: c.name):
            if cmd.admin and not is_admin:
                continue
            lines.append(f"  {usage_line(cmd)}  {_(cmd.help)}" + ("  " + _("(admin)") if cmd.admin else ""))
        lines.append(_("Anything else is a message to the assistant."))
        return "\n".join(lines)

    async def localized(self, request: Request, text: str | None = None) -> Request:
        """`request` with the locale it is answered in (bot/i18n.py `resolve`): the person's own
        /language first, then the channel's, the transport's user locale, the language of `text`
        (the message without its command name; a document's, /kb-add's, says nothing of whom it
        answers), the place's locale, English."""
        mine = channel = ""
        try:
            if request.author_id:
                mine = (await self.context.scoped(LanguageUser, request.place, user=request.author_id)).locale
            if request.channel_id:
                channel = (await self.context.scoped(LanguageChannel, request.place)).locale
        except QuillError as exc:  # the database is down: answer anyway, in the other ways' language
            log.warning("language setting unreadable: %s", exc)
        if text is None:
            text = request.text
        if (command := self.commands.get(request.command or "")) is not None and command.document:
            text = ""
        locale = resolve(mine=mine, channel=channel, client=request.locale, text=text, place=request.place_locale)
        return replace(request, locale=locale)

    async def handle(self, request: Request) -> Reply:
        """Answer a message addressed to the bot: a `/command` or conversation. Never raises."""
        text = clean_text(request.text)
        spoken = text
        if text.startswith("/"):
            name, _sep, spoken = text[1:].partition(" ")
            request = replace(request, command=name.lower())
        request = await self.localized(request, spoken)
        with locale_scope(request.locale):
            return await self._handle(request, text)

    async def _handle(self, request: Request, text: str) -> Reply:
        if not text:
            return Reply(_("I got an empty message. Type a question, or /help for commands."), failed=True)
        # The exact limit depends on the command (run_command checks it); nothing passes the largest.
        if refusal := self._too_long(text, self._input_limit(None)):
            return refusal
        if not text.startswith("/"):
            conversation = self.context.settings.conversation_command
            return await self._run_command(conversation, replace(request, text=text))
        name, _sep, args = text[1:].partition(" ")
        name = name.lower()
        if name == "help":
            return Reply(self.help_text(request.is_admin))
        return await self._run_text(name, replace(request, text=args))

    async def run_text(self, name: str, request: Request) -> Reply:
        """Run command `name` on its text form, `name:value` options first (a scheduled job's
        `/summarize hours:24`). Never raises."""
        request = await self.localized(replace(request, command=name))
        with locale_scope(request.locale):
            return await self._run_text(name, request)

    async def _run_text(self, name: str, request: Request) -> Reply:
        command = self.commands.get(name)
        if command is None:
            return Reply(_("Unknown command /{name}. Type /help for the list.", name=name), failed=True)
        options, rest = parse_options(command, clean_text(request.text))
        return await self._run_command(name, replace(request, text=rest, options={**request.options, **options}))

    async def run_command(self, name: str, request: Request) -> Reply:
        """Run command `name` with the request's text and options (a transport's slash command
        comes here directly). Options are checked against their declarations here, so a handler
        never sees a value out of its type or bounds. Never raises."""
        request = await self.localized(replace(request, command=name))
        with locale_scope(request.locale):
            return await self._run_command(name, request)

    async def _run_command(self, name: str, request: Request) -> Reply:
        command = self.commands.get(name)
        if command is None:
            return Reply(_("Unknown command /{name}. Type /help for the list.", name=name), failed=True)
        if command.admin and not request.is_admin:
            log.warning("refused admin command /%s for user %s", name, request.author_id)
            return Reply(_("/{name} is for admins only.", name=name) + _hint(request), failed=True)
        text = clean_text(request.text)
        if refusal := self._too_long(text, self._input_limit(command)):
            return refusal
        try:
            options, text = check_options(command, request.options, text)
        except OptionError as exc:
            refusal = _(
                "/{name}: {problem} Usage: {usage}", name=name, problem=error_text(exc), usage=usage_line(command)
            )
            return Reply(refusal, failed=True)
        missing = [o.name for o in command.options if o.required and o.name not in options]
        if missing:
            refusal = _(
                "/{name} needs {options}. Usage: {usage}",
                name=name,
                options=", ".join(missing),
                usage=usage_line(command),
            )
            return Reply(refusal, failed=True)
        return await self._call(command, replace(request, text=text, command=name, options=options))

    async def observe(self, request: Request) -> list[Reply]:
        """Show a message to every plugin's `on_message` hook and return what they want posted.

        Each hook is guarded like a command; a failing one is logged, not announced, since it
        would otherwise apologise under every message of a channel."""
        text = clean_text(request.text)
        if not text:
            return []
        request = await self.localized(replace(request, text=text))
        with locale_scope(request.locale):
            results = await self.context.hooks.call("on_message", request=request)
        replies = []
        for result in results:
            reply = result.value
            if result.failed or not isinstance(reply, Reply) or reply.failed:
                continue
            if reply.stream is not None:
                reply.stream = self._guard(f"{result.plugin} (on_message)", reply.stream, reply, request.locale)
            if reply.text or reply.stream is not None:
                replies.append(reply)
        return replies

    def _input_limit(self, command: Command | None) -> tuple[int, str]:
        """The longest text `command` takes (None: any command), and the setting saying so."""
        settings = self.context.settings
        message = (settings.max_input_chars, "QUILL_MAX_INPUT_CHARS")
        document = (settings.max_document_chars, "QUILL_MAX_DOCUMENT_CHARS")
        if command is None:
            return max(message, document)
        return document if command.document else message

    @staticmethod
    def _too_long(text: str, limit: tuple[int, str]) -> Reply | None:
        most, setting = limit
        if len(text) <= most:
            return None
        refusal = _(
            "That message is {length} characters; I take at most {most} ({setting}). Please shorten it or split it up.",
            length=len(text),
            most=most,
            setting=setting,
        )
        return Reply(refusal, failed=True)

    async def _call(self, command: Command, request: Request) -> Reply:
        try:
            async with deadline(self.context.settings.plugin_timeout):
                reply = await command.handler(self.context, request)
        except Exception as exc:
            return self._failure(f"/{command.name}", exc)
        if reply.stream is not None:
            reply.stream = self._guard(f"/{command.name}", reply.stream, reply, request.locale)
        return reply

    async def _guard(self, what: str, pieces: AsyncIterator[str], reply: Reply, locale: str) -> AsyncIterator[str]:
        """Stream a handler's reply; a failure or a stall mid-way ends it with an apology. Each
        piece is made in the request's locale: the stream runs after the handler returned."""
        timeout = self.context.settings.plugin_timeout
        iterator = aiter(pieces)
        try:
            while True:
                try:
                    with locale_scope(locale):
                        async with asyncio.timeout(timeout):
                            piece = await anext(iterator)
                except StopAsyncIteration:
                    return
                yield piece
        except Exception as exc:
            reply.failed = True
            with locale_scope(locale):
                yield "\n" + self._failure(what, exc).text
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()

    @staticmethod
    def _failure(what: str, exc: BaseException) -> Reply:
        """The reply for a handler that raised: a QuillError's own message, else an apology."""
        if isinstance(exc, QuillError):
            log.warning("%s: %s", what, exc)
            return Reply(error_text(exc), failed=True)
        if isinstance(exc, TimeoutError):
            log.error("%s timed out", what)
            return Reply(_("Sorry, {what} took too long and was stopped.", what=what), failed=True)
        log.exception("%s failed", what, exc_info=exc)
        return Reply(_("Sorry, {what} failed. The error is logged; other commands still work.", what=what), failed=True)


def _hint(request: Request) -> str:
    """Who counts as an admin, as the transport says it, after a refusal."""
    return f" {_(request.admin_hint)}" if request.admin_hint else ""
