"""Conversation memory: the repository over the SQLModel tables.

SQLModel is synchronous, so each method runs in a thread: a locked SQLite file (busy
timeout) or a slow PostgreSQL never blocks the event loop. The schema is brought to the
newest Alembic revision when the store opens, so an existing database upgrades in place.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Connection, Engine, Table, delete, event, or_, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlmodel import Session, SQLModel, col, create_engine, select

from bot.models import Conversation, Message, ModerationReport, ScopeSetting, UserSetting, utcnow
from bot.textindex import index_text
from bot.types import QuillError, Text

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 5000
MAX_RETENTION_DAYS = 36_500  # a century: anything longer is "keep", and timedelta has limits

P = ParamSpec("P")
R = TypeVar("R")


class StorageError(QuillError):
    """The database cannot be opened or written; the message is fit to show a user."""


def redacted(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def off_loop(fn: Callable[P, R]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Make a blocking database function a coroutine run in a thread, its database faults turned
    into StorageError: how every repository (memory, search, fine-tune runs) keeps the loop free."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except OperationalError as exc:
            raise StorageError(Text("The database is unavailable: {reason}", reason=str(exc.orig))) from exc

    return wrapper


def make_db_engine(url: str) -> Engine:
    """An SQLAlchemy engine; SQLite files get WAL, a busy timeout and foreign keys."""
    if not make_url(url).drivername.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable across a process crash in WAL mode
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def sqlite_folder(url: str) -> Path | None:
    """The folder a SQLite URL's file goes in (to create it), None for anything else: another
    database, memory, or a read-only file. A `file:` URI (`?uri=true`) names its path after
    `file:`; taken as a plain path it would make a folder called `file:` here."""
    parsed = make_url(url)
    database = parsed.database
    if not parsed.drivername.startswith("sqlite") or database in (None, "", ":memory:"):
        return None
    if parsed.query.get("uri") in ("true", "1") or database.startswith("file:"):
        if parsed.query.get("mode") in ("ro", "memory"):
            return None
        database = urlsplit(database).path
        if database in ("", ":memory:"):
            return None
    return Path(database).parent


# Tables in quill's database that belong to libraries, created and migrated by them.
FOREIGN_TABLES = {"apscheduler_jobs"}
# Objects the search migration makes outside the models (FTS5 tables and their shadow tables,
# PostgreSQL expression indexes); see bot/search.py.
FTS_PREFIXES = ("message_fts", "knowledge_chunk_fts", "ix_message_content_fts", "ix_knowledge_chunk_content_fts")


def include_name(name: str | None, type_: str, parent_names: dict[str, Any]) -> bool:
    """Alembic `include_name` hook: schema comparisons (autogenerate, the models-vs-migrations
    test) skip what quill's models do not own: library tables and the search objects."""
    if type_ == "table" and name in FOREIGN_TABLES:
        return False
    return not (name and type_ in ("table", "index") and name.startswith(FTS_PREFIXES))


