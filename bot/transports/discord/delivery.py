"""Posting replies on Discord: streamed by edits at a bounded rate, split into messages without
breaking code blocks, titled replies as embeds (with their image), files handed over privately,
and every Discord call retried (bounded) when retrying can help. A reply that cannot be
delivered is logged and stops its generation; it never takes the bot down."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import discord

from bot.api import NO_ANSWER, Place, Reply, _
from bot.transports.discord.base import ClientBase, storing
from bot.transports.splitting import DISCORD_MESSAGE_LIMIT, split_message

log = logging.getLogger(__name__)

EMBED_LIMIT = 4096
EMBED_TITLE_LIMIT = 256
ASCII_DIGITS = "0123456789"  # str.isdigit() also takes '²', which int() refuses
SEND_ATTEMPTS = 3
IMAGE_NAME = "chart.png"  # a reply's image (Reply.image), shown inside its embed

T = TypeVar("T")


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


class Delivery(ClientBase):
    """The client's part that posts replies (for messages, slash commands and scheduled jobs)."""

    # Seconds before retrying a Discord call that failed on Discord's side (5xx, 429).
    retry_delay = 1.0

    async def post_scheduled(self, place: Place, target: str, reply: Reply) -> None:
        """The scheduler's poster: a job's reply goes to `target`, a channel id or mention."""
        channel_id = "".join(ch for ch in target if ch in ASCII_DIGITS) or place.channel_id
        destination = self._target(replace(reply, channel_id=channel_id), None)
        if not await self._deliver(reply, destination):
            log.error("scheduled reply for %s not posted to %r", place, target)

    def _target(self, reply: Reply, default: Destination | None) -> Destination | None:
        """Where a reply goes: its `channel_id` when a plugin set one (a mod report), else
        `default`; None (logged) when that channel is not one the bot can post in."""
        if reply.channel_id is None:
            return default
        snowflake = reply.channel_id.isascii() and reply.channel_id.isdigit()  # not '²': int() refuses it
        channel = self.get_channel(int(reply.channel_id)) if snowflake else None
        if not isinstance(channel, discord.abc.Messageable):
            log.warning("a plugin asked to post in channel %r, which I cannot see", reply.channel_id)
            return None
        return ChannelDestination(channel)

    async def _deliver(self, reply: Reply, destination: Destination | None) -> bool:
        """Post a reply, streaming it by edits at most once per QUILL_DISCORD_EDIT_INTERVAL.

        Returns False when there is nowhere to post it or Discord refused it (logged); a stream
        is then closed, which stops its generation."""
        posted: list[tuple[Editable, str]] = []
        limit = EMBED_LIMIT if reply.title else DISCORD_MESSAGE_LIMIT

        async def show(text: str, destination: Destination) -> None:
            for index, part in enumerate(split_message(text, limit) or [_(NO_ANSWER)]):
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
                await show(reply.text, destination)
                return True
            text, shown_at = "", time.monotonic()
            async for piece in reply.stream:
                text += piece
                if text.strip() and time.monotonic() - shown_at >= self.settings.discord_edit_interval:
                    await show(text, destination)
                    shown_at = time.monotonic()
            await show(text, destination)
            if reply.answer_id is not None and posted:  # a reaction on it now finds this answer
                await storing(self.app.memory.link_external(reply.answer_id, str(posted[0][0].id)))
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
            text = _(
                "I could not send you {file} privately (are direct messages from server members "
                "allowed?). Ask an admin for the file, or allow direct messages and try again.",
                file=path.name,
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
