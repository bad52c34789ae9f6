"""Fine-tune smoke run with figures: the child trainer on a tiny made-up set, as the bot runs it.

    python -m bench.finetune [--epochs 2] [--rank 4] [--threads 2]

Prints model load time, seconds per step, the held-out NLL per answer token on llama.cpp
before and after, the adapter's size and the total. Needs pip install -e ".[finetune]".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bot.config import embedded_model_path

TOPICS = "deploy rollback logs backups tickets on-call metrics alerts releases secrets tests reviews builds docs"
TIP = "Zorblax tip: open the {} panel, press Sync, then wait for the green light."


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"How do I handle {t} in Zorblax?"},
                    {"role": "assistant", "content": TIP.format(t)},
                ]
            }
        )
        for t in TOPICS.split()
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "train.jsonl").write_text("\n".join(rows[:-4]) + "\n")
        (folder / "heldout.jsonl").write_text("\n".join(rows[-4:]) + "\n")
        command = [sys.executable, "-m", "bot.train", "train", "--model", str(embedded_model_path())]
        command += ["--train", str(folder / "train.jsonl"), "--heldout", str(folder / "heldout.jsonl")]
        command += ["--out", str(folder / "adapter.gguf"), "--rank", str(args.rank)]
        command += ["--epochs", str(args.epochs), "--threads", str(args.threads)]
        started = time.monotonic()
        first_step = last_step = None
        steps = 0
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                event = json.loads(line)
                now = time.monotonic() - started
                if event["event"] == "start":
                    print(f"model loaded into transformers: {event['load_seconds']} s")
                elif event["event"] == "step":
                    first_step = first_step if first_step is not None else now
                    last_step, steps = now, event["step"]
                    print(f"step {event['step']}/{event['steps']} loss {event['loss']}  ({now:.1f} s)")
                elif event["event"] == "eval":
                    print(f"held-out NLL/answer token on llama.cpp: {event['before']} -> {event['after']}")
        size = (folder / "adapter.gguf").stat().st_size / 1e6
    if first_step is not None and last_step is not None and steps > 1:
        print(f"seconds per step: {(last_step - first_step) / (steps - 1):.2f}")
    print(f"adapter: {size:.1f} MB; total: {time.monotonic() - started:.0f} s (exit {proc.returncode})")


if __name__ == "__main__":
    main()
