"""What the client does with Discord's events: messages, edits, deletions and reactions.

A message addressed to the bot (a mention, a DM, a reply to one of its messages, a question in
a help channel or a follow-up in the thread it opened) goes to `router.handle`; every other
guild message it can read is stored as channel history for summaries and digests. Every guild
message is also shown to the plugins' `on_message` hooks, and a reaction on one of the bot's
messages to their `on_reaction` hooks. Edits and deletions on Discord are followed in the
stored memory."""

from __future__ import annotations

import logging
from dataclasses import replace

import discord

from bot.api import Place, Reaction, Reply, Request, _, locale_scope
from bot.router import clean_text
from bot.transports.discord.admin import ADMIN_REFUSAL, Admin
from bot.transports.discord.base import TRANSPORT, storing
from bot.transports.discord.confirm import confirmer
from bot.transports.discord.delivery import (
    ChannelDestination,
    Delivery,
    DeliveryFailed,
    Destination,
    typing_indicator,
)

log = logging.getLogger(__name__)

THREAD_NAME_LIMIT = 90
TEXT_FILE_SUFFIXES = (".md", ".markdown", ".txt", ".text", ".rst")
MAX_TEXT_FILE = 1_000_000  # bytes; the router refuses text past QUILL_MAX_DOCUMENT_CHARS anyway


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


class Events(Admin, Delivery):
    """The client's event handlers (discord.py calls the `on_*` methods)."""

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        """A reaction on one of the bot's messages goes to every plugin's `on_reaction` (a 👍
        approves that answer for fine-tuning); the bot's own reactions are not passed on."""
        me = self.user
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
        if self.user is None or message.author.id == self.user.id:
            return
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return  # joins, pins, thread notices: nothing anyone said
        try:
            await self._on_message(message)
        except Exception:
            log.exception("failed to process message %s in channel %s", message.id, message.channel.id)

    async def _on_message(self, message: discord.Message) -> None:
        request = self._message_request(message, message_text(message, self.me))
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
        if message.author.id == self.me.id or (before is not None and before.content == message.content):
            return
        text = message_text(message, self.me)
        if text:
            await storing(
                self.app.memory.edit_external(str(message.id), text, await self.app.engine.count_tokens(text))
            )

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        """A message deleted on Discord is deleted from the memory too."""
        await storing(self.app.memory.delete_external(str(payload.message_id)))

    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        for message_id in payload.message_ids:
            await storing(self.app.memory.delete_external(str(message_id)))

    def _message_request(self, message: discord.Message, text: str) -> Request:
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
            mentioned=self.me in message.mentions or (role is not None and role in message.role_mentions),
            is_dm=message.guild is None,
            quoted=quoted_text(message),
            admin_hint=ADMIN_REFUSAL,
            place_locale=str(message.guild.preferred_locale) if message.guild else "",
            reply_to=str(message.reference.message_id) if message.reference and message.reference.message_id else None,
            confirm=confirmer(
                lambda **fields: message.channel.send(**fields),
                message.author.id,
                lambda: self.settings.tool_confirm_timeout,
            ),
        )

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
            and channel.owner_id == self.me.id
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
        return author is not None and author.id == self.me.id

    async def _answer(self, message: discord.Message, request: Request, *, new_thread: bool) -> None:
        """Run the request through the router and post the reply (in a new thread for a help
        question; as a reply to the message elsewhere)."""
        request = await self._with_attached_text(message, request)
        if not request.text and not request.attachments and message.attachments:
            names = ", ".join(a.filename for a in message.attachments)
            with locale_scope((await self.app.router.localized(request)).locale):
                refusal = _(
                    "I can only read the text of a message, not attachments ({names}). Please type your question.",
                    names=names,
                )
            await self._deliver(
                Reply(refusal, failed=True),
                ChannelDestination(message.channel, message.to_reference(fail_if_not_exists=False)),
            )
            return
        destination: Destination = ChannelDestination(message.channel, message.to_reference(fail_if_not_exists=False))
        channel: discord.abc.Messageable = message.channel
        if new_thread and request.text:
            thread = await self._open_thread(message, request.text)
            if thread is not None:
                channel, destination = thread, ChannelDestination(thread)
                ask_there = confirmer(thread.send, message.author.id, lambda: self.settings.tool_confirm_timeout)
                request = replace(request, channel_id=str(thread.id), confirm=ask_there)
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
        await storing(self._store(request))  # on failure the observers still see it

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
