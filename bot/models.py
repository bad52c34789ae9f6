"""Database tables. Every change here ships with an Alembic revision in `bot/migrations/versions/`."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Column, DateTime, Index, LargeBinary, Text, TypeDecorator, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend: SQLite drops the zone, so it is put back on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


# Marks a column that holds a person's id: `Memory.forget_user` and `export_user` find every such
# column by walking the metadata, so a new table with one is covered without further code.
PERSONAL = {"personal": True}
# The same for a row that belongs to the team (a knowledge-base document): forgetting the person
# blanks the column and keeps the row.
PERSONAL_ANONYMIZE = {"personal": "anonymize"}


def _timestamp(*, index: bool = False) -> datetime:
    return Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False, index=index))


class Conversation(SQLModel, table=True):
    """One place the bot talks in: a channel, a thread or a DM of one transport.

    `guild_id` is "" for DMs and the console, so the unique key never contains NULL.
    """

    __tablename__ = "conversation"
    __table_args__ = (UniqueConstraint("transport", "guild_id", "channel_id", name="uq_conversation_place"),)

    id: int | None = Field(default=None, primary_key=True)
    transport: str = Field(max_length=32)
    guild_id: str = Field(default="", max_length=32)
    channel_id: str = Field(max_length=64)
    created_at: datetime = _timestamp()


class Message(SQLModel, table=True):
    """A turn of a conversation, kept with its token count so history is trimmed without
    re-tokenizing it."""

    __tablename__ = "message"
    # A conversation's newest messages in order, without sorting all of them (history, summaries).
    __table_args__ = (Index("ix_message_conversation_created", "conversation_id", "created_at", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    conversation_id: int = Field(foreign_key="conversation.id", index=True)
    external_id: str | None = Field(default=None, max_length=64, index=True)
    # The transport's id of the message this one replies to (a Discord reply): the digest reads
    # reply chains from it.
    reply_to: str | None = Field(default=None, max_length=64)
    author_id: str = Field(max_length=64, index=True, sa_column_kwargs={"info": PERSONAL})
    author_name: str = Field(default="", max_length=100)
    role: str = Field(max_length=16)
    content: str = Field(sa_column=Column(Text, nullable=False))
    token_count: int = 0
    created_at: datetime = _timestamp(index=True)
    # The content's search terms (bot/textindex.py), which the full-text index reads.
    terms: str = Field(default="", sa_column=Column(Text, nullable=False, server_default=""))


class ScopeSetting(SQLModel, table=True):
    """A per-guild (channel_id "") or per-channel setting, stored as JSON text."""

    __tablename__ = "scope_setting"

    guild_id: str = Field(default="", max_length=32, primary_key=True)
    channel_id: str = Field(default="", max_length=64, primary_key=True)
    key: str = Field(max_length=64, primary_key=True)
    value: str = Field(sa_column=Column(Text, nullable=False))
    updated_at: datetime = _timestamp()


class UserSetting(SQLModel, table=True):
    """A person's own setting, stored as JSON text: everywhere (guild_id "", Red-DiscordBot's
    user scope) or in one guild (its member scope). A table apart from `scope_setting` because
    its rows are personal data: erased and exported with the rest of a person's."""

    __tablename__ = "user_setting"

    user_id: str = Field(max_length=64, primary_key=True, sa_column_kwargs={"info": PERSONAL})
    guild_id: str = Field(default="", max_length=32, primary_key=True)
    key: str = Field(max_length=64, primary_key=True)
    value: str = Field(sa_column=Column(Text, nullable=False))
    updated_at: datetime = _timestamp()


# --- Fine-tuning (bot/builtin/finetune.py) ---------------------------------------------------------


class Approval(SQLModel, table=True):
    """A bot answer someone approved (`/good`, a 👍): only approved exchanges are trained on."""

    __tablename__ = "approval"

    # Deleting the answer (forget, retention, a deletion on the transport) drops its approval.
    message_id: int = Field(foreign_key="message.id", primary_key=True, ondelete="CASCADE")
    approved_by: str = Field(max_length=64, sa_column_kwargs={"info": PERSONAL})
    created_at: datetime = _timestamp()


