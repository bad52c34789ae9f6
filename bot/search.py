"""Full-text search over the knowledge base and past messages: SQLite FTS5 or PostgreSQL tsvector.

The local engine has no embeddings yet, so retrieval is lexical, done by the database itself:
FTS5 tables kept in step by triggers on SQLite, GIN expression indexes on PostgreSQL (both made
by the "0002_knowledge" migration). A question becomes an OR of its content words, ranked by
BM25 (SQLite) or ts_rank_cd (PostgreSQL); no match means nothing relevant is stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, text
from sqlmodel import Session, col, select

from bot.memory import _off_loop
from bot.models import KnowledgeChunk, KnowledgeDoc, UTCDateTime

PASSAGE_CHARS = 1000
MAX_QUERY_TERMS = 16

# Words too common to tell documents apart (PostgreSQL's "english" configuration drops these too).
_STOPWORDS = frozenset(
    """a about above after again all am an and any are as at be been before being below between both
    but by can could did do does doing down during each few for from further had has have having he her
    here hers him his how i if in into is it its itself just me more most my no nor not now of off on
    once only or other our ours out over own same she should so some such than that the their theirs
    them then there these they this those through to too under until up very was we were what when
    where which while who whom why will with would you your yours please tell know""".split()  # noqa: SIM905
)


def query_terms(question: str) -> list[str]:
    """The distinct content words of a question, lower-cased, in order."""
    words = re.findall(r"\w+", question.casefold())
    terms = [w for w in dict.fromkeys(words) if len(w) > 1 and w not in _STOPWORDS]
    return terms[:MAX_QUERY_TERMS]


def split_passages(body: str, max_chars: int = PASSAGE_CHARS) -> list[str]:
    """Cut a document into passages of at most `max_chars`, at paragraph, then line, then word
    boundaries, so each search hit is a readable piece of the document."""
    passages: list[str] = []
    current = ""
    pieces = [p.strip() for p in re.split(r"\n\s*\n", body) if p.strip()]
    for piece in pieces:
        while len(piece) > max_chars:
            cut = piece.rfind("\n", 0, max_chars)
            if cut <= 0:
                cut = piece.rfind(" ", 0, max_chars)
            if cut <= 0:
                cut = max_chars
            if current:
                passages.append(current)
                current = ""
            passages.append(piece[:cut].strip())
            piece = piece[cut:].strip()
        if current and len(current) + 2 + len(piece) > max_chars:
            passages.append(current)
            current = ""
        current = f"{current}\n\n{piece}" if current else piece
    if current:
        passages.append(current)
    return passages


@dataclass(frozen=True)
class Hit:
    """One search result: a passage of a document, or a past message."""

    kind: str  # "doc" or "message"
    text: str
    score: float
    name: str = ""  # document name
    message_id: str = ""  # the transport's id when known, else "#<row id>"
    author: str = ""
    channel_id: str = ""
    created_at: datetime | None = None


class Search:
    """The knowledge base (documents and their passages) and full-text search over it and
    the stored messages of a place."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"

    # -- documents -------------------------------------------------------------------------

    @_off_loop
    def add_document(
        self, transport: str, guild_id: str, channel_id: str, name: str, body: str, added_by: str = ""
    ) -> int:
        """Store (or replace, by name) a document cut into passages; returns the passage count."""
        passages = split_passages(body)
        scope = _doc_scope(guild_id, channel_id)
        with Session(self.engine) as session:
            doc = session.exec(_doc_query(transport, guild_id, scope, name)).first()
            if doc is not None:
                _delete_chunks(session, doc)
                doc.added_by = added_by
            else:
                doc = KnowledgeDoc(
                    transport=transport, guild_id=guild_id, channel_id=scope, name=name, added_by=added_by
                )
            session.add(doc)
            session.flush()
            assert doc.id is not None
            session.add_all(KnowledgeChunk(doc_id=doc.id, position=i, content=p) for i, p in enumerate(passages))
            session.commit()
        return len(passages)

    @_off_loop
    def list_documents(self, transport: str, guild_id: str, channel_id: str) -> list[tuple[str, int]]:
        """(name, passage count) of the documents a place can search, by name."""
        query = text(
            "SELECT d.name, COUNT(c.id) FROM knowledge_doc d "
            "LEFT JOIN knowledge_chunk c ON c.doc_id = d.id "
            "WHERE d.transport = :t AND d.guild_id = :g AND d.channel_id = :s "
            "GROUP BY d.id, d.name ORDER BY d.name"
        )
        scope = {"t": transport, "g": guild_id, "s": _doc_scope(guild_id, channel_id)}
        with self.engine.connect() as conn:
            return [(name, count) for name, count in conn.execute(query, scope)]

    @_off_loop
    def remove_document(self, transport: str, guild_id: str, channel_id: str, name: str) -> bool:
        """Delete a document and its passages; False when there is none by that name."""
        with Session(self.engine) as session:
            doc = session.exec(_doc_query(transport, guild_id, _doc_scope(guild_id, channel_id), name)).first()
            if doc is None:
                return False
            _delete_chunks(session, doc)
            session.delete(doc)
            session.commit()
        return True

    # -- search ----------------------------------------------------------------------------

    @_off_loop
    def search(self, question: str, transport: str, guild_id: str, channel_id: str, limit: int) -> list[Hit]:
        """The best passages and past user messages for `question`, at most `limit` in all.
        A guild's messages are searched in all its channels; a DM's or the
        console's only in that channel, so private conversations never leak."""
        terms = query_terms(question)
        if not terms:
            return []
        values = {
            "t": transport,
            "g": guild_id,
            "c": channel_id,
            "s": _doc_scope(guild_id, channel_id),
            "n": limit,
        }
        if self.postgres:
            values["q"] = " or ".join(terms)
            docs_sql, messages_sql = _PG_DOCS, _PG_MESSAGES
        else:
            values["q"] = " OR ".join(f'"{t}"' for t in terms)
            docs_sql, messages_sql = _SQLITE_DOCS, _SQLITE_MESSAGES
        with self.engine.connect() as conn:
            docs = [
                Hit("doc", row.content, float(row.score), name=row.name) for row in conn.execute(text(docs_sql), values)
            ]
            messages = [
                Hit(
                    "message",
                    row.content,
                    float(row.score),
                    message_id=row.external_id or f"#{row.id}",
                    author=row.author_name or row.author_id,
                    channel_id=row.channel_id,
                    created_at=row.created_at,
                )
                for row in conn.execute(text(messages_sql).columns(created_at=UTCDateTime()), values)
            ]
        return _interleave(docs, messages)[:limit]


