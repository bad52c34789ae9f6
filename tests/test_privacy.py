"""Data controls: erase, export, retention and following edits, on a real database."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from sqlalchemy import MetaData, text

from bot.api import Command, PluginContext, Reply, Request, hookimpl
from bot.app import Quill
from bot.builtin.privacy import RetentionSettings, apply_retention
from bot.memory import FTS_PREFIXES
from bot.models import Message, utcnow


def ask(app: Quill, text: str, author: str = "u1", **fields: object) -> asyncio.Future[Reply]:
    values: dict[str, object] = {"transport": "discord", "guild_id": "g1", "channel_id": "c1", "author_id": author}
    values.update(fields)
    return app.router.handle(Request(text=text, **values))  # type: ignore[arg-type]


async def seed(app: Quill) -> None:
    """Two users' messages in two guilds and a DM, plus settings."""
    memory = app.memory
    for guild, channel in (("g1", "c1"), ("g2", "c9"), ("", "dm-u1")):
        conv = await memory.conversation("discord", guild, channel)
        for author in ("u1", "u2", "u1"):
            await memory.add_message(conv.id, role="user", content=f"{author} in {channel}", author_id=author)
        await memory.add_message(conv.id, role="assistant", content="reply", author_id="quill")
    await memory.set_settings("g1", "", {"discord.help_channels": ["c1"]})


def snapshot(app: Quill) -> dict[str, set[tuple]]:
    """Every row of every table in the database (reflected, not a hand-kept list)."""
    tables = MetaData()
    tables.reflect(app.memory.engine)
    with app.memory.engine.connect() as conn:
        return {name: {tuple(r) for r in conn.execute(t.select())} for name, t in tables.tables.items()}


def mentions(rows: dict[str, set[tuple]], user_id: str) -> list[tuple[str, tuple]]:
    """Rows holding `user_id` as a value. The search vocabulary (`*_fts_vocab`: each term with
    its counts) is left out: "u1" is a term of u2's message "u2 in dm-u1", which stays."""
    return [
        (t, row)
        for t, found in rows.items()
        if not t.endswith("_fts_vocab")
        for row in found
        if any(str(v) == user_id for v in row)
    ]


async def test_forget_me_erases_every_row_of_that_user_and_no_other(app: Quill) -> None:
    await seed(app)
    before = snapshot(app)
    assert mentions(before, "u1")
    reply = await ask(app, "/forget me")
    assert reply.text == "Erased everything stored about you: 6 from message."
    after = snapshot(app)
    assert mentions(after, "u1") == []
    for table, rows in before.items():  # everything not about u1 is untouched
        if not table.startswith(FTS_PREFIXES):  # the search index is derived: checked below
            assert {r for r in rows if not any(str(v) == "u1" for v in r)} == after[table], table
    if "message_fts" in after:  # SQLite's FTS5 index holds exactly the messages left
        with app.memory.engine.connect() as conn:
            left = set(conn.execute(text("SELECT terms FROM message")).scalars())
        assert {r[0] for r in after["message_fts"]} == left
        # and its vocabulary only the terms of those messages: nothing of the erased ones lingers
        assert {r[0] for r in after["message_fts_vocab"]} == {t for terms in left for t in terms.split()}
    hits = await app.context.search.search("u1 u2 in c1 c9", "discord", "g1", "c1", limit=20)
    assert hits and not [hit for hit in hits if hit.author == "u1" or hit.text.startswith("u1")]


async def test_forget_for_a_user_with_no_data(app: Quill) -> None:
    assert (await ask(app, "/forget me", author="nobody")).text == "Nothing is stored about you."


async def test_admins_forget_a_user_or_a_channel_others_may_not(app: Quill) -> None:
    await seed(app)
    refused = await ask(app, "/forget user u2", author="u1")
    assert refused.failed and "admins only" in refused.text
    assert (await ask(app, "/forget user <@u2>", author="boss", is_admin=True)).text.endswith("3 from message.")
    assert mentions(snapshot(app), "u2") == []
    wiped = await ask(app, "/forget channel", author="boss", is_admin=True)
    assert wiped.text == "Erased this channel's memory: 3 messages."
    conv = await app.memory.conversation("discord", "g1", "c1")
    assert await app.memory.history(conv.id, 10_000) == []
    other = await app.memory.conversation("discord", "g2", "c9")
    assert len(await app.memory.history(other.id, 10_000)) == 3
    assert (await ask(app, "/forget everything")).failed


async def test_two_erases_at_once_delete_once_and_both_answer(app: Quill) -> None:
    await seed(app)
    first, second = await asyncio.gather(ask(app, "/forget me"), ask(app, "/forget me"))
    # The second waits for the first's transaction, then finds nothing left: no partial deletes.
    assert sorted([first.text, second.text]) == [
        "Erased everything stored about you: 6 from message.",
        "Nothing is stored about you.",
    ]
    assert mentions(snapshot(app), "u1") == []


async def test_export_holds_exactly_the_users_rows(app: Quill) -> None:
    await seed(app)
    reply = await ask(app, "/export me")
    assert reply.file is not None and reply.file.is_file() and str(reply.file) in reply.text
    document = json.loads(reply.file.read_text())
    assert document["user_id"] == "u1"
    rows = document["tables"]["message"]
    assert len(rows) == 6 and {r["author_id"] for r in rows} == {"u1"}
    assert {r["content"] for r in rows} == {"u1 in c1", "u1 in c9", "u1 in dm-u1"}
    assert (await ask(app, "/export everyone")).failed