class FinetuneRun(SQLModel, table=True):
    """One training run: the dataset it learned from, its eval-gate figures and its fate.

    status: training, failed, rejected (the gate said no; its adapter is kept for inspection),
    deployed (served now), retired (replaced by a newer one; the rollback target), rolled_back.
    `figures` (JSON) keeps every figure of the run: train loss per step, held-out and general
    NLL base against adapter, group counts, and the gate's decision with its reason."""

    __tablename__ = "finetune_run"

    id: int | None = Field(default=None, primary_key=True)
    status: str = Field(max_length=16, index=True)
    base_model: str = Field(max_length=500)
    dataset_path: str = Field(max_length=500)
    dataset_sha256: str = Field(max_length=64)
    n_train: int = 0
    n_heldout: int = 0
    adapter_path: str = Field(default="", max_length=500)
    nll_before: float | None = None
    nll_after: float | None = None
    note: str = Field(default="", sa_column=Column(Text, nullable=False))
    figures: str = Field(default="{}", sa_column=Column(Text, nullable=False, server_default="{}"))
    created_at: datetime = _timestamp()


# -- Knowledge base (Q&A plugin; searched by bot/search.py) ----------------------------------


class KnowledgeDoc(SQLModel, table=True):
    """A document a team added to its knowledge base (`/kb add`), scoped like a conversation:
    a guild's documents serve all its channels (channel_id ""), elsewhere only their channel."""

    __tablename__ = "knowledge_doc"
    __table_args__ = (
        UniqueConstraint("transport", "guild_id", "channel_id", "name", name="uq_knowledge_doc_scope_name"),
    )

    id: int | None = Field(default=None, primary_key=True)
    transport: str = Field(max_length=32)
    guild_id: str = Field(default="", max_length=32)
    channel_id: str = Field(default="", max_length=64)
    name: str = Field(max_length=100)
    added_by: str = Field(default="", max_length=64, sa_column_kwargs={"info": PERSONAL_ANONYMIZE})
    created_at: datetime = _timestamp()
    # Where `quill kb import` read it (the file's absolute path; "" when added by a message), and
    # the sha256 of its text: an unchanged file is skipped, a vanished one pruned.
    source: str = Field(default="", max_length=500, sa_column_kwargs={"server_default": ""})
    sha256: str = Field(default="", max_length=64, sa_column_kwargs={"server_default": ""})


class KnowledgeChunk(SQLModel, table=True):
    """A passage of a document: the unit that search finds and Q&A cites (with its heading)."""

    __tablename__ = "knowledge_chunk"

    id: int | None = Field(default=None, primary_key=True)
    doc_id: int = Field(foreign_key="knowledge_doc.id", index=True, ondelete="CASCADE")
    position: int = 0
    content: str = Field(sa_column=Column(Text, nullable=False))
    # The nearest Markdown heading at or above the passage's start ("" before any heading).
    heading: str = Field(default="", max_length=200, sa_column_kwargs={"server_default": ""})
    # The content's search terms (bot/textindex.py), which the full-text index reads.
    terms: str = Field(default="", sa_column=Column(Text, nullable=False, server_default=""))


class ChunkVector(SQLModel, table=True):
    """A passage's embedding (float32, unit length) and the embedder that made it."""

    __tablename__ = "chunk_vector"

    chunk_id: int = Field(foreign_key="knowledge_chunk.id", primary_key=True, ondelete="CASCADE")
    model: str = Field(max_length=100, index=True)
    vector: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class MessageVector(SQLModel, table=True):
    """A message's embedding; erased with the message (forget, retention, a deletion)."""

    __tablename__ = "message_vector"

    message_id: int = Field(foreign_key="message.id", primary_key=True, ondelete="CASCADE")
    model: str = Field(max_length=100, index=True)
    vector: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


# --- Moderation (plugins/moderate.py) ----------------------------------------------------------


class ModerationReport(SQLModel, table=True):
    """A flagged message as reported to the mod channel, kept for the panel's Moderation page.
    Personal data (author_id): /forget erases it, /export lists it, retention drops old ones."""

    __tablename__ = "moderation_report"
    __table_args__ = (Index("ix_moderation_report_place", "transport", "guild_id", "created_at"),)

    id: int | None = Field(default=None, primary_key=True)
    transport: str = Field(max_length=32)
    guild_id: str = Field(default="", max_length=32)
    channel_id: str = Field(max_length=64)
    message_id: str = Field(default="", max_length=64)
    author_id: str = Field(max_length=64, sa_column_kwargs={"info": PERSONAL})
    author_name: str = Field(default="", max_length=128)
    excerpt: str = Field(sa_column=Column(Text, nullable=False))
    reasons: str = Field(sa_column=Column(Text, nullable=False))
    deleted: bool = False
    created_at: datetime = _timestamp()
