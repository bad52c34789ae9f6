"""Shared fixtures: the real embedded model (loaded once per session), real databases.

Database tests run on a SQLite file, and also on PostgreSQL when TEST_POSTGRES_URL is set
(each test in a schema of its own, dropped afterwards).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bot.app import Quill
from bot.config import Settings
from bot.engine import ChatMessage, GenerationOptions
from bot.engine.batched import BatchedEngine, _Generate, common_prefix
from bot.engine.local import LocalEngine

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL")
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings for a test: deterministic sampling, small context, files under tmp_path."""
    values: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "n_ctx": 2048,
        "n_threads": 2,
        "temperature": 0.0,
        "seed": 42,
        "max_reply_tokens": 48,
        # Semantic search is on by default; the tests that need it turn it on (tests/test_semantic*.py).
        "embeddings": False,
        # Tools are on by default; tests/test_tools.py turns them on, so other tests' chats stay one generation.
        "tools": False,
        "_env_file": None,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEngine]:
    """The real engine on the embedded SmolLM2-135M, shared by the whole test session."""
    eng = LocalEngine(make_settings(tmp_path_factory.mktemp("engine")))
    eng.start()
    yield eng
    asyncio.run(eng.close())


def small_batched_engine(path: Path, **layout: Any) -> Iterator[BatchedEngine]:
    """A started batched engine sized so tests reach its limits quickly: n_ctx 1,024, 16 MB for
    saved conversations (about 700 tokens), small prefill chunks and 4 streams. No states on
    disk: its tests count what host memory keeps (tests/test_warm_restart.py covers the disk)."""
    settings = make_settings(
        path, n_ctx=1024, batch_cache_mb=16, batch_disk_mb=0, batch_streams=4, batch_prefill_chunk=64, **layout
    )
    eng = BatchedEngine(settings)
    eng.start()
    yield eng
    asyncio.run(eng.close())


@pytest.fixture(scope="session")
def batched_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatchedEngine]:
    """The batched engine on the same model, shared by the session, with a KV pool of exactly
    n_ctx (1,024) cells (QUILL_BATCH_KV_MB=1)."""
    yield from small_batched_engine(tmp_path_factory.mktemp("batched"), batch_kv_mb=1)


@pytest.fixture(scope="session")
def per_stream_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatchedEngine]:
    """The batched engine with QUILL_BATCH_KV=per-stream: 4 streams of n_ctx (1,024) cells each,
    beside `batched_engine`'s one pool of 1,024 cells that they would overflow."""
    yield from small_batched_engine(tmp_path_factory.mktemp("per-stream"), batch_kv="per-stream")


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL: a SQLite file, or a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'quill.db'}"
        return
    if not POSTGRES_URL:
        pytest.skip("TEST_POSTGRES_URL is not set")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return make_settings(tmp_path, database_url=db_url)


@pytest.fixture
async def app(settings: Settings, engine: LocalEngine) -> AsyncIterator[Quill]:
    """The whole core (plugins, router, memory) on the shared engine."""
    quill = await Quill.start(settings, engine=engine)
    yield quill
    await quill.close(close_engine=False)


# Greedy replies may differ only where the two best tokens were this close (in nats; seen 0.03
# and 0.115 between the batched and the single arithmetic, and 0.312 with flash attention, whose
# CPU kernel sums a sequence's cells block by block wherever they lie in a shared pool).
LOGPROB_TOLERANCE = 0.5


async def assert_same_or_near_tie(
    batched: BatchedEngine, prompt: Sequence[ChatMessage], expected: str, got: str
) -> None:
    """Decoded together, llama.cpp sums in another order, so a near-tie can flip one greedy token
    (seen: after "There are", the logits of " no" and " three" 17.834 and 17.806); any other
    difference is a bug. The gap is measured with single-mode arithmetic, on the `Llama` the
    batched engine keeps for its tokenizer, in its worker."""
    if expected == got:
        return
    llm = batched._llm
    prompt_tokens = batched._format(_Generate(tuple(prompt), GenerationOptions()))[0]
    ours, theirs = ([*llm.tokenize(t.encode(), False, False), llm.token_eos()] for t in (expected, got))
    i = common_prefix(ours, theirs)

    def work(llm: Any) -> Iterator[float]:
        llm.reset()
        llm.eval(prompt_tokens + ours[:i])
        last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        logits = np.ctypeslib.as_array(last, shape=(llm.n_vocab(),)).astype(np.float64)
        llm.reset()
        yield abs(float(logits[ours[i]] - logits[theirs[i]]))  # the log-sum-exp cancels out

    (gap,) = [gap async for gap in batched._run(work)]
    assert gap < LOGPROB_TOLERANCE, f"token {i} differs by {gap:.3f} nats: {expected!r} vs {got!r}"
