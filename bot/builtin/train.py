"""The fine-tune child process: trains a LoRA adapter with PEFT and measures it on llama.cpp.

Run as `python -m bot.builtin.train train|eval ...` by `bot.builtin.finetune`, never imported by the bot: torch
(and transformers, peft) stay out of the bot's process, and a training run that takes both
cores for minutes never blocks its event loop. Progress goes to stdout as JSON lines.

Route (see README "Fine-tuning"): transformers loads the served GGUF itself (dequantized to
fp32), PEFT trains LoRA on the answer tokens, the adapter is written as a GGUF LoRA with the
`gguf` package (q/k rows permuted to llama.cpp's order) and served on the quantized file.
The held-out and general-chat losses are measured by llama.cpp, the code that will serve the
adapter, so the eval gate judges what users will get. `eval` needs only llama-cpp-python (no torch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Hugging Face module names -> llama.cpp tensor names, for the seven projections LoRA trains.
MODULES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def read_jsonl(path: Path) -> list[list[dict[str, str]]]:
    return [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines() if line]


class Encoder:
    """Tokenizes chat examples with llama.cpp's own tokenizer and the GGUF's chat template, so
    training and evaluation see exactly the tokens serving will."""

    def __init__(self, llm: Any) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = llm.metadata["tokenizer.chat_template"]
        eos = llm._model.token_get_text(llm.token_eos())
        bos = llm._model.token_get_text(llm.token_bos())
        self.llm = llm
        self.prompt = Jinja2ChatFormatter(template, eos, bos, add_generation_prompt=True)
        self.full = Jinja2ChatFormatter(template, eos, bos, add_generation_prompt=False)

    def __call__(self, messages: list[dict[str, str]]) -> tuple[list[int], int]:
        """Tokens of the whole exchange, and how many of them precede the answer."""
        prefix = self.prompt(messages=messages[:-1]).prompt
        whole = self.full(messages=messages).prompt
        tokens = self.llm.tokenize(whole.encode(), add_bos=False, special=True)
        n_prompt = len(self.llm.tokenize(prefix.encode(), add_bos=False, special=True))
        return tokens, n_prompt


def answer_nll(
    model: Path, adapter: Path | None, sets: Sequence[Sequence[list[dict[str, str]]]], threads: int
) -> list[float]:
    """Mean negative log-likelihood per answer token of each set of examples, computed by
    llama.cpp with (or without) the adapter; the model is loaded once for all the sets."""
    from llama_cpp import Llama

    kwargs: dict[str, Any] = {"lora_path": str(adapter)} if adapter else {}
    llm = Llama(str(model), n_ctx=2048, logits_all=True, n_threads=threads, verbose=False, **kwargs)
    encode = Encoder(llm)
    means = []
    for examples in sets:
        total, count = 0.0, 0
        for messages in examples:
            tokens, n_prompt = encode(messages)
            tokens = tokens[: llm.n_ctx()]
            start = max(n_prompt, 1)
            if start >= len(tokens):
                continue
            llm.reset()
            llm.eval(tokens)
            # Row p-1 predicts token p: log-softmax at the answer's tokens.
            rows = np.asarray(llm.scores[start - 1 : len(tokens) - 1], dtype=np.float64)
            top = rows.max(axis=1)
            lse = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))
            total += float((lse - rows[np.arange(len(rows)), tokens[start:]]).sum())
            count += len(rows)
        means.append(total / max(count, 1))
    llm.close()
    return means


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows the way llama.cpp stores them (convert_hf_to_gguf.py's `permute`)."""
    split = weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
    return split.swapaxes(1, 2).reshape(weights.shape)


def write_adapter(
    path: Path,
    arch: str,
    alpha: float,
    pairs: dict[str, tuple[np.ndarray, np.ndarray]],
    heads: tuple[int, int],
) -> None:
    """Write a GGUF LoRA adapter: `pairs` maps `blk.N.attn_q.weight` to (lora_a (r, in),
    lora_b (out, r)) in Hugging Face row order; q and k are permuted for llama.cpp here."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    n_head, n_head_kv = heads
    for name, (a, b) in pairs.items():
        # Only llama-architecture GGUFs store q/k rows permuted (transformers undoes it on load
        # for "llama" only): an adapter without the same order loses most of its q/k effect.
        if arch == "llama" and ".attn_q." in name:
            b = permute(b, n_head)
        elif arch == "llama" and ".attn_k." in name:
            b = permute(b, n_head_kv)
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def model_facts(model: Path) -> tuple[str, tuple[int, int]]:
    """Architecture and (heads, kv heads) from the GGUF's metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(str(model))

    def value(key: str) -> Any:
        return reader.fields[key].contents()

    arch = value("general.architecture")
    return arch, (int(value(f"{arch}.attention.head_count")), int(value(f"{arch}.attention.head_count_kv")))


