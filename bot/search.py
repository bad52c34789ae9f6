"""Search over the knowledge base and past messages, the same on SQLite and PostgreSQL.

Text is turned into search terms in Python (`bot.textindex`: Chinese segmented, mixed runs split,
stop words per language) and stored beside it; the database indexes only those terms (FTS5 on
SQLite, a 'simple' tsvector GIN index on PostgreSQL, both made by migration 0004) and returns
candidates. The final ranking and the relevance of each hit are computed here, from the same
figures on both databases: BM25 for the order, and for relevance the share of the question's
weight (each term weighed by its IDF) that the passage contains. With an embedder (bot/embedder.py)
the nearest vectors join the candidates and a hit's relevance is its weighted semantic one, or
the mean of that and its lexical one where larger (`fuse`). A question whose best hit is under
the floor (QUILL_QA_MIN_RELEVANCE, chosen with `bench/retrieval.py`) finds nothing, so one generic
shared word is not a match.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from sqlalchemy import Connection, Engine, bindparam, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from bot.engine import EngineError
from bot.memory import StorageError, off_loop
from bot.models import KnowledgeChunk, KnowledgeDoc, UTCDateTime, utcnow
from bot.textindex import index_text, language, query_terms, terms

if TYPE_CHECKING:
    from bot.embedder import E5Embedder, Embedder, ServerEmbedder

log = logging.getLogger(__name__)

Retrieval = Literal["lexical", "semantic", "hybrid"]
SEMANTIC_CANDIDATES = 20  # nearest vectors per kind added to the lexical candidates
EMBED_BATCH = 32  # rows embedded per transaction by the background indexer
EMBED_POLL_SECONDS = 5.0

PASSAGE_CHARS = 1000
CANDIDATES = 100  # passages the database proposes per kind before the ranking here
QUOTE_CHARS = 160
BM25_K1, BM25_B = 1.2, 0.75
# Passages counted in every IDF besides the stored ones, none holding the term: with a handful
# stored (a new guild's few messages), a word found in all of them would weigh nothing and a
# fitting question would fall under the relevance floor.
PRIOR_PASSAGES = 50

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_SENTENCE = re.compile(r"[^.!?。！？\n]+[.!?。！？]*")


@dataclass(frozen=True)
class Passage:
    """A piece of a document, with the nearest Markdown heading at or above its start."""

    text: str
    heading: str = ""


def _blocks(body: str) -> list[tuple[str, str]]:
    """(heading in force, block) for each paragraph; a heading line is glued to the text under
    it, so no passage ends on a heading cut off from its section."""
    blocks: list[tuple[str, str]] = []
    heading, pending = "", ""
    for para in (p.strip() for p in re.split(r"\n\s*\n", body)):
        if not para:
            continue
        lines = para.split("\n")
        for line in lines:  # the last heading of the paragraph is the one in force after it
            if match := _HEADING.match(line.strip()):
                heading = match.group(2).strip()
        if _HEADING.match(lines[-1].strip()):
            pending = f"{pending}\n\n{para}" if pending else para
            continue
        blocks.append((heading, f"{pending}\n\n{para}" if pending else para))
        pending = ""
    if pending:
        blocks.append((heading, pending))
    return blocks


def _cut(piece: str, max_chars: int) -> Iterable[str]:
    """A block longer than `max_chars`, cut at line, then word boundaries, never right after
    the headings it starts with."""
    lines = piece.split("\n")
    first_text = next((i for i, line in enumerate(lines) if line and not _HEADING.match(line)), 0)
    keep = len("\n".join(lines[:first_text]))
    while len(piece) > max_chars:
        cut = piece.rfind("\n", keep + 1, max_chars)
        if cut <= 0:
            cut = piece.rfind(" ", keep + 1, max_chars)
        if cut <= 0:
            cut = max_chars
        keep = 0
        yield piece[:cut].strip()
        piece = piece[cut:].strip()
    if piece:
        yield piece


def split_passages(body: str, max_chars: int = PASSAGE_CHARS) -> list[Passage]:
    """Cut a document into passages of at most `max_chars`: whole paragraphs packed together
    within one section (a new heading starts a new passage), long ones cut at line, then word
    boundaries, so each search hit is a readable, citable piece of the document."""
    passages: list[Passage] = []
    current, current_heading = "", ""
    for heading, block in _blocks(body):
        starts_section = _HEADING.match(block.split("\n", 1)[0].strip()) is not None
        for piece in _cut(block, max_chars):
            if current and (starts_section or len(current) + 2 + len(piece) > max_chars):
                passages.append(Passage(current, current_heading))
                current = ""
            if not current:
                current_heading = heading
            current = f"{current}\n\n{piece}" if current else piece
            starts_section = False
    if current:
        passages.append(Passage(current, current_heading))
    return passages


@dataclass(frozen=True)
class Hit:
    """One search result: a passage of a document, or a past message."""

    kind: str  # "doc" or "message"
    text: str
    score: float  # relevance, 0..1: the IDF-weighted share of the question found in the text
    name: str = ""  # document name
    heading: str = ""  # the nearest Markdown heading above the passage
    quote: str = ""  # the sentence of the text that matches the question best, shortened
    message_id: str = ""  # the transport's id when known, else "#<row id>"
    author: str = ""
    channel_id: str = ""
    created_at: datetime | None = None
    doc_id: int = 0  # a passage's document and place in it: its neighbours (`Search.neighbours`)
    position: int = 0
    # The two sides `score` was fused from (the panel's search tester shows them): the lexical
    # relevance, and the weighted semantic one where the question was embedded (else None).
    lexical: float = 0.0
    semantic: float | None = None


@dataclass(frozen=True)
class _Scored:
    row: Any
    rank: float
    relevance: float
    lexical: float = 0.0
    semantic: float | None = None


def _idf(df: int, n: int) -> float:
    return math.log(1 + (n - df + 0.5) / (df + 0.5))


def _score(q_terms: Sequence[str], rows: Sequence[Any], df: dict[str, int], n: int) -> list[_Scored]:
    """BM25 of each candidate (its order), and its relevance: the summed IDF of the question's
    terms it contains over that of all of them. A term stored nowhere weighs the most, so
    "lunch break" against a corpus that only knows "long" stays far below the floor."""
    idf = {t: _idf(df.get(t, 0), n + PRIOR_PASSAGES) for t in q_terms}
    total = sum(idf.values()) or 1.0
    bags = [Counter(row.terms.split()) for row in rows]
    avgdl = (sum(sum(b.values()) for b in bags) / len(bags)) if bags else 1.0
    scored = []
    for row, bag in zip(rows, bags, strict=True):
        dl = sum(bag.values())
        rank = sum(
            idf[t] * bag[t] * (BM25_K1 + 1) / (bag[t] + BM25_K1 * (1 - BM25_B + BM25_B * dl / avgdl))
            for t in q_terms
            if t in bag
        )
        relevance = sum(idf[t] for t in q_terms if t in bag) / total
        scored.append(_Scored(row, rank, relevance, lexical=relevance))
    scored.sort(key=lambda s: (-s.rank, s.row.id))
    return scored


def best_quote(passage: str, q_terms: Sequence[str]) -> str:
    """The sentence of `passage` (headings aside) holding most of the question's terms, at most
    QUOTE_CHARS."""
    wanted = set(q_terms)
    body = "\n".join(line for line in passage.split("\n") if not _HEADING.match(line.strip()))  # cited apart
    sentences = [s.strip(" \t") for s in _SENTENCE.findall(body) if s.strip(" \t")]
    if not sentences:
        return ""
    best = max(sentences, key=lambda s: len(wanted & set(terms(s))))
    return best if len(best) <= QUOTE_CHARS else best[: QUOTE_CHARS - 1].rstrip() + "…"


@dataclass(frozen=True)
class Semantic:
    """An embedder and how its scores join the lexical ones (QUILL_EMBEDDING_* settings)."""

    embedder: Embedder | E5Embedder | ServerEmbedder
    weights: Mapping[str, float]  # per question language
    min_similarity: Mapping[str, float]  # per question language: the cosine that counts as `floor`
    floor: float  # QUILL_QA_MIN_RELEVANCE

    @classmethod
    def of(
        cls,
        embedder: Embedder | E5Embedder | ServerEmbedder,
        floor: float,
        weights: Mapping[str, float] | None = None,
        min_similarity: float | Mapping[str, float] | None = None,
    ) -> Semantic:
        """The fusion for `embedder`, with its own calibration where a setting is empty; one
        similarity for all languages, or one per language (the embedder's for those not named)."""
        if min_similarity is None or isinstance(min_similarity, Mapping):
            similarities = {**embedder.min_similarity, **(min_similarity or {})}
        else:
            similarities = dict.fromkeys(embedder.min_similarity, min_similarity)
        return cls(embedder, embedder.weights if weights is None else weights, similarities, floor)

    def relevance(self, cosine: float, lang: str) -> float:
        """A cosine as relevance (0..1) for a question in `lang`, times that language's weight:
        the line through (min_similarity, floor) and (1, 1), so a cosine of `min_similarity`
        counts as much as the floor does lexically and the rest keeps the spread of the
        embedder's scale (E5's unrelated texts score ~0.75, MiniLM's ~0.1)."""
        least = self.min_similarity[lang]
        slope = (1.0 - self.floor) / (1.0 - least)
        return self.weights.get(lang, 0.0) * min(1.0, max(0.0, self.floor + (cosine - least) * slope))


class Search:
    """The knowledge base (documents and their passages) and search over it and the stored
    messages of a place; semantic too where an embedder is given."""

    def __init__(self, engine: Engine, semantic: Semantic | None = None) -> None:
        self.engine = engine
        self.semantic = semantic
        self.postgres = engine.dialect.name == "postgresql"
        # (table, embedder, place) -> (rows stamp, ids, vectors): see `_nearest`
        self._matrices: dict[tuple[str, ...], tuple[tuple[Any, ...], np.ndarray, np.ndarray]] = {}

    # -- documents -------------------------------------------------------------------------

    @off_loop
    def add_document(
        self,
        transport: str,
        guild_id: str,
        channel_id: str,
        name: str,
        body: str,
        added_by: str = "",
        source: str = "",
    ) -> int:
        """Store (or replace, by name) a document cut into passages; returns the passage count.
        `source` is the file it was imported from (`quill kb import`)."""
        passages = split_passages(body)
        scope = _doc_scope(guild_id, channel_id)
        with Session(self.engine) as session:
            doc = session.exec(_doc_query(transport, guild_id, scope, name)).first()
            if doc is not None:
                _delete_chunks(session, doc)
                doc.added_by = added_by
                doc.created_at = utcnow()  # a replaced document counts as new (digests)
            else:
                doc = KnowledgeDoc(
                    transport=transport, guild_id=guild_id, channel_id=scope, name=name, added_by=added_by
                )
            doc.source, doc.sha256 = source, content_hash(body)
            session.add(doc)
            session.flush()
            assert doc.id is not None
            session.add_all(chunk_rows(doc.id, passages))
            session.commit()
        return len(passages)

    @off_loop
    def list_documents(self, transport: str, guild_id: str, channel_id: str) -> list[tuple[str, int]]:
        """(name, passage count) of the documents a place can search, by name."""
        return [(name, count) for name, count, _ in self._documents(transport, guild_id, channel_id)]

    @off_loop
    def documents_since(
        self, transport: str, guild_id: str, channel_id: str, since: datetime
    ) -> list[tuple[str, int, datetime]]:
        """(name, passage count, added at) of the place's documents added or replaced after `since`."""
        return [d for d in self._documents(transport, guild_id, channel_id) if d[2] > since]

    @off_loop
    def imported(self, transport: str, guild_id: str, channel_id: str) -> dict[str, tuple[str, str]]:
        """{name: (source file, sha256)} of the place's documents that came from files."""
        query = select(KnowledgeDoc.name, KnowledgeDoc.source, KnowledgeDoc.sha256).where(
            KnowledgeDoc.transport == transport,
            KnowledgeDoc.guild_id == guild_id,
            KnowledgeDoc.channel_id == _doc_scope(guild_id, channel_id),
            KnowledgeDoc.source != "",
        )
        with Session(self.engine) as session:
            return {name: (source, sha) for name, source, sha in session.exec(query)}

    def _documents(self, transport: str, guild_id: str, channel_id: str) -> list[tuple[str, int, datetime]]:
        query = text(
            "SELECT d.name, COUNT(c.id) AS n, d.created_at FROM knowledge_doc d "
            "LEFT JOIN knowledge_chunk c ON c.doc_id = d.id "
            "WHERE d.transport = :t AND d.guild_id = :g AND d.channel_id = :s "
            "GROUP BY d.id, d.name, d.created_at ORDER BY d.name"
        ).columns(created_at=UTCDateTime())
        scope = {"t": transport, "g": guild_id, "s": _doc_scope(guild_id, channel_id)}
        with self.engine.connect() as conn:
            return [(row.name, row.n, row.created_at) for row in conn.execute(query, scope)]

    @off_loop
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

    @off_loop
    def passages(self, transport: str, guild_id: str, channel_id: str, name: str) -> list[Passage] | None:
        """A document's passages in order (None when the place has no document by that name)."""
        with Session(self.engine) as session:
            doc = session.exec(_doc_query(transport, guild_id, _doc_scope(guild_id, channel_id), name)).first()
            if doc is None:
                return None
            rows = session.exec(
                select(KnowledgeChunk).where(KnowledgeChunk.doc_id == doc.id).order_by(col(KnowledgeChunk.position))
            )
            return [Passage(row.content, row.heading) for row in rows]

    async def reindex(self, transport: str, guild_id: str, channel_id: str, name: str) -> int | None:
        """Cut a document into passages again and index them anew (after a change of the
        splitting or of the search terms; new passages are embedded again by the background
        indexer); its text is its passages joined. Returns the passage count, None if absent."""
        found = await self.passages(transport, guild_id, channel_id, name)
        if found is None:
            return None
        body = "\n\n".join(p.text for p in found)
        added_by, source = await self._origin(transport, guild_id, channel_id, name)
        return await self.add_document(transport, guild_id, channel_id, name, body, added_by=added_by, source=source)

    @off_loop
    def _origin(self, transport: str, guild_id: str, channel_id: str, name: str) -> tuple[str, str]:
        """(who added it, the file it came from) of a document."""
        with Session(self.engine) as session:
            doc = session.exec(_doc_query(transport, guild_id, _doc_scope(guild_id, channel_id), name)).one()
            return doc.added_by, doc.source

    # -- search ----------------------------------------------------------------------------

    @off_loop
    def search(
        self,
        question: str,
        transport: str,
        guild_id: str,
        channel_id: str,
        limit: int,
        min_relevance: float = 0.0,
        mode: Retrieval = "hybrid",
    ) -> list[Hit]:
        """The best passages and past user messages for `question` (see `relevant` for
        `min_relevance`), at most `limit` in all. A guild's messages are searched in all its
        channels; a DM's or the console's only in that channel, so private conversations
        never leak. `mode` "hybrid" adds the semantic score where an embedder is on and the
        question's language has a weight; "lexical" and "semantic" take one side (the bench)."""
        q_terms = query_terms(question) if mode != "semantic" else []
        lang = language(question)
        weight = self.semantic.weights.get(lang, 0.0) if self.semantic is not None and mode != "lexical" else 0.0
        if not q_terms and not weight:
            return []
        values: dict[str, Any] = {"t": transport, "g": guild_id, "c": channel_id, "s": _doc_scope(guild_id, channel_id)}
        values["k"] = CANDIDATES
        if self.postgres:
            values["q"] = " or ".join(q_terms)
            docs_sql, messages_sql = _PG_DOCS, _PG_MESSAGES
        else:
            values["q"] = " OR ".join(f'"{t}"' for t in q_terms)
            docs_sql, messages_sql = _SQLITE_DOCS, _SQLITE_MESSAGES
        # The question is embedded (in the embedder's thread, or by the server) while the
        # database finds the lexical candidates here.
        pending = self.semantic.embedder.embed_query(question) if self.semantic is not None and weight else None
        with self.engine.connect() as conn:
            doc_rows, message_rows = [], []
            if q_terms:
                doc_rows = list(conn.execute(text(docs_sql), values))
                message_rows = list(conn.execute(text(messages_sql).columns(created_at=UTCDateTime()), values))
            doc_cos: dict[int, float] = {}
            message_cos: dict[int, float] = {}
            qvec = _question_vector(pending) if pending is not None else None
            fusion = lang if qvec is not None else None
            if qvec is not None:
                assert self.semantic is not None
                values["m"] = self.semantic.embedder.model_id
                doc_cos = self._nearest(conn, "chunk_vector", _DOC_VECTORS, values, qvec, doc_rows)
                message_cos = self._nearest(conn, "message_vector", _MESSAGE_VECTORS, values, qvec, message_rows)
                doc_rows += _rows(conn, _DOC_BY_ID, set(doc_cos) - {r.id for r in doc_rows})
                message_rows += _rows(conn, _MESSAGE_BY_ID, set(message_cos) - {r.id for r in message_rows})
            docs = self._fused(conn, "knowledge_chunk", q_terms, doc_rows, doc_cos, fusion)
            messages = self._fused(conn, "message", q_terms, message_rows, message_cos, fusion)
        doc_hits = [
            Hit(
                "doc",
                s.row.content,
                s.relevance,
                name=s.row.name,
                heading=s.row.heading,
                doc_id=s.row.doc_id,
                position=s.row.position,
                lexical=s.lexical,
                semantic=s.semantic,
            )
            for s in docs
        ]
        message_hits = [
            Hit(
                "message",
                s.row.content,
                s.relevance,
                message_id=s.row.external_id or f"#{s.row.id}",
                author=s.row.author_name or s.row.author_id,
                channel_id=s.row.channel_id,
                created_at=s.row.created_at,
                lexical=s.lexical,
                semantic=s.semantic,
            )
            for s in messages
        ]
        # Quotes only for the hits returned: segmenting every candidate's sentences took ~100 ms
        # a question at 10,000 passages.
        chosen = relevant(_interleave(doc_hits, message_hits), min_relevance)[:limit]
        return [replace(h, quote=best_quote(h.text, q_terms)) for h in chosen]

    @off_loop
    def neighbours(self, hits: Sequence[Hit]) -> list[tuple[str, str]]:
        """(passage before, passage after) each document hit in its document ("" at its ends,
        for a message, or where that passage is itself one of `hits`): context for the model."""
        cited = {(h.doc_id, h.position) for h in hits if h.kind == "doc"}
        query = text("SELECT position, content FROM knowledge_chunk WHERE doc_id = :d AND position IN (:b, :a)")
        around: list[tuple[str, str]] = []
        with self.engine.connect() as conn:
            for hit in hits:
                found: dict[int, str] = {}
                if hit.kind == "doc":
                    rows = conn.execute(query, {"d": hit.doc_id, "b": hit.position - 1, "a": hit.position + 1})
                    found = {p: c for p, c in rows if (hit.doc_id, p) not in cited}
                around.append((found.get(hit.position - 1, ""), found.get(hit.position + 1, "")))
        return around

    def _nearest(
        self, conn: Connection, table: str, sql: str, values: dict[str, Any], qvec: np.ndarray, also: Sequence[Any]
    ) -> dict[int, float]:
        """Exact cosine between the question and every stored vector of the scope (unit
        vectors: a dot product), in numpy: {row id: cosine} of the SEMANTIC_CANDIDATES nearest
        and of the rows `also` (the lexical candidates) that have a vector.
        The scope's matrix is kept between questions until the table's rows change (count,
        largest and summed ids), so a query reads ids, not 15 MB of vectors per 10,000."""
        stamp = tuple(
            conn.execute(text(f"SELECT COUNT(*), MAX({_KEYS[table]}), SUM({_KEYS[table]}) FROM {table}")).one()
        )
        key = (table, values["m"], values["t"], values["g"], values["c"], values["s"])
        cached = self._matrices.get(key)
        if cached is None or cached[0] != stamp:
            found = conn.execute(text(sql), values).all()
            ids = np.array([i for i, _ in found], dtype=np.int64)
            matrix = (
                np.frombuffer(b"".join(v for _, v in found), dtype=np.float32).reshape(len(found), -1)
                if found
                else np.empty((0, len(qvec)), dtype=np.float32)
            )
            cached = self._matrices[key] = (stamp, ids, matrix)
        _, ids, matrix = cached
        if not len(ids):
            return {}
        cosines = matrix @ qvec
        # The nearest, unordered (the fusion ranks them): a partition, 6x quicker than a sort at 10,000.
        best = (
            np.argpartition(-cosines, SEMANTIC_CANDIDATES)[:SEMANTIC_CANDIDATES]
            if len(ids) > SEMANTIC_CANDIDATES
            else range(len(ids))
        )
        lexical = np.flatnonzero(np.isin(ids, [r.id for r in also]))
        return {int(ids[i]): float(cosines[i]) for i in (*best, *lexical)}

    def _fused(
        self,
        conn: Connection,
        table: str,
        q_terms: list[str],
        rows: list[Any],
        cos: dict[int, float],
        lang: str | None,
    ) -> list[_Scored]:
        """Lexical relevance fused with the semantic one for a question in `lang`
        (`Semantic.relevance`, see `fuse`); a row without a vector yet (being embedded) keeps its
        lexical relevance. Without semantic scores (`lang` None) the BM25 order stands."""
        scored = self._scored(conn, table, q_terms, rows)
        if lang is None:
            return scored
        semantic = self.semantic
        assert semantic is not None
        fused = []
        for s in scored:
            cosine = cos.get(s.row.id)
            if cosine is None:
                fused.append(s)
                continue
            meaning = semantic.relevance(cosine, lang)
            fused.append(_Scored(s.row, s.rank, fuse(s.relevance, meaning), lexical=s.relevance, semantic=meaning))
        fused.sort(key=lambda s: (-s.relevance, -s.rank, s.row.id))
        return fused

    # -- embeddings ------------------------------------------------------------------------

    @off_loop
    def embed_pending(self, batch: int = EMBED_BATCH) -> tuple[int, int]:
        """Embed up to `batch` passages, then user messages, that have no vector from the
        current embedder (new ones, or all of them after a model change); returns (embedded
        now, still waiting)."""
        assert self.semantic is not None
        embedder = self.semantic.embedder
        done = 0
        with self.engine.begin() as conn:
            for pending_sql, table, key in (
                (_PENDING_CHUNKS, "chunk_vector", "chunk_id"),
                (_PENDING_MESSAGES, "message_vector", "message_id"),
            ):
                rows = conn.execute(text(pending_sql + " LIMIT :n"), {"m": embedder.model_id, "n": batch - done}).all()
                if not rows:
                    continue
                vectors = embedder.embed_blocking([embedding_text(r.name, r.heading, r.content) for r in rows])
                ids = [r.id for r in rows]
                conn.execute(
                    text(f"DELETE FROM {table} WHERE {key} IN :ids").bindparams(bindparam("ids", expanding=True)),
                    {"ids": ids},
                )
                conn.execute(
                    text(f"INSERT INTO {table} ({key}, model, vector) VALUES (:i, :m, :v)"),
                    [{"i": i, "m": embedder.model_id, "v": v.tobytes()} for i, v in zip(ids, vectors, strict=True)],
                )
                done += len(rows)
                if done >= batch:
                    break
            left = sum(
                conn.execute(text(f"SELECT COUNT(*) FROM ({sql}) AS p"), {"m": embedder.model_id}).scalar_one()
                for sql in (_PENDING_CHUNKS, _PENDING_MESSAGES)
            )
        return done, left

    async def keep_embedded(self, poll_seconds: float = EMBED_POLL_SECONDS) -> None:
        """Run for the life of the process: embed what is new, and everything again after a
        change of embedder, logging the progress; then look again every `poll_seconds`."""
        assert self.semantic is not None
        total = 0
        while True:
            try:
                done, left = await self.embed_pending()
            # A row deleted meanwhile, or the embedding server failing: the next round retries.
            except (StorageError, IntegrityError, EngineError) as exc:
                log.warning("embedding paused: %s", exc)
                done, left = 0, 0
            if done:
                total += done
                log.info("embedding with %s: %d done, %d to go", self.semantic.embedder.model_id, total, left)
                continue
            total = 0
            await asyncio.sleep(poll_seconds)

    def _scored(self, conn: Connection, table: str, q_terms: list[str], rows: list[Any]) -> list[_Scored]:
        if not rows:
            return []
        n, df = self._stats(conn, table, q_terms)
        return _score(q_terms, rows, df, n)

    def _stats(self, conn: Connection, table: str, q_terms: list[str]) -> tuple[int, dict[str, int]]:
        """(rows in `table`, rows holding each term): the IDF figures, over the whole table."""
        n = conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
        if self.postgres:
            query = text(
                f"SELECT t.term, (SELECT COUNT(*) FROM {table} x "
                "WHERE to_tsvector('simple', x.terms) @@ plainto_tsquery('simple', t.term)) "
                "FROM unnest(CAST(:terms AS text[])) AS t(term)"
            )
            return n, {term: count for term, count in conn.execute(query, {"terms": q_terms})}
        query = text(f"SELECT term, doc FROM {table}_fts_vocab WHERE term IN :terms").bindparams(
            bindparam("terms", expanding=True)
        )
        return n, {term: count for term, count in conn.execute(query, {"terms": q_terms})}


def _question_vector(pending: Future[np.ndarray]) -> np.ndarray | None:
    """The question's vector; None (lexical only, logged) when the embedding server fails."""
    try:
        return pending.result()
    except EngineError as exc:
        log.warning("semantic search skipped, lexical only: %s", exc)
        return None


def _rows(conn: Connection, sql: str, ids: set[int]) -> list[Any]:
    if not ids:
        return []
    query = text(sql).bindparams(bindparam("ids", expanding=True)).columns(created_at=UTCDateTime())
    return list(conn.execute(query, {"ids": sorted(ids)}))


def content_hash(body: str) -> str:
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def chunk_rows(doc_id: int, passages: Sequence[Passage]) -> list[KnowledgeChunk]:
    """The stored rows of a document's passages, with their search terms."""
    return [
        KnowledgeChunk(doc_id=doc_id, position=i, content=p.text, heading=p.heading[:200], terms=index_text(p.text))
        for i, p in enumerate(passages)
    ]


def fuse(lexical: float, semantic: float) -> float:
    """A hit's relevance from both sides: the semantic one, or the mean of the two where that is
    larger. Shared words alone no longer make a hit: "What time does the cinema open on
    Sunday?" shares three with the staging runbook (lexical 0.45, over the floor) but the
    embedder finds them unrelated; a paraphrase sharing none is found by its meaning. Measured
    against the larger of the two on bench/retrieval.py (README "Knowledge base search")."""
    return max(semantic, (lexical + semantic) / 2)


def embedding_text(name: str, heading: str, content: str) -> str:
    """What a passage is embedded as: its document's name and section heading, then its text, so
    a passage deep in a section still says what it is about (a message: its text alone)."""
    title = " › ".join(t for t in (name, heading) if t)
    return f"{title}\n\n{content}" if title else content


def relevant(hits: list[Hit], floor: float) -> list[Hit]:
    """The hits worth citing: none unless the best reaches `floor` (the question is about
    something stored), then those reaching half of it. A question that names a topic and a
    detail ("the LSTM's forget gate") so keeps the detail's passage, which holds less of it."""
    if not hits or max(h.score for h in hits) < floor:
        return []
    return [h for h in hits if h.score >= floor / 2]


def _interleave(docs: list[Hit], messages: list[Hit]) -> list[Hit]:
    """Best document, best message, second document, ...: neither kind should crowd the other out."""
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
_MESSAGE_COLUMNS = "m.id, m.external_id, m.author_id, m.author_name, m.content, m.terms, m.created_at, v.channel_id"
_DOC_COLUMNS = "c.id, c.content, c.terms, c.heading, c.doc_id, c.position, d.name"
_DOC_SCOPE = "d.transport = :t AND d.guild_id = :g AND d.channel_id = :s"

_DOC_BY_ID = f"SELECT {_DOC_COLUMNS} FROM knowledge_chunk c JOIN knowledge_doc d ON d.id = c.doc_id WHERE c.id IN :ids"
_MESSAGE_BY_ID = (
    f"SELECT {_MESSAGE_COLUMNS} FROM message m JOIN conversation v ON v.id = m.conversation_id WHERE m.id IN :ids"
)
_KEYS = {"chunk_vector": "chunk_id", "message_vector": "message_id"}
_DOC_VECTORS = f"""
SELECT x.chunk_id, x.vector FROM chunk_vector x JOIN knowledge_chunk c ON c.id = x.chunk_id
JOIN knowledge_doc d ON d.id = c.doc_id WHERE x.model = :m AND {_DOC_SCOPE}
"""
_MESSAGE_VECTORS = f"""
SELECT x.message_id, x.vector FROM message_vector x JOIN message m ON m.id = x.message_id {_MESSAGE_SCOPE}
AND x.model = :m
"""
_PENDING_CHUNKS = """
SELECT c.id, c.content, c.heading, d.name FROM knowledge_chunk c JOIN knowledge_doc d ON d.id = c.doc_id
LEFT JOIN chunk_vector x ON x.chunk_id = c.id
WHERE x.chunk_id IS NULL OR x.model != :m ORDER BY c.id
"""
_PENDING_MESSAGES = """
SELECT m.id, m.content, '' AS heading, '' AS name FROM message m LEFT JOIN message_vector x ON x.message_id = m.id
WHERE m.role = 'user' AND (x.message_id IS NULL OR x.model != :m) ORDER BY m.id
"""

_SQLITE_DOCS = f"""
SELECT {_DOC_COLUMNS}
FROM knowledge_chunk_fts JOIN knowledge_chunk c ON c.id = knowledge_chunk_fts.rowid
JOIN knowledge_doc d ON d.id = c.doc_id
WHERE knowledge_chunk_fts MATCH :q AND {_DOC_SCOPE}
ORDER BY bm25(knowledge_chunk_fts) LIMIT :k
"""
_SQLITE_MESSAGES = f"""
SELECT {_MESSAGE_COLUMNS}
FROM message_fts JOIN message m ON m.id = message_fts.rowid {_MESSAGE_SCOPE}
AND message_fts MATCH :q
ORDER BY bm25(message_fts) LIMIT :k
"""
# The tsvector expressions must read exactly like the migration's GIN indexes to use them.
_PG_DOCS = f"""
SELECT {_DOC_COLUMNS}
FROM knowledge_chunk c JOIN knowledge_doc d ON d.id = c.doc_id,
     websearch_to_tsquery('simple', :q) q
WHERE to_tsvector('simple', c.terms) @@ q AND {_DOC_SCOPE}
ORDER BY ts_rank(to_tsvector('simple', c.terms), q) DESC, c.id LIMIT :k
"""
_PG_MESSAGES = f"""
SELECT {_MESSAGE_COLUMNS}
FROM websearch_to_tsquery('simple', :q) q, message m {_MESSAGE_SCOPE}
AND to_tsvector('simple', m.terms) @@ q
ORDER BY ts_rank(to_tsvector('simple', m.terms), q) DESC, m.id LIMIT :k
"""
