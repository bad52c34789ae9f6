"""Bot overhead: tokens/s end to end (router -> chat plugin -> engine -> memory) against raw
`Llama.create_chat_completion` on the same GGUF, prompt and settings, measured in one run.

    python -m bench.overhead [--runs 5] [--max-tokens 128] [--gpu] [--mode single|batched]

Target: bot / raw >= 0.95. With --gpu every layer is offloaded (n_gpu_layers=-1); where
llama-cpp-python has no GPU support it says so and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Iterator

from bench.common import bench_settings, bot_reply, machine_note, median, start_app, timed
from bot.api import Request
from bot.app import Quill
from bot.prompts import PromptLoader

QUESTION = "Question {i}: explain in a few paragraphs how a team can keep its documentation up to date."


async def raw_stream(app: Quill, raw, messages: list[dict[str, str]], max_tokens: int) -> AsyncIterator[str]:
    """The baseline: llama-cpp-python's own streaming chat completion, nothing around it. It runs
    on the engine's worker, the one thread of the process that computes with llama.cpp: a second
    one slows both (see `bench.common.make_engine`)."""

    def work(_: object) -> Iterator[str]:
        for chunk in raw.create_chat_completion(messages, stream=True, max_tokens=max_tokens, temperature=0.0):
            if text := chunk["choices"][0]["delta"].get("content"):
                yield text

    async for text in app.engine._run(work):  # type: ignore[attr-defined]
        yield text


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--mode", choices=["batched", "single"], default="single", help="QUILL_ENGINE_MODE")
    args = parser.parse_args()

    import llama_cpp

    if args.gpu and not llama_cpp.llama_supports_gpu_offload():
        print("GPU: this llama-cpp-python build has no GPU offload; skipped.")
        return 0
    settings = bench_settings(
        n_gpu_layers=-1 if args.gpu else 0, max_reply_tokens=args.max_tokens, engine_mode=args.mode
    )
    system = PromptLoader(settings.prompts_dir).render("chat_system", bot_name=settings.bot_name)
    raw = llama_cpp.Llama(
        model_path=str(settings.model_path),
        n_ctx=settings.n_ctx,
        n_threads=settings.n_threads,
        n_gpu_layers=settings.n_gpu_layers,
        flash_attn=settings.flash_attn,
        seed=settings.seed,
        verbose=False,
    )
    app = await start_app(settings)
    raw_tps, bot_tps = [], []
    for i in range(args.runs):
        # A new question each run, so neither side profits from the previous run's prompt cache.
        question = QUESTION.format(i=i)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]

        text, _, seconds = await timed(raw_stream(app, raw, messages, args.max_tokens))
        raw_tps.append(len(raw.tokenize(text.encode(), False, False)) / seconds)

        request = Request(transport="bench", channel_id=f"run{i}", author_id="bench", text=question)
        text, _, seconds = await timed(bot_reply(app, request))
        bot_tps.append(await app.engine.count_tokens(text) / seconds)
    await app.close()

    device = "GPU (n_gpu_layers=-1)" if args.gpu else f"CPU, {settings.n_threads} threads"
    print(f"machine: {machine_note()}; device: {device}; model: {settings.model_path.name}; mode: {args.mode}")
    print(f"runs: {args.runs}, max tokens {args.max_tokens}, greedy")
    print(f"raw Llama.create_chat_completion: {median(raw_tps):7.1f} tokens/s (median)")
    print(f"quill router+plugin+engine:       {median(bot_tps):7.1f} tokens/s (median)")
    print(f"ratio bot/raw: {median(bot_tps) / median(raw_tps):.3f}  (target >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
