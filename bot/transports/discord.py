"""The Discord transport: a discord.py client that feeds the router and renders its replies.

Messages addressed to the bot (a mention, a DM, a reply to one of its messages, a question in a
help channel) go to `router.handle`; every other guild message it can read is stored as channel
history for summaries and digests. Every guild message is also shown to the plugins'
`on_message` hooks. Slash commands are generated from the plugins' `Command`s, plus a `/quill`
group of admin commands. Replies stream by editing the message at a bounded rate, and long ones
are split without breaking code blocks; a reply's file (a data export) goes to the requester
privately. Edits and deletions on Discord are followed in the stored memory. A failed Discord
call is logged and retried when that can help; it never takes the bot down.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import io
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeVar

import discord
from discord import app_commands
from pydantic import Field

from bot.api import NO_ANSWER, Command, GuildSettings, Option, Place, QuillError, Reaction, Reply, Request
from bot.memory import StorageError
from bot.router import clean_text
from bot.transports.splitting import DISCORD_MESSAGE_LIMIT, split_message

if TYPE_CHECKING:
    from bot.app import Quill

log = logging.getLogger(__name__)

TRANSPORT = "discord"
EMBED_LIMIT = 4096
EMBED_TITLE_LIMIT = 256
DESCRIPTION_LIMIT = 100  # Discord's limit for command and option descriptions
THREAD_NAME_LIMIT = 90
AUTOCOMPLETE_LIMIT = 25
TEXT_OPTION = "text"
ASCII_DIGITS = "0123456789"  # str.isdigit() also takes '²', which int() refuses
SLASH_TEXT_LIMIT = 6000  # Discord's longest string option
TEXT_FILE_SUFFIXES = (".md", ".markdown", ".txt", ".text", ".rst")
MAX_TEXT_FILE = 1_000_000  # bytes; the router refuses text past QUILL_MAX_DOCUMENT_CHARS anyway
ADMIN_REFUSAL = "This needs the Manage Server permission (or your id in QUILL_ADMIN_IDS)."
# discord.py waits out rate limits itself; one longer than this raises RateLimited instead.
MAX_RATE_LIMIT_WAIT = 30.0
SEND_ATTEMPTS = 3
IMAGE_NAME = "chart.png"  # a reply's image (Reply.image), shown inside its embed

T = TypeVar("T")


class DiscordGuild(GuildSettings):
    """A server's Discord settings kept by quill (`/quill help-channel`)."""

    namespace: ClassVar[str | None] = TRANSPORT

    help_channels: list[str] = Field(
        default_factory=list, description="Channels where each new question gets a thread of its own."
    )


class DiscordStartError(QuillError):
    """The bot could not connect; the message is fit to show (it never contains the token)."""


class DeliveryFailed(Exception):
    """A reply could not be posted (channel gone, no permission, Discord down)."""


class Editable(Protocol):
    """A posted message (a channel message, an interaction's response or follow-up)."""

    id: int

    async def edit(self, **fields: Any) -> Any: ...


class Destination(Protocol):
    """Where a reply goes: its first part, then each further part, as new messages."""

    async def send(self, **fields: Any) -> Editable: ...


@dataclass
class ChannelDestination:
    """A channel or thread; the first part answers `reference` (a reply) when given."""

    channel: discord.abc.Messageable
    reference: discord.MessageReference | None = None

    async def send(self, **fields: Any) -> Editable:
        reference, self.reference = self.reference, None
        if reference is not None:
            fields.update(reference=reference, mention_author=False)
        return await self.channel.send(**fields)


@dataclass
class InteractionDestination:
    """A slash command's deferred response, then follow-up messages."""

    interaction: discord.Interaction
    answered: bool = False
    ephemeral: bool = False  # deferred privately: the follow-ups stay private too

    async def send(self, **fields: Any) -> Editable:
        if not self.answered:
            self.answered = True
            if "file" in fields:  # the deferred response takes its files as attachments
                fields["attachments"] = [fields.pop("file")]
            return await self.interaction.edit_original_response(**fields)
        return await self.interaction.followup.send(wait=True, ephemeral=self.ephemeral, **fields)


