"""knowledge base and full-text search

Tables for the Q&A plugin's documents, and the full-text search over them and over messages
(bot/search.py): on SQLite, FTS5 tables with external content kept in step by triggers; on
PostgreSQL, GIN indexes on to_tsvector('english', content).

Beware: a later migration that rebuilds `message` or `knowledge_chunk` in SQLite batch mode
(copy and rename) drops the triggers; it must create them again (`_sqlite_fts` below).

Revision ID: 0002_knowledge
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_knowledge"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXED = ("message", "knowledge_chunk")  # tables whose `content` column is searched


def _sqlite_fts(table: str) -> list[str]:
    """An FTS5 index of `table.content` and the triggers that keep it in step."""
    fts = f"{table}_fts"
    delete = f"INSERT INTO {fts}({fts}, rowid, content) VALUES ('delete', old.id, old.content);"
    insert = f"INSERT INTO {fts}(rowid, content) VALUES (new.id, new.content);"
    return [
        f"CREATE VIRTUAL TABLE {fts} USING fts5(content, content='{table}', content_rowid='id', "
        "tokenize='porter unicode61')",
        f"CREATE TRIGGER {fts}_insert AFTER INSERT ON {table} BEGIN {insert} END",
        f"CREATE TRIGGER {fts}_delete AFTER DELETE ON {table} BEGIN {delete} END",
        f"CREATE TRIGGER {fts}_update AFTER UPDATE OF content ON {table} BEGIN {delete} {insert} END",
        f"INSERT INTO {fts}({fts}) VALUES ('rebuild')",  # index the rows already there
    ]


def upgrade() -> None:
    op.create_table(
        "knowledge_doc",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("transport", sa.String(length=32), nullable=False),
        sa.Column("guild_id", sa.String(length=32), nullable=False),
        sa.Column("channel_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("added_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("transport", "guild_id", "channel_id", "name", name="uq_knowledge_doc_scope_name"),
    )
    op.create_table(
        "knowledge_chunk",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("doc_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["doc_id"], ["knowledge_doc.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("knowledge_chunk", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_knowledge_chunk_doc_id"), ["doc_id"], unique=False)

    dialect = op.get_bind().dialect.name
    for table in INDEXED:
        if dialect == "sqlite":
            for statement in _sqlite_fts(table):
                op.execute(statement)
        elif dialect == "postgresql":
            op.execute(f"CREATE INDEX ix_{table}_content_fts ON {table} USING gin (to_tsvector('english', content))")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table in INDEXED:
        if dialect == "sqlite":
            for action in ("insert", "delete", "update"):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_fts_{action}")
            op.execute(f"DROP TABLE IF EXISTS {table}_fts")
        elif dialect == "postgresql":
            op.execute(f"DROP INDEX IF EXISTS ix_{table}_content_fts")
    with op.batch_alter_table("knowledge_chunk", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_knowledge_chunk_doc_id"))
    op.drop_table("knowledge_chunk")
    op.drop_table("knowledge_doc")