async def test_edits_and_deletes_on_the_transport_are_followed(app: Quill) -> None:
    conv = await app.memory.conversation("discord", "g1", "c1")
    await app.memory.add_message(conv.id, role="user", content="typo", author_id="u1", external_id="111")
    await app.memory.add_message(conv.id, role="user", content="keep", author_id="u1", external_id="222")
    assert await app.memory.edit_external("111", "fixed", 1) == 1
    assert await app.memory.delete_external("222") == 1
    assert await app.memory.delete_external("unknown") == 0
    assert [m.content for m in await app.memory.history(conv.id, 1000)] == ["fixed"]


async def add_aged(app: Quill, ages: dict[str, list[int]], now: datetime) -> None:
    """Messages "<age>d", that many days old, in a channel of each guild."""
    for guild, days in ages.items():
        conv = await app.memory.conversation("discord", guild, f"chan-{guild}")
        with app.memory.engine.begin() as conn:
            for age in days:
                conn.execute(
                    Message.__table__.insert().values(
                        conversation_id=conv.id,
                        role="user",
                        content=f"{age}d",
                        author_id="u",
                        author_name="",
                        token_count=1,
                        created_at=now - timedelta(days=age, minutes=1),
                    )
                )


async def kept(app: Quill, guilds: Iterable[str]) -> dict[str, list[str]]:
    left = {}
    for guild in guilds:
        conv = await app.memory.conversation("discord", guild, f"chan-{guild}")
        left[guild] = sorted(m.content for m in await app.memory.history(conv.id, 1000))
    return left


async def test_retention_deletes_exactly_the_older_messages(app: Quill) -> None:
    now = utcnow()
    ages = {"g1": [1, 10, 40], "g2": [1, 10, 40], "": [1, 400]}
    await add_aged(app, ages, now)
    await ask(app, "/retention 5", author="boss", is_admin=True)  # g1 keeps 5 days
    assert (await ask(app, "/retention 5")).failed  # members may not
    app.context.config(RetentionSettings).days = 30  # the default for everyone else
    deleted = await apply_retention(app.context, now)
    assert deleted == {"g1": 2, "g2": 1, "": 1}
    assert await kept(app, ages) == {"g1": ["1d"], "g2": ["10d", "1d"], "": ["1d"]}
    assert "5 days" in (await ask(app, "/retention", author="boss", is_admin=True)).text


async def test_one_guilds_broken_retention_does_not_stop_the_others(app: Quill) -> None:
    """Values stored before /retention was bounded (the overflow of issue 18), or by hand:
    that guild is skipped and logged, every other guild's old messages still go."""
    now = utcnow()
    ages = {"huge": [1, 40], "text": [1, 40], "g2": [1, 10, 40]}
    await add_aged(app, ages, now)
    for guild, days in (("huge", 99999999999999999999), ("text", "seven"), ("g2", 5)):
        await app.memory.set_settings(guild, "", {"privacy.retention_days": days})
    deleted = await apply_retention(app.context, now)
    assert deleted == {"g2": 2}
    assert await kept(app, ages) == {"huge": ["1d", "40d"], "text": ["1d", "40d"], "g2": ["1d"]}


class NotesPlugin:
    """A third-party plugin keeping notes about users outside quill's tables."""

    def __init__(self) -> None:
        self.notes = {"u1": ["likes tea", "on call"], "u2": ["new"]}

    @hookimpl
    async def forget_user(self, context: PluginContext, user_id: str) -> int:
        return len(self.notes.pop(user_id, []))

    @hookimpl
    def register_commands(self, register: Callable[[Command], None]) -> None:
        pass


async def test_plugins_erase_their_own_data_through_the_hook(app: Quill) -> None:
    notes = NotesPlugin()
    app.plugins.register(notes, "notes")
    await seed(app)
    reply = await ask(app, "/forget me")
    assert reply.text == "Erased everything stored about you: 6 from message, 2 from plugin data."
    assert notes.notes == {"u2": ["new"]}


async def test_forgetting_keeps_team_documents_but_drops_who_added_them(app: Quill) -> None:
    added = await ask(app, "/kb-add name:onboarding New people get a laptop on day one.", author="u1", is_admin=True)
    assert not added.failed, added.text
    reply = await ask(app, "/forget me")
    assert reply.text == "Erased everything stored about you: 1 from knowledge_doc."
    assert mentions(snapshot(app), "u1") == []
    assert "onboarding" in (await ask(app, "/kb-list")).text


async def test_retention_runs_as_the_schedulers_own_job(app: Quill) -> None:
    conv = await app.memory.conversation("discord", "g1", "c1")
    with app.memory.engine.begin() as conn:
        conn.execute(
            Message.__table__.insert().values(
                conversation_id=conv.id,
                role="user",
                content="old",
                author_id="u",
                author_name="",
                token_count=1,
                created_at=utcnow() - timedelta(days=3),
            )
        )
    await app.memory.add_message(conv.id, role="user", content="new", author_id="u")
    assert [j.id for j in await app.scheduler.jobs()] == []  # not one of the admins' jobs
    app.context.config(RetentionSettings).days = 2
    app.scheduler.aps.modify_job("quill-retention", "maintenance", next_run_time=utcnow())
    await app.scheduler.run_jobs()  # this process leads: the due job runs
    async with asyncio.timeout(20):
        while len(await app.memory.history(conv.id, 1000)) > 1:
            await asyncio.sleep(0.1)
    assert [m.content for m in await app.memory.history(conv.id, 1000)] == ["new"]