class SecretFilter(logging.Filter):
    """Replaces a secret (the bot token) in every log record a handler emits, tracebacks included."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.secret in message:
            record.msg, record.args = message.replace(self.secret, "[redacted]"), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and self.secret in record.exc_text:
            record.exc_text = record.exc_text.replace(self.secret, "[redacted]")
        return True


def hide_secret_from_logs(secret: str) -> None:
    """Install a `SecretFilter` on every handler of the root logger."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(SecretFilter(secret))


def message_text(message: discord.Message, me: discord.abc.User) -> str:
    """The text of a message without the bot's own mention; other mentions become @names."""
    text = message.content
    for user in message.mentions:
        name = "" if user.id == me.id else f"@{user.display_name}"
        text = text.replace(f"<@{user.id}>", name).replace(f"<@!{user.id}>", name)
    if message.guild is not None and (role := message.guild.self_role) is not None:
        text = text.replace(role.mention, "")
    return clean_text(text)


def quoted_text(message: discord.Message) -> str:
    """The text of the message `message` replies to, when Discord sent or cached it."""
    reference = message.reference
    replied = reference and (reference.resolved or reference.cached_message)
    return replied.content if isinstance(replied, discord.Message) else ""


def thread_name(text: str) -> str:
    """A thread's title from the question that opened it: its first line, shortened."""
    first = text.strip().split("\n", 1)[0].strip() or "question"
    return first if len(first) <= THREAD_NAME_LIMIT else first[: THREAD_NAME_LIMIT - 1] + "…"