def train(args: argparse.Namespace) -> Path:
    """Train LoRA on the answer tokens of `args.train`; returns the written GGUF adapter."""
    import torch
    from llama_cpp import Llama
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    vocab = Llama(str(args.model), vocab_only=True, verbose=False)
    encode = Encoder(vocab)
    examples = [encode(m) for m in read_jsonl(args.train)]
    emit(event="loading", examples=len(examples))
    base = AutoModelForCausalLM.from_pretrained(str(args.model.parent), gguf_file=args.model.name, dtype=torch.float32)
    alpha = 2 * args.rank
    config = LoraConfig(r=args.rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(MODULES))
    model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    total = args.epochs * len(examples)
    emit(event="start", steps=total, load_seconds=round(time.monotonic() - started, 1))
    step = 0
    model.train()
    order = np.random.default_rng(args.seed)
    for _epoch in range(args.epochs):
        for i in order.permutation(len(examples)):
            tokens, n_prompt = examples[i]
            ids = torch.tensor([tokens])
            labels = ids.clone()
            labels[0, :n_prompt] = -100  # learn the answers, not the questions
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            emit(event="step", step=step, steps=total, loss=round(loss.item(), 4))
    arch, heads = model_facts(args.model)
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in MODULES and hasattr(module, "lora_A"):
            layer = int(name.split(".layers.")[1].split(".")[0])
            a = module.lora_A["default"].weight.detach().numpy()
            b = module.lora_B["default"].weight.detach().numpy()
            pairs[f"blk.{layer}.{MODULES[leaf]}.weight"] = (a, b)
    write_adapter(args.out, arch, alpha, pairs, heads)
    emit(event="trained", adapter=str(args.out), seconds=round(time.monotonic() - started, 1))
    return args.out


def _base_key(model: Path, examples: Sequence[list[dict[str, str]]]) -> str:
    """What the base model's NLL on `examples` depends on: the model file and the examples."""
    stat = model.stat()
    digest = hashlib.sha256(f"{model.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(json.dumps(list(examples), ensure_ascii=False).encode())
    return digest.hexdigest()


def evaluate(args: argparse.Namespace, adapter: Path) -> None:
    """Held-out and general-chat NLL, base against adapter. The base's general figure is the
    same for every run on one model, so it is kept in `--base-cache` and measured once."""
    started = time.monotonic()
    heldout = read_jsonl(args.heldout)
    general = read_jsonl(args.general)[: args.general_sample] if args.general else []
    cache: dict[str, float] = {}
    if args.base_cache and args.base_cache.is_file():
        cache = json.loads(args.base_cache.read_text(encoding="utf-8"))
    key = _base_key(args.model, general)
    cached = key in cache
    base_sets = [heldout] if cached else [heldout, general]
    held_base, *general_base = answer_nll(args.model, None, base_sets, args.threads)
    held_after, general_after = answer_nll(args.model, adapter, [heldout, general], args.threads)
    general_before = cache[key] if cached else general_base[0]
    if args.base_cache and not cached and general:
        cache[key] = general_before
        args.base_cache.parent.mkdir(parents=True, exist_ok=True)
        args.base_cache.write_text(json.dumps(cache), encoding="utf-8")
    emit(
        event="eval",
        heldout={"base": round(held_base, 4), "adapter": round(held_after, 4), "examples": len(heldout)},
        general={
            "base": round(general_before, 4),
            "adapter": round(general_after, 4),
            "examples": len(general),
            "base_cached": cached,
        },
        seconds=round(time.monotonic() - started, 1),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bot.builtin.train", description=__doc__)
    parser.add_argument("action", choices=["train", "eval"], help="train then evaluate, or evaluate only")
    parser.add_argument("--model", type=Path, required=True, help="the served GGUF model")
    parser.add_argument("--train", type=Path, help="chat-format JSONL to learn from")
    parser.add_argument("--heldout", type=Path, required=True, help="chat-format JSONL for the eval gate")
    parser.add_argument("--general", type=Path, help="chat-format JSONL of general chat (the regression check)")
    parser.add_argument("--general-sample", type=int, default=64, help="how many of --general to measure")
    parser.add_argument("--base-cache", type=Path, help="JSON file keeping the base model's general NLL")
    parser.add_argument("--out", type=Path, required=True, help="the GGUF adapter (written by train)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.action == "train":
        if args.train is None:
            parser.error("train needs --train")
        train(args)
    evaluate(args, args.out)


if __name__ == "__main__":
    sys.exit(main())
