"""Why QUILL_BATCH_KV=per-stream: one conversation's cost beside others, with one KV pool that
all sequences share against cells of its own for each sequence (llama.cpp's non-unified cache).

In each layout, in the same run: a sequence holds a 1,500-token history; its next 150 prompt
tokens and 30 single-token decoding steps are timed alone, then again while 3 other sequences
hold 1,500 tokens each. In a pool, llama.cpp attends over the cells up to the highest used one,
so the others' cells cost every token; in streams, only the sequence's own. Last, a decoding
step of all 4 sequences together, listed in ascending and in descending ids: llama.cpp puts
streams into one graph only in consecutive, ascending ids (the batched engine lists them so).

    python -m bench.kv_layout [--runs 3]
"""

from __future__ import annotations

import time
from typing import Any

import llama_cpp
from llama_cpp import Llama

from bench.common import machine_note, median, parser
from bot.config import Settings
from bot.engine.contexts import fill_batch, new_context

SEQUENCES, STREAM_CELLS, HISTORY, PROMPT, STEPS, CHUNK = 4, 2048, 1500, 150, 30, 256


def fill(ctx: Any, batch: Any, seq: int, tokens: list[int], start: int) -> None:
    for i in range(0, len(tokens), CHUNK):
        chunk = tokens[i : i + CHUNK]
        fill_batch(batch, [(t, start + i + j, seq, False) for j, t in enumerate(chunk)])
        assert llama_cpp.llama_decode(ctx, batch) == 0


def probe(ctx: Any, batch: Any, tokens: list[int]) -> tuple[float, float]:
    """Seconds for sequence 0's next PROMPT tokens, and per decoding step after them; then
    sequence 0 is cut back to its history."""
    started = time.perf_counter()
    fill(ctx, batch, 0, tokens[:PROMPT], HISTORY)
    prompt = time.perf_counter() - started
    started = time.perf_counter()
    for k in range(STEPS):
        fill_batch(batch, [(tokens[k], HISTORY + PROMPT + k, 0, True)])
        assert llama_cpp.llama_decode(ctx, batch) == 0
    step = (time.perf_counter() - started) / STEPS
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, HISTORY, -1)
    return prompt, step


def together(ctx: Any, batch: Any, tokens: list[int], order: list[int]) -> float:
    """Seconds per decoding step of every sequence at once, in `order`; then each is cut back
    to its history."""
    started = time.perf_counter()
    for k in range(STEPS):
        fill_batch(batch, [(tokens[k], HISTORY + k, seq, True) for seq in order])
        assert llama_cpp.llama_decode(ctx, batch) == 0
    step = (time.perf_counter() - started) / STEPS
    for seq in order:
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), seq, HISTORY, -1)
    return step


def measure(llm: Llama, unified: bool, tokens: list[int], runs: int) -> dict[str, tuple[float, float]]:
    ctx = new_context(llm, n_ctx=STREAM_CELLS * SEQUENCES, n_batch=CHUNK, n_seq_max=SEQUENCES, unified=unified)
    batch = llama_cpp.llama_batch_init(CHUNK, 0, 1)
    try:
        fill(ctx, batch, 0, tokens[:HISTORY], 0)
        figures = {}
        for label in ("alone", "beside 3"):
            if label == "beside 3":
                for seq in range(1, SEQUENCES):
                    fill(ctx, batch, seq, tokens[:HISTORY], 0)
            probe(ctx, batch, tokens)  # warm-up
            samples = [probe(ctx, batch, tokens) for _ in range(runs)]
            figures[label] = (median([p for p, _ in samples]), median([s for _, s in samples]))
        for label, order in (("ascending", list(range(SEQUENCES))), ("descending", list(range(SEQUENCES))[::-1])):
            together(ctx, batch, tokens, order)  # warm-up
            figures[label] = (0.0, median([together(ctx, batch, tokens, order) for _ in range(runs)]))
        return figures
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    llm = Llama(
        model_path=str(settings.model_path),
        n_ctx=256,
        n_threads=args.threads,
        flash_attn=settings.flash_attn,
        verbose=False,
    )
    tokens = llm.tokenize(("The quick brown fox jumps over the lazy dog. " * 400).encode())
    print(f"{settings.model_path.name}, {args.threads} threads, history {HISTORY} tokens, {args.runs} runs (median)")
    for name, unified in (("pool (QUILL_BATCH_KV=pool)", True), ("per-stream", False)):
        f = measure(llm, unified, tokens, args.runs)
        (pa, sa), (pb, sb) = f["alone"], f["beside 3"]
        print(
            f"{name:28s} {PROMPT} prompt tokens: {pa:.2f} s alone, {pb:.2f} s beside 3 others ({pb / pa:.2f}x); "
            f"a decoding step: {1000 * sa:.1f} ms alone, {1000 * sb:.1f} ms beside them ({sb / sa:.2f}x)"
        )
        up, down = f["ascending"][1], f["descending"][1]
        print(
            f"{'':28s} all {SEQUENCES} decoding in one step: {1000 * up:.1f} ms listed in ascending ids, "
            f"{1000 * down:.1f} ms in descending ({down / up:.2f}x)"
        )
    print(machine_note())


if __name__ == "__main__":
    main()