class QuillClientMixin:
    """Everything of the bot but the choice of `discord.Client` or `discord.AutoShardedClient`."""

    # Seconds before retrying a Discord call that failed on Discord's side (5xx, 429).
    retry_delay = 1.0

    def __init__(self, app: Quill, *, intents: discord.Intents | None = None, **options: Any) -> None:
        if intents is None:
            intents = discord.Intents.default()
            intents.message_content = True  # privileged: enable it in the developer portal
        super().__init__(  # type: ignore[call-arg]
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
            max_ratelimit_timeout=MAX_RATE_LIMIT_WAIT,
            **options,
        )
        self.app = app
        self.settings = app.settings
        self.tree = app_commands.CommandTree(self)  # type: ignore[arg-type]
        for command in app.router.commands.values():
            self._add_slash_command(command)
        self._add_core_commands()

    # -- start-up ----------------------------------------------------------------------------

    async def setup_hook(self) -> None:
        if self.settings.discord_sync_commands:
            try:
                synced = await self.tree.sync()
            except discord.HTTPException as exc:
                log.error("could not sync slash commands globally: %s", exc)
            else:
                log.info("synced %d slash commands globally (shown within the hour)", len(synced))

    async def on_ready(self) -> None:
        log.info("connected to Discord as %s in %d servers", self.user, len(self.guilds))  # type: ignore[attr-defined]
        self.app.scheduler.posters[TRANSPORT] = self.post_scheduled
        await self.app.scheduler.run_jobs()

    async def post_scheduled(self, place: Place, target: str, reply: Reply) -> None:
        """The scheduler's poster: a job's reply goes to `target`, a channel id or mention."""
        channel_id = "".join(ch for ch in target if ch in ASCII_DIGITS) or place.channel_id
        destination = self._target(replace(reply, channel_id=channel_id), None)
        if not await self._deliver(reply, destination):
            log.error("scheduled reply for %s not posted to %r", place, target)

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        """A reaction on one of the bot's messages goes to every plugin's `on_reaction` (a 👍
        approves that answer for fine-tuning); the bot's own reactions are not passed on."""
        me = self.user  # type: ignore[attr-defined]
        if me is None or payload.user_id == me.id:
            return
        if payload.message_author_id is not None and payload.message_author_id != me.id:
            return
        place = Place(TRANSPORT, str(payload.guild_id or ""), str(payload.channel_id))
        reaction = Reaction(place, str(payload.user_id), str(payload.emoji), str(payload.message_id))
        for result in await self.app.hooks.call("on_reaction", reaction=reaction):
            if result.value:
                log.info("%s: %s", result.plugin, result.value)

    # -- messages ----------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        if self.user is None or message.author.id == self.user.id:  # type: ignore[attr-defined]
            return
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return  # joins, pins, thread notices: nothing anyone said
        try:
            await self._on_message(message)
        except Exception:
            log.exception("failed to process message %s in channel %s", message.id, message.channel.id)

    async def _on_message(self, message: discord.Message) -> None:
        me = self.user  # type: ignore[attr-defined]
        request = self._message_request(message, message_text(message, me))
        if message.author.bot:  # other bots' messages are history, never questions (no loops)
            await self._remember(request)
            return
        help_question = await self._is_help_question(message)
        if help_question or await self._is_addressed(message, request):
            await self._answer(message, request, new_thread=help_question)
        else:
            await self._remember(request)
        if message.guild is not None:
            for reply in await self.app.router.observe(request):
                await self._post_observed(message, reply)
                if reply.delete_original:  # only set where an admin turned deletion on
                    await self._delete(message)

    async def _delete(self, message: discord.Message) -> None:
        try:
            await self.call_discord(message.delete, "delete a flagged message")
        except DeliveryFailed as exc:
            log.warning("flagged message %s not deleted: %s", message.id, exc)
        else:
            log.info("deleted flagged message %s in channel %s", message.id, message.channel.id)

    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        """Follow a person's edit in the stored memory (the bot's own streaming edits are skipped)."""
        message, before = payload.message, payload.cached_message
        if message.author.id == self.user.id or (before is not None and before.content == message.content):  # type: ignore[attr-defined]
            return
        text = message_text(message, self.user)  # type: ignore[attr-defined]
        if text:
            await self._storing(
                self.app.memory.edit_external(str(message.id), text, await self.app.engine.count_tokens(text))
            )

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        """A message deleted on Discord is deleted from the memory too."""
        await self._storing(self.app.memory.delete_external(str(payload.message_id)))

    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        for message_id in payload.message_ids:
            await self._storing(self.app.memory.delete_external(str(message_id)))

    @staticmethod
    async def _storing(write: Awaitable[Any]) -> None:
        """Run a memory write for a Discord event; a database fault is logged, not raised."""
        try:
            await write
        except StorageError as exc:
            log.warning("memory not updated: %s", exc)

    def _message_request(self, message: discord.Message, text: str) -> Request:
        me = self.user  # type: ignore[attr-defined]
        role = message.guild.self_role if message.guild is not None else None
        return Request(
            transport=TRANSPORT,
            guild_id=str(message.guild.id) if message.guild else "",
            channel_id=str(message.channel.id),
            message_id=str(message.id),
            author_id=str(message.author.id),
            author_name=message.author.display_name,
            text=text,
            is_admin=self.is_admin(message.author),
            mentioned=me in message.mentions or (role is not None and role in message.role_mentions),
            is_dm=message.guild is None,
            quoted=quoted_text(message),
            admin_hint=ADMIN_REFUSAL,
            reply_to=str(message.reference.message_id) if message.reference and message.reference.message_id else None,
        )

    def is_admin(self, user: discord.abc.User, permissions: discord.Permissions | None = None) -> bool:
        """Admins: members with Manage Server, or ids listed in QUILL_ADMIN_IDS."""
        if str(user.id) in self.settings.admin_ids:
            return True
        if permissions is None:
            permissions = getattr(user, "guild_permissions", None)
        return bool(permissions and (permissions.manage_guild or permissions.administrator))

    async def help_channels(self, guild_id: str) -> list[str]:
        """The channel ids marked as help channels in a guild (read each time: another process
        sharing the database may have changed them)."""
        return (await self.app.context.scoped(DiscordGuild, Place(TRANSPORT, guild_id, ""))).help_channels

    async def _is_help_question(self, message: discord.Message) -> bool:
        """A new question: a top-level message (not a reply) in a help channel."""
        if message.guild is None or isinstance(message.channel, discord.Thread):
            return False
        if message.reference is not None:
            return False
        return str(message.channel.id) in await self.help_channels(str(message.guild.id))

    async def _is_addressed(self, message: discord.Message, request: Request) -> bool:
        """A DM, a mention, a reply to the bot, or a follow-up in a help thread the bot opened."""
        if request.is_dm or request.mentioned:
            return True
        channel = message.channel
        if (
            isinstance(channel, discord.Thread)
            and channel.owner_id == self.user.id  # type: ignore[attr-defined]
            and str(channel.parent_id) in await self.help_channels(request.guild_id)
        ):
            return True
        return await self._replies_to_me(message)

    async def _replies_to_me(self, message: discord.Message) -> bool:
        reference = message.reference
        if reference is None or reference.message_id is None:
            return False
        replied = reference.resolved or reference.cached_message
        if replied is None:
            try:
                replied = await message.channel.fetch_message(reference.message_id)
            except discord.HTTPException:
                return False
        author = getattr(replied, "author", None)
        return author is not None and author.id == self.user.id  # type: ignore[attr-defined]

    async def _answer(self, message: discord.Message, request: Request, *, new_thread: bool) -> None:
        """Run the request through the router and post the reply (in a new thread for a help
        question; as a reply to the message elsewhere)."""
        request = await self._with_attached_text(message, request)
        if not request.text and not request.attachments and message.attachments:
            names = ", ".join(a.filename for a in message.attachments)
            await self._deliver(
                Reply(
                    f"I can only read the text of a message, not attachments ({names}). Please type your question.",
                    failed=True,
                ),
                ChannelDestination(message.channel, message.to_reference(fail_if_not_exists=False)),
            )
            return
        destination: Destination = ChannelDestination(message.channel, message.to_reference(fail_if_not_exists=False))
        channel: discord.abc.Messageable = message.channel
        if new_thread and request.text:
            thread = await self._open_thread(message, request.text)
            if thread is not None:
                channel, destination = thread, ChannelDestination(thread)
                request = replace(request, channel_id=str(thread.id))
        async with typing_indicator(channel):
            reply = await self.app.router.handle(request)
            delivered = await self._deliver(reply, self._target(reply, destination))
        if reply.file is not None and delivered:
            await self._send_file(reply.file, message.author.send, destination)

    async def _with_attached_text(self, message: discord.Message, request: Request) -> Request:
        """Text files attached to a message for the bot are part of what it says (a Markdown
        document for /kb-add): their contents follow the message's text. Others are ignored."""
        texts = []
        for attachment in message.attachments:
            if not attachment.filename.lower().endswith(TEXT_FILE_SUFFIXES) or attachment.size > MAX_TEXT_FILE:
                continue
            try:
                data = await attachment.read()
            except discord.HTTPException as exc:
                log.warning("could not read attachment %s: %s", attachment.filename, exc)
                continue
            texts.append((attachment.filename, data.decode("utf-8", errors="replace")))
        if not texts:
            return request
        if len(texts) > 1:  # several files: each its own document (/kb-add), not one text
            return replace(request, attachments=tuple(texts))
        return replace(request, text="\n\n".join([request.text, texts[0][1]]).strip())

    async def _open_thread(self, message: discord.Message, text: str) -> discord.Thread | None:
        """The thread that holds a help question's conversation; None (answer in the channel) if
        Discord refuses it."""
        try:
            return await message.create_thread(
                name=thread_name(text), auto_archive_duration=self.settings.discord_thread_archive_minutes
            )
        except discord.HTTPException as exc:
            log.warning(
                "could not open a thread in channel %s (%s); answering in the channel",
                message.channel.id,
                exc,
            )
            return None

    async def _remember(self, request: Request) -> None:
        """Store a guild message not addressed to the bot as history of its channel or thread."""
        if request.is_dm or not request.text:
            return
        await self._storing(self._store(request))  # on failure the observers still see it

    async def _store(self, request: Request) -> None:
        memory = self.app.memory
        conv = await memory.conversation(TRANSPORT, request.guild_id, request.channel_id)
        assert conv.id is not None
        await memory.add_message(
            conv.id,
            role="user",
            content=request.text,
            author_id=request.author_id,
            author_name=request.author_name,
            token_count=await self.app.engine.count_tokens(request.text),
            external_id=request.message_id,
            reply_to=request.reply_to,
        )

    async def _post_observed(self, message: discord.Message, reply: Reply) -> None:
        """Post what an `on_message` hook returned, as a reply to the message it saw."""
        reference = message.to_reference(fail_if_not_exists=False)
        await self._deliver(reply, self._target(reply, ChannelDestination(message.channel, reference)))

    def _target(self, reply: Reply, default: Destination) -> Destination | None:
        """Where a reply goes: its `channel_id` when a plugin set one (a mod report), else
        `default`; None (logged) when that channel is not one the bot can post in."""
        if reply.channel_id is None:
            return default
        snowflake = reply.channel_id.isascii() and reply.channel_id.isdigit()  # not '²': int() refuses it
        channel = self.get_channel(int(reply.channel_id)) if snowflake else None  # type: ignore[attr-defined]
        if not isinstance(channel, discord.abc.Messageable):
            log.warning("a plugin asked to post in channel %r, which I cannot see", reply.channel_id)
            return None
        return ChannelDestination(channel)

    # -- output ------------------------------------------------------------------------------

    async def _deliver(self, reply: Reply, destination: Destination | None) -> bool:
        """Post a reply, streaming it by edits at most once per QUILL_DISCORD_EDIT_INTERVAL.

        Returns False when there is nowhere to post it or Discord refused it (logged); a stream
        is then closed, which stops its generation."""
        posted: list[tuple[Editable, str]] = []
        limit = EMBED_LIMIT if reply.title else DISCORD_MESSAGE_LIMIT

        async def show(text: str) -> None:
            for index, part in enumerate(split_message(text, limit) or [NO_ANSWER]):
                fields = self._fields(part, reply.title if index == 0 else None)
                if index < len(posted):
                    if posted[index][1] != part:
                        message = posted[index][0]
                        edited = await self.call_discord(lambda m=message, f=fields: m.edit(**f), "edit")
                        posted[index] = (edited or message, part)
                else:
                    if index == 0 and reply.image is not None and "embed" in fields:
                        fields["embed"].set_image(url=f"attachment://{IMAGE_NAME}")
                        fields["image"] = reply.image
                    sent = await self.call_discord(lambda f=fields: destination.send(**_with_file(f)), "send a reply")
                    posted.append((sent, part))

        try:
            if destination is None:
                return False
            if reply.stream is None:
                await show(reply.text)
                return True
            text, shown_at = "", time.monotonic()
            async for piece in reply.stream:
                text += piece
                if text.strip() and time.monotonic() - shown_at >= self.settings.discord_edit_interval:
                    await show(text)
                    shown_at = time.monotonic()
            await show(text)
            if reply.answer_id is not None and posted:  # a reaction on it now finds this answer
                await self._storing(self.app.memory.link_external(reply.answer_id, str(posted[0][0].id)))
            return True
        except DeliveryFailed as exc:
            log.warning("reply not delivered: %s", exc)
            return False
        finally:
            if reply.stream is not None:
                await aclose(reply.stream)

    async def _send_file(self, path: Path, send: Callable[..., Awaitable[Any]], fallback: Destination) -> None:
        """Hand a reply's file (a data export) to the requester privately: by DM, or as a
        follow-up only they see; say so where they asked if that fails."""
        try:
            await self.call_discord(lambda: send(file=discord.File(path)), "send a file")
        except (DeliveryFailed, OSError) as exc:
            log.warning("file %s not handed over: %s", path.name, exc)
            text = (
                f"I could not send you {path.name} privately (are direct messages from server members "
                "allowed?). Ask an admin for the file, or allow direct messages and try again."
            )
            await self._deliver(Reply(text, failed=True), fallback)

    @staticmethod
    def _fields(part: str, title: str | None) -> dict[str, Any]:
        """A message's fields; a reply never pings anyone, whatever the model wrote."""
        fields: dict[str, Any] = {"allowed_mentions": discord.AllowedMentions.none()}
        if title is None:
            return {**fields, "content": part}
        embed = discord.Embed(title=title[:EMBED_TITLE_LIMIT], description=part)
        return {**fields, "content": None, "embed": embed}

    async def call_discord(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """Run a Discord API call; retry it (bounded) when Discord failed on its side or rate
        limited us, give up at once when retrying cannot help. Raises DeliveryFailed."""
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                return await call()
            except discord.RateLimited as exc:  # discord.py waited out shorter limits itself
                raise DeliveryFailed(f"could not {what}: {exc}") from exc
            except (discord.NotFound, discord.Forbidden) as exc:
                raise DeliveryFailed(f"could not {what}: {exc} (gone, or no permission)") from exc
            except discord.HTTPException as exc:
                if exc.status < 500 and exc.status != 429:
                    raise DeliveryFailed(f"could not {what}: {exc}") from exc
                log.warning("could not %s (attempt %d of %d): %s", what, attempt, SEND_ATTEMPTS, exc)
            if attempt < SEND_ATTEMPTS:
                await asyncio.sleep(self.retry_delay * attempt)
        raise DeliveryFailed(f"could not {what} after {SEND_ATTEMPTS} attempts")

    # -- slash commands ----------------------------------------------------------------------

    def _add_slash_command(self, command: Command) -> None:
        """A slash command for a plugin's Command: its options typed and bounded as declared
        (whole numbers as `Range[int, min, max]`, text as `Range[str, min, max]`, closed choices
        as a choice list, suggested ones as autocomplete), plus a `text` option for its free
        text when it takes one. Discord then refuses what is out of bounds before it is sent;
        the router checks again, as for console text."""
        options = sorted(command.options, key=lambda o: not o.required)  # Discord wants required first
        takes_text = bool(command.usage) and all(o.name != TEXT_OPTION for o in options)
        params = [
            inspect.Parameter("interaction", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=discord.Interaction)
        ]
        descriptions: dict[str, str] = {}
        if takes_text:
            params.append(_parameter(TEXT_OPTION, str, required=command.usage.startswith("<")))
            descriptions[TEXT_OPTION] = short(command.usage.strip("<>[]"))
        completers, choices = {}, {}
        for option in options:
            params.append(_parameter(option.name, _annotation(option), required=option.required))
            descriptions[option.name] = short(option.description)
            if option.closed:
                choices[option.name] = [app_commands.Choice(name=c, value=c) for c in option.choices]
            elif option.choices:
                completers[option.name] = _completer(option.choices)

        async def callback(interaction: discord.Interaction, **values: str | int | None) -> None:
            text = str(values.pop(TEXT_OPTION, None) or "") if takes_text else ""
            given = {name: value for name, value in values.items() if value is not None}
            await self.run_slash_command(interaction, command, text, given)

        callback.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        app_commands.describe(**descriptions)(callback)
        if completers:
            app_commands.autocomplete(**completers)(callback)
        if choices:
            app_commands.choices(**choices)(callback)
        try:
            slash = app_commands.Command(name=command.name, description=short(command.help), callback=callback)
        except (TypeError, ValueError) as exc:
            log.error("/%s cannot be a slash command (%s); mention the bot to use it", command.name, exc)
            return
        if command.admin:
            slash.default_permissions = discord.Permissions(manage_guild=True)
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
        )

    async def run_slash_command(
        self, interaction: discord.Interaction, command: Command, text: str, options: dict[str, str | int]
    ) -> None:
        """Run a plugin command for a slash command and answer in the interaction."""
        request = self.interaction_request(interaction, command.name, text, options)
        if command.admin and not request.is_admin:
            log.warning("refused admin command /%s for user %s", command.name, request.author_id)
            await self._respond(interaction, f"/{command.name} is for admins. {ADMIN_REFUSAL}")
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

    async def _respond(self, interaction: discord.Interaction, text: str) -> None:
        """A short private (ephemeral) answer to an interaction."""
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException as exc:
            log.warning("could not answer an interaction: %s", exc)

    async def _refused(self, interaction: discord.Interaction) -> bool:
        """True (and the user told why) unless the user may run admin commands."""
        if self.is_admin(interaction.user, interaction.permissions):
            return False
        log.warning("refused an admin command for user %s", interaction.user.id)
        await self._respond(interaction, ADMIN_REFUSAL)
        return True

    def _add_core_commands(self) -> None:
        """/help, and the /quill group of admin commands (sync, help channels)."""

        @self.tree.command(name="help", description="list quill's commands")
        async def help_command(interaction: discord.Interaction) -> None:
            admin = self.is_admin(interaction.user, interaction.permissions)
            await self._respond(interaction, self.app.router.help_text(admin))

        admin = app_commands.Group(
            name="quill",
            description="quill administration (Manage Server)",
            default_permissions=discord.Permissions(manage_guild=True),
            guild_only=True,
        )
        channels = app_commands.Group(
            name="helpchannel", description="channels where every question gets a thread", parent=admin
        )

        @admin.command(name="sync", description="publish the slash commands to Discord")
        @app_commands.describe(
            scope="guild: this server, at once; global: every server, within an hour; "
            "clear: remove this server's copies"
        )
        async def sync(interaction: discord.Interaction, scope: Literal["guild", "global", "clear"] = "guild") -> None:
            if await self._refused(interaction):
                return
            await interaction.response.defer(ephemeral=True, thinking=True)
            await self._respond(interaction, await self.sync_commands(scope, interaction.guild))

        @channels.command(name="add", description="make a channel a help channel")
        @app_commands.describe(channel="the channel (default: this one)")
        async def add(interaction: discord.Interaction, channel: discord.TextChannel | None = None) -> None:
            await self._edit_help_channels(interaction, channel, add=True)

        @channels.command(name="remove", description="stop treating a channel as a help channel")
        @app_commands.describe(channel="the channel (default: this one)")
        async def remove(interaction: discord.Interaction, channel: discord.TextChannel | None = None) -> None:
            await self._edit_help_channels(interaction, channel, add=False)

        @channels.command(name="list", description="list this server's help channels")
        async def list_(interaction: discord.Interaction) -> None:
            ids = await self.help_channels(str(interaction.guild_id))
            await self._respond(interaction, "Help channels: " + (" ".join(f"<#{i}>" for i in ids) or "none"))

        self.tree.add_command(admin)

    async def sync_commands(self, scope: str, guild: discord.abc.Snowflake | None) -> str:
        """Publish the slash commands; the answer says what happened."""
        try:
            if scope == "global":
                synced = await self.tree.sync()
                return f"Synced {len(synced)} commands globally; Discord may take up to an hour to show them."
            assert guild is not None  # /quill is guild-only
            if scope == "clear":
                self.tree.clear_commands(guild=guild)
                await self.tree.sync(guild=guild)
                return "Removed this server's copies of the commands; the global ones remain."
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
            return f"Synced {len(synced)} commands to this server; they are usable now."
        except discord.HTTPException as exc:
            log.error("slash command sync (%s) failed: %s", scope, exc)
            return f"Discord refused the sync: {exc}"

    async def _edit_help_channels(self, interaction: discord.Interaction, channel: Any, *, add: bool) -> None:
        if await self._refused(interaction):
            return
        target = channel or interaction.channel
        if target is None or isinstance(target, discord.Thread) or interaction.guild_id is None:
            await self._respond(interaction, "Pick a text channel of this server.")
            return
        guild_id = str(interaction.guild_id)
        ids = await self.help_channels(guild_id)
        key = str(target.id)
        ids = sorted({*ids, key}) if add else [i for i in ids if i != key]
        await self.app.context.update(DiscordGuild, Place(TRANSPORT, guild_id, ""), help_channels=ids)
        done = "is now a help channel: each new question gets a thread" if add else "is no longer a help channel"
        await self._respond(interaction, f"<#{key}> {done}.")


