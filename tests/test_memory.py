"""Conversation memory on a real database (SQLite file; PostgreSQL where configured)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlmodel import SQLModel, select

from bot.memory import Memory, StorageError, alembic_config, include_name, make_db_engine, upgrade_schema
from bot.models import ModerationReport, ScopeSetting, utcnow


@pytest.fixture
def memory(db_url: str):
    store = Memory.open(db_url)
    yield store
    store.close()


def test_migrations_match_the_models(memory: Memory) -> None:
    with memory.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_name": include_name})
        diff = compare_metadata(context, SQLModel.metadata)
    assert diff == [], "models changed without an Alembic revision: run the autogenerate step in README"


def test_upgrade_in_place_keeps_data(db_url: str) -> None:
    first = Memory.open(db_url)
    conv = asyncio.run(first.conversation("console", "", "c1"))
    asyncio.run(first.add_message(conv.id, role="user", content="keep me", author_id="u1"))
    first.close()
    again = Memory.open(db_url)  # runs the migrations a second time
    assert [m.content for m in asyncio.run(again.history(conv.id, 10_000))] == ["keep me"]
    assert "alembic_version" in inspect(again.engine).get_table_names()
    again.close()


async def test_conversation_is_per_place_and_created_once(memory: Memory) -> None:
    a = await memory.conversation("discord", "g1", "c1")
    b = await memory.conversation("discord", "g1", "c1")
    dm = await memory.conversation("discord", "", "c1")
    other = await memory.conversation("console", "g1", "c1")
    assert a.id == b.id
    assert len({a.id, dm.id, other.id}) == 3


async def test_concurrent_first_use_creates_one_conversation(memory: Memory) -> None:
    convs = await asyncio.gather(*(memory.conversation("discord", "g", "race") for _ in range(8)))
    assert len({c.id for c in convs}) == 1


async def test_history_keeps_the_newest_turns_within_the_budget(memory: Memory) -> None:
    conv = await memory.conversation("console", "", "trim")
    for i in range(10):
        await memory.add_message(conv.id, role="user", content=f"m{i}", author_id="u", token_count=10)
    kept = await memory.history(conv.id, token_budget=35)
    assert [m.content for m in kept] == ["m7", "m8", "m9"]
    kept = await memory.history(conv.id, token_budget=35, per_message=5)
    assert [m.content for m in kept] == ["m8", "m9"]
    assert await memory.history(conv.id, token_budget=5) == []


async def test_messages_keep_their_fields(memory: Memory) -> None:
    conv = await memory.conversation("discord", "g", "c")
    await memory.add_message(
        conv.id,
        role="user",
        content="héllo ✓",
        author_id="42",
        author_name="Ada",
        token_count=3,
        external_id="999",
    )
    (msg,) = await memory.history(conv.id, 100)
    assert (msg.author_id, msg.author_name, msg.content, msg.token_count, msg.external_id) == (
        "42",
        "Ada",
        "héllo ✓",
        3,
        "999",
    )
    assert msg.created_at.tzinfo is not None


async def test_settings_per_guild_and_channel(memory: Memory) -> None:
    assert await memory.get_settings("g", "", "discord") == {}
    await memory.set_settings("g", "", {"discord.help_channels": ["c1"]})
    await memory.set_settings("g", "c1", {"translate.auto": {"to": "fr"}})
    await memory.set_settings("g", "", {"discord.help_channels": ["c1", "c2"]})
    assert await memory.get_settings("g", "", "discord") == {"discord.help_channels": ["c1", "c2"]}
    assert await memory.get_settings("g", "c1", "translate") == {"translate.auto": {"to": "fr"}}
    assert await memory.get_settings("other", "", "discord") == {}
    # Namespaces are whole words: "discord" does not read "discordia.x"; cleared keys go.
    await memory.set_settings("g", "", {"discordia.x": 1})
    assert list(await memory.get_settings("g", "", "discord")) == ["discord.help_channels"]
    await memory.set_settings("g", "", {}, cleared=["discord.help_channels"])
    assert await memory.get_settings("g", "", "discord") == {}


def test_sqlite_uses_wal(tmp_path: Path) -> None:
    store = Memory.open(f"sqlite:///{tmp_path / 'q.db'}")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    store.close()


def test_data_dir_that_cannot_be_created_fails_clearly(tmp_path: Path) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("a file where the data folder should be")
    with pytest.raises(StorageError, match="QUILL_DATABASE_URL"):
        Memory.open(f"sqlite:///{blocker / 'quill.db'}")


def test_read_only_database_fails_clearly_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "q.db"
    sqlite3.connect(path).close()  # an empty database the migrations must write to
    monkeypatch.chdir(tmp_path)  # where a `file:` URI taken for a plain path would make a folder
    with pytest.raises(StorageError, match="readonly"):
        Memory.open(f"sqlite:///file:{path}?mode=ro&uri=true")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.db"]


def test_a_file_uri_database_goes_where_it_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Memory.open(f"sqlite:///file:{tmp_path / 'new' / 'q.db'}?uri=true").close()
    assert (tmp_path / "new" / "q.db").is_file() and not (tmp_path / "file:").exists()


def test_database_that_is_not_a_database_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError, match=r"Cannot open the database .*QUILL_DATABASE_URL"):
        Memory.open(f"sqlite:///{path}")


def test_unreachable_postgres_fails_clearly() -> None:
    with pytest.raises(StorageError, match="Cannot open the database") as err:
        Memory.open("postgresql+psycopg://quill:secret@127.0.0.1:1/quill?connect_timeout=2")
    assert "secret" not in str(err.value)


async def test_locked_database_is_a_storage_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    store = Memory.open(f"sqlite:///{path}")
    conv = await store.conversation("console", "", "c")
    locker = sqlite3.connect(path, timeout=0)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        store.engine.dispose()
        with pytest.raises(StorageError, match="locked"):
            await store.add_message(conv.id, role="user", content="x", author_id="u")
    finally:
        locker.rollback()
        locker.close()
    await store.add_message(conv.id, role="user", content="after", author_id="u")
    assert [m.content for m in await store.history(conv.id, 100)] == ["after"]
    store.close()


def test_upgrade_namespaces_the_old_setting_keys(db_url: str) -> None:
    """Settings stored before plugins owned them (migration 0007) keep their values under the
    plugin's keys, moderation's one object split into fields, and downgrade restores them."""
    engine = make_db_engine(db_url)
    upgrade_schema(engine, "0006_reply_to")
    old = {
        ("g1", "", "retention_days"): 30,
        ("g1", "", "help_channels"): ["c1", "c2"],
        ("g1", "c1", "auto_translate"): "ZH",
        ("g1", "c2", "auto_translate"): None,
        ("g1", "", "moderation"): {"terms": ["机密", "secret"], "channel": "mods", "classify": None, "delete": True},
        ("g1", "c1", "digest.last_run"): "2026-11-30T08:00:00+00:00",
        ("g1", "c1", "finetune.enabled"): True,
    }
    with engine.begin() as conn:
        for (guild, channel, key), value in old.items():
            conn.execute(
                ScopeSetting.__table__.insert().values(
                    guild_id=guild, channel_id=channel, key=key, value=json.dumps(value), updated_at=utcnow()
                )
            )

    def stored() -> dict[tuple[str, str, str], object]:
        with engine.connect() as conn:
            rows = conn.execute(
                select(ScopeSetting.guild_id, ScopeSetting.channel_id, ScopeSetting.key, ScopeSetting.value)
            )
            return {(g, c, k): json.loads(v) for g, c, k, v in rows}

    upgrade_schema(engine)
    assert stored() == {
        ("g1", "", "privacy.retention_days"): 30,
        ("g1", "", "discord.help_channels"): ["c1", "c2"],
        ("g1", "c1", "translate.auto"): "ZH",
        ("g1", "", "moderate.terms"): ["机密", "secret"],
        ("g1", "", "moderate.channel"): "mods",
        ("g1", "", "moderate.delete"): True,
        ("g1", "c1", "digest.last_run"): "2026-11-30T08:00:00+00:00",
        ("g1", "c1", "finetune.enabled"): True,
    }
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0006_reply_to")
    back = {k: v for k, v in old.items() if v is not None}
    back[("g1", "", "moderation")] = {"terms": ["机密", "secret"], "channel": "mods", "delete": True}
    assert stored() == back
    engine.dispose()


def test_the_moderation_reports_table_comes_and_goes_with_its_migration(db_url: str) -> None:
    """0010 adds moderation_report after 0009 (rows survive a second upgrade), and downgrade drops it."""
    engine = make_db_engine(db_url)
    upgrade_schema(engine, "0009_22_user_settings")
    assert "moderation_report" not in inspect(engine).get_table_names()
    upgrade_schema(engine)
    assert "moderation_report" in inspect(engine).get_table_names()
    with engine.begin() as conn:
        conn.execute(
            ModerationReport.__table__.insert().values(
                transport="discord",
                guild_id="g1",
                channel_id="c1",
                message_id="m1",
                author_id="u1",
                author_name="小明",
                excerpt="机密",
                reasons="term “机密”",
                deleted=False,
                created_at=utcnow(),
            )
        )
    upgrade_schema(engine)
    with engine.connect() as conn:
        assert conn.execute(select(ModerationReport.excerpt)).scalars().all() == ["机密"]
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0009_22_user_settings")
    assert "moderation_report" not in inspect(engine).get_table_names()
    engine.dispose()
