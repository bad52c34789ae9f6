"""Digests over seeded messages, with sections from other plugins through the hook (real pluggy)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime

import pytest

from bot.api import Place, PluginContext, Reply, Request, Section, hookimpl
from bot.app import Quill
from bot.config import Settings
from bot.engine.local import LocalEngine
from plugins.digest import DigestSettings
from plugins.digest.mood import MoodSettings


@pytest.fixture
async def app(settings: Settings, engine: LocalEngine) -> AsyncIterator[Quill]:
    """The whole core without the summarizer: these tests are about the digest's own sections,
    and a grammar-bound summary takes minutes on a shared 2-core machine (tests/test_summarize.py
    covers it, and the digest's use of its hook)."""
    quill = await Quill.start(settings, engine=engine)
    quill.plugins.unregister(name="plugins.summarize")
    yield quill
    await quill.close(close_engine=False)


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
    app.context.config(DigestSettings).when_empty = "skip"
    reply = await app.router.handle(asking("/digest"))
    assert reply == Reply()  # no text, no chart: nothing is posted


# -- grounded sections, mood and the chart (issue 20) ---------------------------------------------

TEAM_LOG = [
    ("bob", "Who will review the payment PR?"),  # open
    ("dave", "Where are the staging credentials stored?"),  # answered below
    ("erin", "The staging credentials are in the team vault."),
    ("li", "监控告警的阈值是谁定的？"),  # open
    ("chen", "这个接口的文档在哪里？"),  # answered below
    ("mei", "接口文档在维基的开发者页面。"),
    ("alice", "We decided to drop support for Python 3.9."),
    ("li", "我们下周一开始迁移数据库。"),
    ("erin", "Morning all, the nightly build finished in 14 minutes."),
]


async def seed_log(
    app: Quill,
    log: list[tuple[str, str]],
    channel: str = "team",
    replies: dict[int, int] | None = None,
    **place: str,
) -> list[str]:
    """People's messages, each with a transport id (and, per `replies`, the index of the message
    it replies to, as the Discord transport stores it); returns the ids."""
    transport, guild = place.get("transport", "console"), place.get("guild", "")
    conv = await app.memory.conversation(transport, guild, channel)
    ids: list[str] = []
    for i, (author, text) in enumerate(log):
        parent = (replies or {}).get(i)
        ids.append(str(5000 + i))
        await app.memory.add_message(
            conv.id,
            role="user",
            content=text,
            author_id=author,
            author_name=author,
            external_id=ids[-1],
            reply_to=ids[parent] if parent is not None else None,
        )
    return ids


def section(text: str, title: str) -> str:
    """The body of one `**title**` section of a digest."""
    return text.split(f"**{title}**\n", 1)[1].split("\n\n", 1)[0] if f"**{title}**\n" in text else ""


async def test_digest_lists_open_questions_and_decisions_in_english_and_chinese(app: Quill) -> None:
    await seed_log(app, TEAM_LOG)
    reply = await app.router.handle(asking("/digest"))
    questions = section(reply.text, "Open questions")
    assert "“Who will review the payment PR?” — bob" in questions
    assert "“监控告警的阈值是谁定的？” — li" in questions
    assert "staging credentials" not in questions and "接口的文档" not in questions  # answered by others
    decided = section(reply.text, "Decisions and action items")
    assert "“We decided to drop support for Python 3.9.” — alice" in decided
    assert "“我们下周一开始迁移数据库。” — li" in decided
    assert "Morning all" not in decided and "payment PR" not in decided  # a question is no decision
    assert "Nothing notable" not in reply.text


async def test_a_discord_reply_answers_a_question_and_threads_link_to_their_start(app: Quill) -> None:
    log = [
        ("ada", "Who can take the on-call shift tonight?"),
        ("bob", "me"),  # no shared words: only the reply link says it answers
        ("cy", "The login page is broken again, users are angry."),
        ("dee", "Confirmed, login returns errors for everyone, this is terrible."),
        ("ada", "登录页面又挂了，用户在投诉，很糟糕。"),
        ("bob", "I hate this, the third login outage this month."),
    ]
    replies = {1: 0, 3: 2, 4: 2, 5: 2}  # message index -> the index it replies to
    ids = await seed_log(app, log, channel="111", replies=replies, transport="discord", guild="9")
    reply = await app.router.handle(asking("/digest", channel="111", transport="discord", guild="9"))
    assert "on-call" not in section(reply.text, "Open questions")
    link = f"https://discord.com/channels/9/111/{ids[2]}"
    threads = section(reply.text, "Most discussed threads")
    assert f"“The login page is broken again, users are angry.” — cy ([jump]({link})): 4 messages, 4 people" in threads
    mood = section(reply.text, "Mood")
    assert (
        f"**Needs attention:** “The login page is broken again, users are angry.” — cy ([jump]({link})): 4 unhappy"
        in mood
    )


def test_each_message_gets_a_mood_in_english_and_chinese() -> None:
    from plugins.digest.mood import lexicon_label

    assert lexicon_label("We shipped the 2.3 release today, great work everyone!") == "positive"
    assert lexicon_label("I am frustrated, the CI keeps failing.") == "negative"
    assert lexicon_label("The config file lives under deploy/.") == "neutral"
    assert lexicon_label("太棒了，谢谢大家！") == "positive"
    assert lexicon_label("又崩溃了，真烦人。") == "negative"
    assert lexicon_label("会议记录放在维基上了。") == "neutral"


def bars(png: bytes) -> int:
    """The bars of a chart: runs of coloured (not white, not grey-ink) pixels just above its axis."""
    import io

    from PIL import Image

    from plugins.digest import chart

    image = Image.open(io.BytesIO(png)).convert("RGB")
    row = chart.HEIGHT - chart.MARGIN_BOTTOM - 2
    colours = set(chart.COLOURS.values())
    runs, inside = 0, False
    for x in range(image.width):
        coloured = image.getpixel((x, row)) in colours
        runs += coloured and not inside
        inside = coloured
    return runs


def test_the_chart_is_a_png_with_one_bar_per_day() -> None:
    from plugins.digest import chart

    days = {"Mon 11-23": {"positive": 9, "neutral": 40}, "Tue 11-24": {"neutral": 12}, "Wed 11-25": {"negative": 20}}
    png = chart.draw(days, "Messages per day, by mood")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert bars(png) == 3
    assert bars(chart.draw({"Mon 11-23": {"neutral": 1}}, "one day")) == 1


async def test_digest_and_mood_carry_the_chart_and_mood_refuses_bad_hours(app: Quill) -> None:
    await seed_log(app, [("ada", "Thanks, that helped a lot!"), ("bob", "This flaky test is really annoying.")])
    digest_reply = await app.router.handle(asking("/digest"))
    assert digest_reply.image is not None and bars(digest_reply.image) == 1
    assert "Overall: 1 positive, 0 neutral, 1 negative." in section(digest_reply.text, "Mood")
    assert "Unhappy:\n- “This flaky test is really annoying.” — bob" in digest_reply.text
    assert "Highlights:\n- “Thanks, that helped a lot!” — ada" in digest_reply.text
    mood_reply = await app.router.handle(asking("/mood hours:2"))
    assert mood_reply.title == "Mood of the last 2 hour(s)" and mood_reply.image is not None
    assert mood_reply.text.startswith("Overall: 1 positive, 0 neutral, 1 negative.")
    for bad in ("hours:0", "hours:lots", "hours:100000"):
        refused = await app.router.handle(asking(f"/mood {bad}"))
        assert refused.failed and "hours takes a whole number from 1 to 744" in refused.text and refused.image is None
    quiet = await app.router.handle(asking("/mood", channel="elsewhere"))
    assert quiet.text == "No messages from people here in that time." and quiet.image is None


async def test_an_empty_period_has_no_chart(app: Quill) -> None:
    reply = await app.router.handle(asking("/digest"))
    assert reply.text == "Nothing new." and reply.image is None


async def test_the_model_route_gives_one_label_per_message_under_its_grammar(app: Quill) -> None:
    from plugins.digest import mood

    app.context.config(MoodSettings).method = "model"
    labels = await mood.labels(app.context, ["Great work on the release, thanks!", "登录页面又挂了，很糟糕。"])
    assert len(labels) == 2 and set(labels) <= set(mood.LABELS)