class QuillClient(QuillClientMixin, discord.Client):
    """quill on Discord, one connection (fine up to about 2,500 servers)."""


class ShardedQuillClient(QuillClientMixin, discord.AutoShardedClient):
    """quill on Discord with one gateway connection per shard (QUILL_DISCORD_SHARDED)."""


def make_client(app: Quill) -> QuillClientMixin:
    """The client the settings ask for: sharded (optionally a subset of the shards, for running
    several processes) or not."""
    settings = app.settings
    if not settings.discord_sharded:
        return QuillClient(app)
    if settings.discord_shard_ids and settings.discord_shard_count is None:
        raise DiscordStartError("QUILL_DISCORD_SHARD_IDS needs QUILL_DISCORD_SHARD_COUNT (the total).")
    shards = {"shard_count": settings.discord_shard_count, "shard_ids": settings.discord_shard_ids}
    return ShardedQuillClient(app, **shards)


async def run_discord(app: Quill) -> None:
    """Connect and serve until stopped. Start-up faults raise DiscordStartError."""
    token = app.settings.discord_token
    if token is None or not token.get_secret_value().strip():
        raise DiscordStartError("No Discord token: set QUILL_DISCORD_TOKEN (or DISCORD_TOKEN).")
    secret = token.get_secret_value().strip()
    hide_secret_from_logs(secret)
    client = make_client(app)
    try:
        async with client:  # type: ignore[attr-defined]
            await client.start(secret)  # type: ignore[attr-defined]
    except discord.LoginFailure:
        raise DiscordStartError(
            "Discord rejected the bot token (QUILL_DISCORD_TOKEN). Copy it again from the developer portal "
            "(Bot -> Reset Token)."
        ) from None
    except discord.PrivilegedIntentsRequired:
        raise DiscordStartError(
            "Discord refused the Message Content intent. Enable it in the developer portal: "
            "your application -> Bot -> Privileged Gateway Intents -> Message Content Intent."
        ) from None
    except (OSError, discord.HTTPException, discord.GatewayNotFound) as exc:
        raise DiscordStartError(f"Cannot reach Discord: {str(exc).replace(secret, '[redacted]')}") from None


@asynccontextmanager
async def typing_indicator(channel: discord.abc.Messageable) -> AsyncIterator[None]:
    """Show "quill is typing…" while the block runs; a refusal to show it changes nothing else."""
    typing = channel.typing()
    try:
        await typing.__aenter__()
    except discord.HTTPException as exc:
        log.debug("no typing indicator in %s: %s", getattr(channel, "id", "?"), exc)
        yield
        return
    try:
        yield
    finally:
        await typing.__aexit__(None, None, None)


async def aclose(stream: AsyncIterator[str]) -> None:
    """Close a reply stream (stopping its generation) if it can be closed."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


def _with_file(fields: dict[str, Any]) -> dict[str, Any]:
    """Fields with an `image` (PNG bytes) as a fresh attachment: each attempt reads it anew."""
    fields = dict(fields)
    if (image := fields.pop("image", None)) is not None:
        fields["file"] = discord.File(io.BytesIO(image), filename=IMAGE_NAME)
    return fields


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
