"""Digests over seeded messages, with sections from other plugins through the hook (real pluggy)."""

from __future__ import annotations

import asyncio
from datetime import datetime

from bot.api import Place, PluginContext, Reply, Request, Section, hookimpl
from bot.app import Quill


def asking(text: str, channel: str = "team", transport: str = "console", guild: str = "") -> Request:
    return Request(transport=transport, guild_id=guild, channel_id=channel, author_id="ada", text=text, is_admin=True)


async def seed(app: Quill, channel: str, authors: list[str], transport: str = "console", guild: str = "") -> None:
    conv = await app.memory.conversation(transport, guild, channel)
    for i, author in enumerate(authors):
        await app.memory.add_message(
            conv.id,
            role="user",
            content=f"note {i}",
            author_id=author,
            author_name=author,
            external_id=f"{i + 100}",
        )
    await app.memory.add_message(conv.id, role="assistant", content="noted", author_id="quill")


class Sections:
    """A plugin contributing a section, one failing, one with nothing to say."""

    def __init__(self) -> None:
        self.calls: list[tuple[Place, datetime]] = []

    @hookimpl
    def digest_sections(self, context: PluginContext, place: Place, since: datetime) -> Section:
        self.calls.append((place, since))
        return Section("Decisions", f"- ship on friday ({place.channel_id})")


class Broken:
    @hookimpl
    async def digest_sections(self, context: PluginContext, place: Place, since: datetime) -> Section:
        raise RuntimeError("summarizer bug")


class Quiet:
    @hookimpl
    def digest_sections(self, context: PluginContext, place: Place, since: datetime) -> None:
        return None


async def test_digest_counts_authors_and_collects_plugin_sections(app: Quill) -> None:
    sections = Sections()
    for name, plugin in [("sections", sections), ("broken", Broken()), ("quiet", Quiet())]:
        app.plugins.register(plugin, name)
    await seed(app, "team", ["ada", "bob", "ada", "cy", "ada"])
    await seed(app, "elsewhere", ["zed"])  # another channel is not counted
    reply = await app.router.handle(asking("/digest"))
    assert not reply.failed
    assert reply.title is not None and reply.title.startswith("Digest since")
    assert "**Activity**\n5 messages from 3 people, 1 answers from the bot." in reply.text
    assert "Most active: ada (3), bob (1), cy (1)" in reply.text
    assert "- #team: 5 messages" in reply.text
    assert "**Decisions**\n- ship on friday (team)" in reply.text  # the broken plugin is left out
    assert sections.calls[0][0] == Place("console", "", "team")


async def test_digest_of_several_channels_ranks_them_with_links(app: Quill) -> None:
    await seed(app, "111", ["ada", "bob"], transport="discord", guild="9")
    await seed(app, "222", ["ada", "bob", "cy"], transport="discord", guild="9")
    reply = await app.router.handle(asking("/digest 111 222", transport="discord", guild="9"))
    lines = reply.text.splitlines()
    threads = lines[lines.index("Most active threads:") + 1 :]
    assert threads[0] == "- <#222> ([start](https://discord.com/channels/9/222/100)): 3 messages"
    assert threads[1] == "- <#111> ([start](https://discord.com/channels/9/111/100)): 2 messages"


async def test_next_digest_covers_only_what_came_since(app: Quill) -> None:
    await seed(app, "team", ["ada", "bob"])
    first = await app.router.handle(asking("/digest"))
    assert "2 messages" in first.text
    second = await app.router.handle(asking("/digest"))
    assert second.text == "Nothing new."
    await asyncio.sleep(0.01)
    await seed(app, "team", ["cy"])
    third = await app.router.handle(asking("/digest"))
    assert "1 messages from 1 people" in third.text
    assert third.title != first.title  # "since" moved on


async def test_an_empty_period_can_post_nothing(app: Quill) -> None:
    app.settings.digest_when_empty = "skip"
    reply = await app.router.handle(asking("/digest"))
    assert reply == Reply()
