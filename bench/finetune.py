"""Fine-tune run with figures: the child trainer on a small made-up team set, as the bot runs it.

    python -m bench.finetune [--epochs 4] [--rank 8] [--threads 2] [--general-sample 64]

Trains on one wording of 16 facts about a fictional team (10 English, 6 Chinese, in
bench/finetune_facts.jsonl) and holds out other wordings of the same facts: paraphrased
questions *and* answers, written for the bench, so the held-out figure shows what the adapter
learned, not whether it memorized a template. Prints model load time, seconds per step, NLL
per answer token on llama.cpp, base against adapter, for the trained wording, the paraphrases
and the shipped general-chat set, and the gate's decision.
Needs pip install -e ".[finetune]".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bot.builtin.finetune import GENERAL_SET, FinetuneSettings, decide
from bot.config import embedded_model_path

# One fact a line, in two wordings: {"train": [question, answer], "heldout": [question, answer]}.
FACTS = Path(__file__).with_name("finetune_facts.jsonl")


def write(path: Path, pairs: list[list[str]]) -> Path:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def child(args: list[str]) -> list[dict[str, Any]]:
    """Run `python -m bot.builtin.train ARGS`, printing its steps; returns its events."""
    started = time.monotonic()
    events = []
    command = [sys.executable, "-m", "bot.builtin.train", *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            event = json.loads(line)
            event["at"] = time.monotonic() - started
            events.append(event)
            if event["event"] == "start":
                print(f"model loaded into transformers: {event['load_seconds']} s")
            elif event["event"] == "step":
                print(f"step {event['step']}/{event['steps']} loss {event['loss']}  ({event['at']:.1f} s)")
    if proc.returncode != 0:
        sys.exit(f"bot.builtin.train failed (exit {proc.returncode})")
    return events


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--general-sample", type=int, default=FinetuneSettings.model_fields["general_sample"].default)
    args = parser.parse_args()
    model = str(embedded_model_path())
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        facts = [json.loads(line) for line in FACTS.read_text(encoding="utf-8").splitlines()]
        train = write(folder / "train.jsonl", [fact["train"] for fact in facts])
        paraphrased = write(folder / "heldout.jsonl", [fact["heldout"] for fact in facts])
        adapter = folder / "adapter.gguf"
        common = ["--model", model, "--out", str(adapter), "--threads", str(args.threads)]
        learn = ["--train", str(train), "--heldout", str(paraphrased), "--rank", str(args.rank), "--epochs"]
        general = ["--general", str(GENERAL_SET), "--general-sample", str(args.general_sample)]
        events = child(["train", *common, *learn, str(args.epochs), *general])
        trained = child(["eval", *common, "--heldout", str(train)])[-1]["heldout"]
        size = adapter.stat().st_size / 1e6
    steps = [e for e in events if e["event"] == "step"]
    if len(steps) > 1:
        print(f"seconds per step: {(steps[-1]['at'] - steps[0]['at']) / (len(steps) - 1):.2f}")
    result = events[-1]
    print(f"evaluation (both sets, base and adapter): {result['seconds']} s")
    print("NLL per answer token on llama.cpp    base   adapter  change")
    for name, nll in (
        (f"trained wording ({trained['examples']})", trained),
        (f"paraphrased held-out ({result['heldout']['examples']})", result["heldout"]),
        (f"general chat ({result['general']['examples']})", result["general"]),
    ):
        print(f"  {name:<34} {nll['base']:.3f}  {nll['adapter']:.3f}  {nll['adapter'] / nll['base'] - 1:+.1%}")
    figures = {
        "heldout": result["heldout"],
        "general": {**result["general"], "change": result["general"]["adapter"] / result["general"]["base"] - 1},
    }
    deploy, reason = decide(figures, FinetuneSettings.model_fields["max_regression"].default)
    print(f"gate (default limits): {'deploy' if deploy else 'refuse'}: {reason}")
    print(f"adapter: {size:.1f} MB; total: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
