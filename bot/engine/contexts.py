"""Extra llama.cpp contexts on the weights a `Llama` already loaded, through the low-level API.

`Llama` keeps one context with one sequence. Embeddings need a context in embedding mode, and
batching needs one with many sequences; both share the model's weights, so they cost only
their own KV cache. Every function here runs in the engine's worker thread, the model's owner.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import llama_cpp
from llama_cpp._utils import suppress_stdout_stderr

# Longest text embedded, in tokens; longer texts are cut (mean pooling needs one micro-batch).
EMBED_MAX_TOKENS = 512


def new_context(
    llm: Any, *, n_ctx: int, n_batch: int, n_seq_max: int = 1, embeddings: bool = False, unified: bool = True
) -> Any:
    """A context on `llm`'s model with `llm`'s own settings (threads, attention kernel, cache
    types: the same arithmetic as single mode); free it with `llama_free`. `unified`: one cell
    pool for all sequences, else `n_ctx / n_seq_max` cells of its own for each."""
    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = n_batch
    params.n_seq_max = n_seq_max
    params.kv_unified = unified
    if embeddings:
        params.embeddings = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
    # Quiet like `Llama(verbose=False)`: llama.cpp's start-up notes (e.g. a shared pool larger
    # than one conversation's training context, which is expected here) would land in the chat.
    with suppress_stdout_stderr(disable=llm.verbose):
        ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} cells")
    return ctx


def fill_batch(batch: Any, entries: Sequence[tuple[int, int, int, bool]]) -> None:
    """Put (token, position, sequence id, wants logits) entries into a `llama_batch`."""
    for i, (token, pos, seq_id, logits) in enumerate(entries):
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits
    batch.n_tokens = len(entries)


class Embedder:
    """Mean-pooled, L2-normalised sentence embeddings from the served model."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm
        self._n_embd = llama_cpp.llama_model_n_embd(llm._model.model)
        self._ctx = new_context(llm, n_ctx=EMBED_MAX_TOKENS, n_batch=EMBED_MAX_TOKENS, embeddings=True)
        self._batch = llama_cpp.llama_batch_init(EMBED_MAX_TOKENS, 0, 1)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [self._embed_one(text) for text in texts]

    def _embed_one(self, text: str) -> list[float]:
        tokens = self._llm.tokenize(text.encode("utf-8", "replace"), True, False)[:EMBED_MAX_TOKENS]
        tokens = tokens or [self._llm.token_eos()]  # an empty text still gets a vector
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        fill_batch(self._batch, [(t, i, 0, True) for i, t in enumerate(tokens)])
        if llama_cpp.llama_decode(self._ctx, self._batch) != 0:
            raise RuntimeError("llama.cpp could not compute the embedding")
        pooled = llama_cpp.llama_get_embeddings_seq(self._ctx, 0)
        vector = [float(pooled[i]) for i in range(self._n_embd)]
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector]

    def close(self) -> None:
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