def alembic_config(connection: Connection) -> Config:
    """Alembic's configuration for quill's migrations, bound to an open connection."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade_schema(engine: Engine, revision: str = "head") -> list[str]:
    """Apply Alembic migrations up to `revision` on `engine`; returns those applied, oldest
    first, as "id: what it does"."""
    with engine.begin() as connection:
        cfg = alembic_config(connection)
        before = MigrationContext.configure(connection).get_current_revision()
        command.upgrade(cfg, revision)
        after = MigrationContext.configure(connection).get_current_revision()
    if after == before:
        return []
    script = ScriptDirectory.from_config(cfg)
    applied = [r for r in script.iterate_revisions(after, before) if r is not None and r.revision != before]
    return [f"{r.revision}: {r.doc}" for r in reversed(applied)]


def write_revision(message: str) -> None:
    """Autogenerate a migration: the models compared with a scratch database at the newest revision."""
    with tempfile.TemporaryDirectory() as scratch:
        engine = make_db_engine(f"sqlite:///{scratch}/scratch.db")
        upgrade_schema(engine)
        with engine.begin() as connection:
            command.revision(alembic_config(connection), message=message, autogenerate=True)
        engine.dispose()


class Memory:
    """Async repository for conversations, messages and per-place settings."""

    def __init__(self, engine: Engine, applied: Sequence[str] = ()) -> None:
        self.engine = engine
        # The migrations `open` applied ("id: what it does"), for `quill db upgrade` to say.
        self.applied = list(applied)

    @classmethod
    def open(cls, url: str) -> Memory:
        """Connect, create the SQLite file's folder and migrate; one clear error if any fails."""
        hint = "Check QUILL_DATABASE_URL (or QUILL_DATA_DIR for the default SQLite file)."
        try:
            if (folder := sqlite_folder(url)) is not None:
                folder.mkdir(parents=True, exist_ok=True)
            engine = make_db_engine(url)
            applied = upgrade_schema(engine)
        except (OSError, SQLAlchemyError) as exc:
            reason = getattr(exc, "orig", None) or exc
            raise StorageError(f"Cannot open the database {redacted(url)}: {reason}. {hint}") from exc
        for revision in applied:
            log.info("database upgraded: %s", revision)
        log.info("database ready: %s", redacted(url))
        return cls(engine, applied)

    def close(self) -> None:
        self.engine.dispose()

    # -- conversations ---------------------------------------------------------------------

    @off_loop
    def conversation(self, transport: str, guild_id: str, channel_id: str) -> Conversation:
        """The conversation of a place, created on first use."""
        query = select(Conversation).where(
            Conversation.transport == transport,
            Conversation.guild_id == guild_id,
            Conversation.channel_id == channel_id,
        )
        with Session(self.engine, expire_on_commit=False) as session:
            if found := session.exec(query).first():
                return found
            conv = Conversation(transport=transport, guild_id=guild_id, channel_id=channel_id)
            session.add(conv)
            try:
                session.commit()
            except IntegrityError:  # another request created it first
                session.rollback()
                return session.exec(query).one()
            return conv

    @off_loop
    def add_message(
        self,
        conversation_id: int,
        *,
        role: str,
        content: str,
        author_id: str,
        author_name: str = "",
        token_count: int = 0,
        external_id: str | None = None,
        reply_to: str | None = None,
    ) -> Message:
        """Store one turn; it is committed (durable) when this returns."""
        msg = Message(
            conversation_id=conversation_id,
            role=role,
            content=content,
            author_id=author_id,
            author_name=author_name,
            token_count=token_count,
            external_id=external_id,
            reply_to=reply_to,
            terms=index_text(content),
        )
        with Session(self.engine, expire_on_commit=False) as session:
            session.add(msg)
            session.commit()
        return msg

    @off_loop
    def history(self, conversation_id: int, token_budget: int, per_message: int = 0) -> list[Message]:
        """The newest messages whose tokens (plus `per_message` each) fit `token_budget`,
        oldest first: the older turns are the ones dropped."""
        kept: list[Message] = []
        used = 0
        query = (
            select(Message)
            .where(Message.conversation_id == conversation_id)
            .order_by(col(Message.created_at).desc(), col(Message.id).desc())
        )
        with Session(self.engine) as session:
            for msg in session.exec(query.execution_options(yield_per=100)):
                cost = msg.token_count + per_message
                if used + cost > token_budget:
                    break
                used += cost
                kept.append(msg)
        kept.reverse()
        return kept

    @off_loop
    def messages_since(
        self, transport: str, guild_id: str, channel_ids: Sequence[str], since: datetime
    ) -> list[tuple[str, Message]]:
        """(channel id, message) for the places' messages after `since`, oldest first (digests)."""
        query = (
            select(Conversation.channel_id, Message)
            .join(Message, col(Message.conversation_id) == col(Conversation.id))
            .where(
                Conversation.transport == transport,
                Conversation.guild_id == guild_id,
                col(Conversation.channel_id).in_(channel_ids),
                col(Message.created_at) > since,
            )
            .order_by(col(Message.created_at), col(Message.id))
        )
        with Session(self.engine, expire_on_commit=False) as session:
            return [(channel, msg) for channel, msg in session.exec(query)]

    @off_loop
    def recent_messages(self, conversation_id: int, limit: int, since: datetime | None = None) -> list[Message]:
        """The newest `limit` messages of a conversation (only those after `since` if given),
        oldest first: what a summary or digest reads."""
        query = select(Message).where(Message.conversation_id == conversation_id)
        if since is not None:
            query = query.where(Message.created_at > since)
        query = query.order_by(col(Message.created_at).desc(), col(Message.id).desc()).limit(limit)
        with Session(self.engine) as session:
            found = list(session.exec(query))
        found.reverse()
        return found

    # -- settings --------------------------------------------------------------------------

    @off_loop
    def get_settings(self, guild_id: str, channel_id: str, namespace: str, user_id: str = "") -> dict[str, Any]:
        """The stored `<namespace>.<field>` settings of one scope (channel_id "": the guild's;
        a user_id: that person's, in guild_id or, with guild_id "", everywhere)."""
        table, ids = _setting_scope(guild_id, channel_id, user_id)
        with Session(self.engine) as session:
            rows = session.exec(
                select(table).where(
                    *(getattr(table, name) == value for name, value in ids.items()),
                    col(table.key).startswith(f"{namespace}."),
                )
            )
            return {row.key: json.loads(row.value) for row in rows}

    @off_loop
    def set_settings(
        self,
        guild_id: str,
        channel_id: str,
        values: dict[str, Any],
        cleared: Sequence[str] = (),
        user_id: str = "",
    ) -> None:
        """Store `values` and delete the `cleared` keys (back to their defaults), in one transaction."""
        table, ids = _setting_scope(guild_id, channel_id, user_id)
        with Session(self.engine) as session:
            for key in cleared:
                if (row := session.get(table, {**ids, "key": key})) is not None:
                    session.delete(row)
            for key, value in values.items():
                row = session.get(table, {**ids, "key": key})
                if row is None:
                    row = table(**ids, key=key, value="")
                row.value = json.dumps(value)
                row.updated_at = utcnow()
                session.add(row)
            session.commit()

    # -- moderation reports ----------------------------------------------------------------

    @off_loop
    def add_report(self, report: ModerationReport) -> ModerationReport:
        """Store one moderation report (plugins/moderate.py); committed when this returns."""
        with Session(self.engine, expire_on_commit=False) as session:
            session.add(report)
            session.commit()
        return report

    @off_loop
    def reports(self, transport: str, guild_id: str, limit: int) -> list[ModerationReport]:
        """A guild's newest reports first."""
        query = (
            select(ModerationReport)
            .where(ModerationReport.transport == transport, ModerationReport.guild_id == guild_id)
            .order_by(col(ModerationReport.created_at).desc(), col(ModerationReport.id).desc())
            .limit(limit)
        )
        with Session(self.engine) as session:
            return list(session.exec(query))

    @off_loop
    def delete_report(self, transport: str, guild_id: str, report_id: int) -> bool:
        """Dismiss one of a guild's reports (never another guild's); whether it was there."""
        query = delete(ModerationReport).where(
            col(ModerationReport.id) == report_id,
            ModerationReport.transport == transport,
            ModerationReport.guild_id == guild_id,
        )
        with self.engine.begin() as conn:
            return bool(conn.execute(query).rowcount)

    # -- data controls ---------------------------------------------------------------------

    @off_loop
    def forget_user(self, user_id: str) -> dict[str, int]:
        """Delete every row that a personal column ties to `user_id` (or blank the column, for
        rows the team keeps), all tables in one transaction (all or nothing); returns the number
        of rows per table."""
        counts: dict[str, int] = {}
        with self.engine.begin() as conn:
            for table, columns in _personal_tables():
                erased = [c for c in columns if c.info["personal"] is True]
                for column in (c for c in columns if c.info["personal"] == "anonymize"):
                    counts[table.name] = conn.execute(
                        update(table).where(column == user_id).values({column.name: ""})
                    ).rowcount + counts.get(table.name, 0)
                if erased:
                    result = conn.execute(delete(table).where(or_(*(c == user_id for c in erased))))
                    counts[table.name] = result.rowcount + counts.get(table.name, 0)
        return {table: n for table, n in counts.items() if n}

    @off_loop
    def export_user(self, user_id: str) -> dict[str, list[dict[str, Any]]]:
        """Every row that a personal column ties to `user_id`, per table, as JSON-ready dicts."""
        export: dict[str, list[dict[str, Any]]] = {}
        with self.engine.connect() as conn:
            for table, columns in _personal_tables():
                rows = conn.execute(select(table).where(or_(*(c == user_id for c in columns))))
                found = [{k: _jsonable(v) for k, v in row._mapping.items()} for row in rows]
                if found:
                    export[table.name] = found
        return export

    @off_loop
    def forget_place(self, transport: str, guild_id: str, channel_id: str) -> int:
        """Delete a place's stored messages (its memory); returns how many."""
        conversation = select(Conversation.id).where(
            Conversation.transport == transport,
            Conversation.guild_id == guild_id,
            Conversation.channel_id == channel_id,
        )
        query = delete(Message).where(col(Message.conversation_id).in_(conversation))
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount

    @off_loop
    def edit_external(self, external_id: str, content: str, token_count: int) -> int:
        """Follow an edit made on the transport (e.g. a Discord message edited); returns rows changed."""
        with self.engine.begin() as conn:
            query = (
                update(Message)
                .where(Message.external_id == external_id)
                .values(content=content, token_count=token_count, terms=index_text(content))
            )
            return conn.execute(query).rowcount

    @off_loop
    def link_external(self, message_id: int, external_id: str) -> None:
        """Record the transport's id for a stored message (the Discord message an answer was
        posted as), so later events about it (a reaction, a deletion) find it."""
        with self.engine.begin() as conn:
            conn.execute(update(Message).where(col(Message.id) == message_id).values(external_id=external_id))

    @off_loop
    def delete_external(self, external_id: str) -> int:
        """Follow a deletion made on the transport; returns rows deleted."""
        with self.engine.begin() as conn:
            return conn.execute(delete(Message).where(Message.external_id == external_id)).rowcount

    @off_loop
    def apply_retention(self, default_days: int, key: str, now: datetime | None = None) -> dict[str, int]:
        """Delete messages (and moderation reports) older than each guild's setting `key`, in days (else `default_days`;
        0 keeps them forever); returns deletions per guild ("" = DMs and the console).

        Each guild in its own transaction: a guild whose setting is unusable (stored before
        /retention was bounded, or edited by hand) is logged and skipped, and the others go on."""
        now = now or utcnow()
        deleted: dict[str, int] = {}
        with self.engine.connect() as conn:
            guilds = conn.execute(select(Conversation.guild_id).distinct()).scalars().all()
        for guild in guilds:
            try:
                if count := self._retain(guild, default_days, key, now):
                    deleted[guild] = count
            except (ValueError, TypeError, OverflowError, SQLAlchemyError) as exc:
                log.error("retention for guild %r skipped: %s", guild, exc)
        return deleted

    def _retain(self, guild: str, default_days: int, key: str, now: datetime) -> int:
        with self.engine.begin() as conn:
            scope = (ScopeSetting.guild_id == guild, ScopeSetting.channel_id == "", ScopeSetting.key == key)
            setting = conn.execute(select(ScopeSetting.value).where(*scope)).scalar()
            stored = json.loads(setting) if setting is not None else None
            days = default_days if stored is None else stored
            if not days:
                return 0
            if not isinstance(days, int) or isinstance(days, bool) or not 0 < days <= MAX_RETENTION_DAYS:
                raise ValueError(f"{key} is {days!r}, not a whole number from 0 to {MAX_RETENTION_DAYS}")
            cutoff = now - timedelta(days=days)
            places = select(Conversation.id).where(Conversation.guild_id == guild)
            query = delete(Message).where(col(Message.conversation_id).in_(places), col(Message.created_at) < cutoff)
            reports = delete(ModerationReport).where(
                ModerationReport.guild_id == guild, col(ModerationReport.created_at) < cutoff
            )
            return conn.execute(query).rowcount + conn.execute(reports).rowcount


def _setting_scope(guild_id: str, channel_id: str, user_id: str) -> tuple[type[Any], dict[str, str]]:
    """The table one scope's settings live in and the key columns that pick the scope."""
    if user_id:
        if channel_id:
            raise ValueError("a person's settings are stored per guild or everywhere, not per channel")
        return UserSetting, {"user_id": user_id, "guild_id": guild_id}
    return ScopeSetting, {"guild_id": guild_id, "channel_id": channel_id}


def _personal_tables() -> list[tuple[Table, list[Column[Any]]]]:
    """Tables with personal columns, children before parents so deletes respect foreign keys."""
    found = []
    for table in reversed(SQLModel.metadata.sorted_tables):
        columns = [c for c in table.columns if c.info.get("personal")]
        if columns:
            found.append((table, columns))
    return found


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value