def _interleave(docs: list[Hit], messages: list[Hit]) -> list[Hit]:
    """Best document, best message, second document, ...: the two rankings are not comparable,
    and neither kind should crowd the other out."""
    merged: list[Hit] = []
    for i in range(max(len(docs), len(messages))):
        merged += docs[i : i + 1] + messages[i : i + 1]
    return merged


def _doc_scope(guild_id: str, channel_id: str) -> str:
    """A guild's documents belong to the whole guild; outside guilds, to the channel."""
    return "" if guild_id else channel_id


def _doc_query(transport: str, guild_id: str, scope: str, name: str) -> Any:
    return select(KnowledgeDoc).where(
        KnowledgeDoc.transport == transport,
        KnowledgeDoc.guild_id == guild_id,
        KnowledgeDoc.channel_id == scope,
        col(KnowledgeDoc.name) == name,
    )


def _delete_chunks(session: Session, doc: KnowledgeDoc) -> None:
    """Delete passages explicitly rather than by ON DELETE CASCADE, so SQLite's FTS triggers fire
    whatever the foreign-key pragma of the connection."""
    session.connection().execute(text("DELETE FROM knowledge_chunk WHERE doc_id = :d"), {"d": doc.id})


_MESSAGE_SCOPE = (
    "JOIN conversation v ON v.id = m.conversation_id "
    "WHERE v.transport = :t AND v.guild_id = :g AND (:g != '' OR v.channel_id = :c) AND m.role = 'user'"
)
_MESSAGE_COLUMNS = "m.id, m.external_id, m.author_id, m.author_name, m.content, m.created_at, v.channel_id"
_DOC_SCOPE = "d.transport = :t AND d.guild_id = :g AND d.channel_id = :s"

_SQLITE_DOCS = f"""
SELECT c.content, d.name, bm25(knowledge_chunk_fts) AS score
FROM knowledge_chunk_fts JOIN knowledge_chunk c ON c.id = knowledge_chunk_fts.rowid
JOIN knowledge_doc d ON d.id = c.doc_id
WHERE knowledge_chunk_fts MATCH :q AND {_DOC_SCOPE}
ORDER BY score LIMIT :n
"""
_SQLITE_MESSAGES = f"""
SELECT {_MESSAGE_COLUMNS}, bm25(message_fts) AS score
FROM message_fts JOIN message m ON m.id = message_fts.rowid {_MESSAGE_SCOPE}
AND message_fts MATCH :q
ORDER BY score LIMIT :n
"""
# The tsvector expressions must read exactly like the migration's GIN indexes to use them.
_PG_DOCS = f"""
SELECT c.content, d.name, ts_rank_cd(to_tsvector('english', c.content), q) AS score
FROM knowledge_chunk c JOIN knowledge_doc d ON d.id = c.doc_id,
     websearch_to_tsquery('english', :q) q
WHERE to_tsvector('english', c.content) @@ q AND {_DOC_SCOPE}
ORDER BY score DESC LIMIT :n
"""
_PG_MESSAGES = f"""
SELECT {_MESSAGE_COLUMNS}, ts_rank_cd(to_tsvector('english', m.content), q) AS score
FROM websearch_to_tsquery('english', :q) q, message m {_MESSAGE_SCOPE}
AND to_tsvector('english', m.content) @@ q
ORDER BY score DESC LIMIT :n
"""
