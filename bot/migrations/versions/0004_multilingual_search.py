"""multilingual search: stored search terms, passage headings, indexes rebuilt on both databases

The 0002 indexes tokenized `content` with the database's own rules (FTS5 `porter unicode61`,
PostgreSQL `to_tsvector('english', ...)`), which leave Chinese unsegmented. From here on the
search terms are made in Python (bot/textindex.py) and stored in a `terms` column, and both
databases index that column alone. This revision:

- adds `message.terms`, `knowledge_chunk.terms`, `knowledge_chunk.heading`, and
  `knowledge_doc.source` / `sha256` (for `quill kb import`);
- cuts every existing document again into heading-aware passages (its text is the old passages
  joined in order, so nothing is lost) and fills in the terms of every message;
- adds `chunk_vector` and `message_vector` (embeddings, with the embedder that made each; filled
  in the background by bot/search.py when QUILL_EMBEDDINGS is on);
- replaces the old indexes: on SQLite, FTS5 tables over `terms` kept in step by triggers, plus
  `fts5vocab` tables (per-term passage counts, for the IDF); on PostgreSQL, GIN indexes on
  `to_tsvector('simple', terms)`.

Beware, as in 0002: a later migration that rebuilds `message` or `knowledge_chunk` in SQLite
batch mode drops the triggers and must create them again (`_sqlite_fts`).

Revision ID: 0004_multilingual_search
Revises: 0003_finetune
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from bot.search import split_passages
from bot.textindex import index_text

revision: str = "0004_multilingual_search"
down_revision: str | None = "0003_finetune"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXED = ("message", "knowledge_chunk")
BATCH = 500


def _sqlite_fts(table: str, column: str, tokenize: str) -> list[str]:
    """An FTS5 index of `table.column`, the triggers that keep it in step, and its vocabulary."""
    fts = f"{table}_fts"
    delete = f"INSERT INTO {fts}({fts}, rowid, {column}) VALUES ('delete', old.id, old.{column});"
    insert = f"INSERT INTO {fts}(rowid, {column}) VALUES (new.id, new.{column});"
    return [
        f"CREATE VIRTUAL TABLE {fts} USING fts5({column}, content='{table}', content_rowid='id', "
        f"tokenize='{tokenize}')",
        f"CREATE TRIGGER {fts}_insert AFTER INSERT ON {table} BEGIN {insert} END",
        f"CREATE TRIGGER {fts}_delete AFTER DELETE ON {table} BEGIN {delete} END",
        f"CREATE TRIGGER {fts}_update AFTER UPDATE OF {column} ON {table} BEGIN {delete} {insert} END",
        f"INSERT INTO {fts}({fts}) VALUES ('rebuild')",  # index the rows already there
    ]


def _drop_indexes(dialect: str) -> None:
    for table in INDEXED:
        if dialect == "sqlite":
            for action in ("insert", "delete", "update"):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_fts_{action}")
            op.execute(f"DROP TABLE IF EXISTS {table}_fts_vocab")
            op.execute(f"DROP TABLE IF EXISTS {table}_fts")
        elif dialect == "postgresql":
            op.execute(f"DROP INDEX IF EXISTS ix_{table}_content_fts")


def _create_indexes(dialect: str, column: str, sqlite_tokenize: str, pg_config: str) -> None:
    for table in INDEXED:
        if dialect == "sqlite":
            for statement in _sqlite_fts(table, column, sqlite_tokenize):
                op.execute(statement)
            if column == "terms":
                op.execute(f"CREATE VIRTUAL TABLE {table}_fts_vocab USING fts5vocab({table}_fts, row)")
        elif dialect == "postgresql":
            op.execute(
                f"CREATE INDEX ix_{table}_content_fts ON {table} USING gin (to_tsvector('{pg_config}', {column}))"
            )


def _reindex_messages(bind: sa.Connection) -> None:
    last = 0
    while rows := bind.execute(
        sa.text("SELECT id, content FROM message WHERE id > :last ORDER BY id LIMIT :n"), {"last": last, "n": BATCH}
    ).all():
        bind.execute(
            sa.text("UPDATE message SET terms = :terms WHERE id = :id"),
            [{"id": row.id, "terms": index_text(row.content)} for row in rows],
        )
        last = rows[-1].id


def _resplit_documents(bind: sa.Connection) -> None:
    """Each document's text is its passages joined in order; it is cut again with headings."""
    for (doc_id,) in bind.execute(sa.text("SELECT id FROM knowledge_doc ORDER BY id")).all():
        old = bind.execute(
            sa.text("SELECT content FROM knowledge_chunk WHERE doc_id = :d ORDER BY position, id"), {"d": doc_id}
        ).scalars()
        body = "\n\n".join(old)
        bind.execute(sa.text("DELETE FROM knowledge_chunk WHERE doc_id = :d"), {"d": doc_id})
        rows = [
            {"d": doc_id, "p": i, "c": p.text, "h": p.heading[:200], "t": index_text(p.text)}
            for i, p in enumerate(split_passages(body))
        ]
        if rows:
            bind.execute(
                sa.text(
                    "INSERT INTO knowledge_chunk (doc_id, position, content, heading, terms) "
                    "VALUES (:d, :p, :c, :h, :t)"
                ),
                rows,
            )


def upgrade() -> None:
    bind = op.get_bind()
    dialect = bind.dialect.name
    _drop_indexes(dialect)
    op.add_column("message", sa.Column("terms", sa.Text(), server_default="", nullable=False))
    op.add_column("knowledge_chunk", sa.Column("terms", sa.Text(), server_default="", nullable=False))
    op.add_column("knowledge_chunk", sa.Column("heading", sa.String(length=200), server_default="", nullable=False))
    op.add_column("knowledge_doc", sa.Column("source", sa.String(length=500), server_default="", nullable=False))
    op.add_column("knowledge_doc", sa.Column("sha256", sa.String(length=64), server_default="", nullable=False))
    for table, key, parent in (
        ("chunk_vector", "chunk_id", "knowledge_chunk"),
        ("message_vector", "message_id", "message"),
    ):
        op.create_table(
            table,
            sa.Column(key, sa.Integer(), nullable=False),
            sa.Column("model", sa.String(length=100), nullable=False),
            sa.Column("vector", sa.LargeBinary(), nullable=False),
            sa.ForeignKeyConstraint([key], [f"{parent}.id"], ondelete="CASCADE"),
            sa.PrimaryKeyConstraint(key),
        )
        op.create_index(f"ix_{table}_model", table, ["model"])
    _reindex_messages(bind)
    _resplit_documents(bind)
    # Terms are already case-folded and segmented: the index splits on spaces and nothing else.
    _create_indexes(dialect, "terms", "unicode61 remove_diacritics 0", "simple")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    _drop_indexes(dialect)
    op.drop_table("message_vector")
    op.drop_table("chunk_vector")
    op.drop_column("knowledge_doc", "sha256")
    op.drop_column("knowledge_doc", "source")
    op.drop_column("knowledge_chunk", "heading")
    op.drop_column("knowledge_chunk", "terms")
    op.drop_column("message", "terms")
    _create_indexes(dialect, "content", "porter unicode61", "english")
