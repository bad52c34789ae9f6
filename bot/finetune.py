"""The fine-tune loop: approved answers -> dataset -> LoRA adapter -> eval gate -> hot swap.

1. People approve good answers (`/good` approves the latest; a Discord 👍 the answer it is on).
2. `/finetune export` builds a chat-format JSONL dataset from approved exchanges in channels
   where fine-tuning is enabled (`/finetune enable`), with ids, emails and tokens scrubbed,
   split into train and held-out files.
3. `/finetune train` trains a LoRA adapter in a child process (`python -m bot.train`; torch
   never enters the bot's process), streaming its steps and loss back as the reply.
4. Eval gate: llama.cpp measures held-out NLL per answer token without and with the adapter;
   only an improvement is deployed, through `engine.set_adapter` between requests.
5. The previous adapter is kept: `/finetune rollback` swaps back to it (or to the base model).

A core plugin (bot/plugins.py CORE_PLUGINS): its commands reach the fine-tune tables directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import logging
import random
import re
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from bot.api import Command, Place, PluginContext, Reply, Request, hookimpl
from bot.memory import Memory
from bot.models import Approval, Conversation, FinetuneRun, Message, ScopeSetting, utcnow

log = logging.getLogger(__name__)

ENABLED = "finetune.enabled"
CONTRIBUTORS = "contributors.json"  # per dataset: a contributor key per line of each part
ERASED_NOTE = "trained on data of a since-erased user"
EXTRA_PACKAGES = ("torch", "transformers", "peft", "gguf")
HOW_TO_ENABLE = (
    'Fine-tuning needs the optional training packages: pip install -e ".[finetune]" '
    "(torch CPU, transformers, peft, gguf, accelerate; about 1.4 GB), then restart the bot."
)

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
_MENTION = re.compile(r"<(@[!&]?|#)\d+>")
_SNOWFLAKE = re.compile(r"\b\d{15,21}\b")
# API keys and bot tokens: prefixed keys, Discord's three-part tokens, long random strings.
_SECRET = re.compile(
    r"\b(?:sk-[\w-]{16,}|gh[pousr]_\w{20,}|xox[abp]-[\w-]{10,}|[\w-]{23,28}\.[\w-]{6,7}\.[\w-]{27,}"
    r"|(?=[A-Za-z0-9_\-]*\d)(?=[A-Za-z0-9_\-]*[A-Za-z])[A-Za-z0-9_\-]{32,})\b"
)


def scrub(text: str, user_ids: Sequence[str] = ()) -> str:
    """Remove what must not be learned: emails, tokens/keys, mentions and user ids."""
    text = _EMAIL.sub("[email]", text)
    text = _SECRET.sub("[secret]", text)
    text = _MENTION.sub("@someone", text)
    text = _SNOWFLAKE.sub("[id]", text)
    for uid in sorted({u for u in user_ids if len(u) >= 3}, key=len, reverse=True):
        text = re.sub(rf"\b{re.escape(uid)}\b", "[user]", text)
    return text


class FinetuneError(Exception):
    """A fine-tune step that cannot go on; the message is fit to show a user."""


@dataclass(frozen=True)
class Dataset:
    folder: Path
    train: Path
    heldout: Path
    n_train: int
    n_heldout: int
    sha256: str


# -- approvals ------------------------------------------------------------------------------


def _approve(memory: Memory, place: Place, user_id: str, external_id: str | None) -> Message | None:
    with Session(memory.engine, expire_on_commit=False) as session:
        query = (
            select(Message)
            .join(Conversation, col(Conversation.id) == col(Message.conversation_id))
            .where(
                Conversation.transport == place.transport,
                Conversation.guild_id == place.guild_id,
                Conversation.channel_id == place.channel_id,
                Message.role == "assistant",
            )
            .order_by(col(Message.created_at).desc(), col(Message.id).desc())
        )
        if external_id is not None:
            query = query.where(Message.external_id == external_id)
        answer = session.exec(query).first()
        if answer is None:
            return None
        session.add(Approval(message_id=answer.id, approved_by=user_id))
        try:
            session.commit()
        except IntegrityError:  # approved before: once is enough
            session.rollback()
        return answer


async def approve_answer(memory: Memory, place: Place, user_id: str, external_id: str | None = None) -> Message | None:
    """Approve for training the bot's answer in `place` posted as `external_id` (a reaction on
    it), or its latest answer there (/good); None when there is no such answer."""
    return await asyncio.to_thread(_approve, memory, place, user_id, external_id)


# -- dataset --------------------------------------------------------------------------------


def _exchanges(memory: Memory) -> list[tuple[list[dict[str, str]], str]]:
    """Approved answers with the user turn before each, in enabled channels, scrubbed; each with
    the asker's id (kept out of the files; see `_write_dataset`)."""
    with Session(memory.engine) as session:
        enabled = {
            (row.guild_id, row.channel_id)
            for row in session.exec(select(ScopeSetting).where(ScopeSetting.key == ENABLED))
            if json.loads(row.value) is True
        }
        approved = session.exec(
            select(Message, Conversation)
            .join(Approval, col(Approval.message_id) == col(Message.id))
            .join(Conversation, col(Conversation.id) == col(Message.conversation_id))
            .order_by(col(Message.id))
        ).all()
        examples = []
        for answer, conv in approved:
            if (conv.guild_id, conv.channel_id) not in enabled:
                continue
            question = session.exec(
                select(Message)
                .where(
                    Message.conversation_id == answer.conversation_id,
                    Message.role == "user",
                    col(Message.id) < answer.id,
                )
                .order_by(col(Message.id).desc())
            ).first()
            if question is None:
                continue
            ids = [question.author_id, question.author_name, conv.guild_id, conv.channel_id]
            exchange = [
                {"role": "user", "content": scrub(question.content, ids)},
                {"role": "assistant", "content": scrub(answer.content, ids)},
            ]
            examples.append((exchange, question.author_id))
        return examples


def contributor_key(user_id: str) -> str:
    """What a dataset keeps of an example's author: a hash, enough to find and drop their examples
    when they are erased, not to read who they are."""
    return hashlib.sha256(f"quill-contributor:{user_id}".encode()).hexdigest()[:32]


def _write_dataset(examples: list[tuple[list[dict[str, str]], str]], folder: Path, heldout_fraction: float) -> Dataset:
    folder.mkdir(parents=True, exist_ok=True)
    shuffled = examples[:]
    random.Random(0).shuffle(shuffled)  # a fixed split: the same data gives the same files
    n_heldout = max(1, round(len(shuffled) * heldout_fraction))
    parts = {"heldout": shuffled[:n_heldout], "train": shuffled[n_heldout:]}
    digest = hashlib.sha256()
    for name, rows in parts.items():
        data = "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m, _ in rows)
        (folder / f"{name}.jsonl").write_text(data, encoding="utf-8")
        digest.update(data.encode())
    contributors = {name: [contributor_key(author) for _, author in rows] for name, rows in parts.items()}
    (folder / CONTRIBUTORS).write_text(json.dumps(contributors), encoding="utf-8")
    train, heldout = folder / "train.jsonl", folder / "heldout.jsonl"
    return Dataset(folder, train, heldout, len(parts["train"]), n_heldout, digest.hexdigest())


async def export_dataset(ctx: PluginContext) -> Dataset:
    """Build and write the dataset; at least two approved exchanges are needed (train + held out)."""
    examples = await asyncio.to_thread(_exchanges, ctx.memory)
    if len(examples) < 2:
        raise FinetuneError(
            f"Only {len(examples)} approved exchange(s) in enabled channels; approve answers with /good "
            "in channels where /finetune enable was run."
        )
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    folder = ctx.settings.data_dir / "finetune" / "datasets" / stamp
    return await asyncio.to_thread(_write_dataset, examples, folder, ctx.settings.finetune_heldout_fraction)


# -- runs -----------------------------------------------------------------------------------


def _runs(memory: Memory, *statuses: str) -> list[FinetuneRun]:
    with Session(memory.engine, expire_on_commit=False) as session:
        query = select(FinetuneRun).order_by(col(FinetuneRun.id).desc())
        if statuses:
            query = query.where(col(FinetuneRun.status).in_(statuses))
        return list(session.exec(query))


def _save(memory: Memory, *runs: FinetuneRun) -> None:
    with Session(memory.engine, expire_on_commit=False) as session:
        for run in runs:
            session.add(run)
        session.commit()


async def deployed(memory: Memory) -> FinetuneRun | None:
    """The run whose adapter is served now."""
    found = await asyncio.to_thread(_runs, memory, "deployed")
    return found[0] if found else None


async def restore_adapter(ctx: PluginContext) -> None:
    """At start-up, serve the deployed adapter again (if the engine can and the file exists)."""
    if "lora" not in ctx.engine.features:
        return
    run = await deployed(ctx.memory)
    if run is not None and Path(run.adapter_path).is_file():
        await ctx.engine.set_adapter(Path(run.adapter_path))


def training_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in EXTRA_PACKAGES)


async def child(args: Sequence[str], log_path: Path) -> AsyncIterator[dict[str, Any]]:
    """Run `python -m bot.train ARGS`, yielding its JSON events; its stderr goes to `log_path`."""
    with log_path.open("ab") as errors:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot.train", *args, stdout=asyncio.subprocess.PIPE, stderr=errors
        )
        assert proc.stdout is not None
        try:
            async for line in proc.stdout:
                if line.startswith(b"{"):
                    yield json.loads(line)
            code = await proc.wait()
        finally:
            if proc.returncode is None:  # the bot stops mid-run: do not leave training behind
                proc.kill()
                await proc.wait()
    if code != 0:
        raise FinetuneError(f"The training process failed (exit {code}); see {log_path}.")


async def run_finetune(ctx: PluginContext, dataset: Dataset, adapter: Path | None = None) -> AsyncIterator[str]:
    """Train (or, given `adapter`, only evaluate) and deploy if the held-out NLL improved.

    Yields progress lines; the run and its figures are recorded whatever the outcome."""
    s = ctx.settings
    folder = s.data_dir / "finetune" / "adapters"
    folder.mkdir(parents=True, exist_ok=True)
    run = FinetuneRun(
        status="training",
        base_model=str(s.model_path),
        dataset_path=str(dataset.folder),
        dataset_sha256=dataset.sha256,
        n_train=dataset.n_train,
        n_heldout=dataset.n_heldout,
    )
    await asyncio.to_thread(_save, ctx.memory, run)
    out = adapter or folder / f"run-{run.id}.gguf"
    run.adapter_path = str(out)
    args = ["eval", "--model", str(s.model_path), "--heldout", str(dataset.heldout), "--out", str(out)]
    if adapter is None:
        args[0] = "train"
        args += ["--train", str(dataset.train), "--rank", str(s.finetune_lora_rank)]
        args += ["--epochs", str(s.finetune_epochs), "--lr", str(s.finetune_learning_rate)]
    args += ["--threads", str(s.finetune_threads)]
    try:
        async for event in child(args, folder / f"run-{run.id}.log"):
            if event["event"] == "step":
                yield f"step {event['step']}/{event['steps']}  loss {event['loss']:.3f}\n"
                log.info("fine-tune run %s: %s", run.id, event)
            elif event["event"] == "start":
                yield f"training on {dataset.n_train} exchanges, {event['steps']} steps\n"
            elif event["event"] == "eval":
                run.nll_before, run.nll_after = event["before"], event["after"]
    except BaseException as exc:
        run.status, run.note = "failed", str(exc)
        await asyncio.to_thread(_save, ctx.memory, run)
        raise
    if run.nll_before is None or run.nll_after is None:
        run.status, run.note = "failed", "no evaluation came back"
    elif run.nll_after < run.nll_before:
        current = await deployed(ctx.memory)
        await ctx.engine.set_adapter(out)
        run.status = "deployed"
        if current is not None:
            current.status = "retired"
            await asyncio.to_thread(_save, ctx.memory, current)
    else:
        run.status, run.note = "rejected", "held-out NLL did not improve"
    await asyncio.to_thread(_save, ctx.memory, run)
    yield f"run {run.id}: {describe(run)}\n"


def describe(run: FinetuneRun) -> str:
    figures = ""
    if run.nll_before is not None and run.nll_after is not None:
        figures = f", held-out NLL/token {run.nll_before:.3f} -> {run.nll_after:.3f}"
    verdict = {
        "deployed": "deployed (served now)",
        "rejected": "not deployed: the held-out loss did not improve",
    }.get(run.status, run.status)
    note = f" ({run.note})" if run.note and (run.status == "failed" or ERASED_NOTE in run.note) else ""
    data = f"dataset {run.dataset_path} ({run.n_train} train, {run.n_heldout} held out)"
    return f"{verdict}{figures}; {data}{note}"


async def rollback(ctx: PluginContext) -> str:
    """Swap back to the adapter deployed before the current one, or to the base model."""
    current = await deployed(ctx.memory)
    if current is None:
        return "No fine-tuned adapter is deployed; the base model is served."
    retired = await asyncio.to_thread(_runs, ctx.memory, "retired")
    previous = next((r for r in retired if Path(r.adapter_path).is_file()), None)
    await ctx.engine.set_adapter(Path(previous.adapter_path) if previous else None)
    current.status = "rolled_back"
    changed = [current]
    if previous is not None:
        previous.status = "deployed"
        changed.append(previous)
    await asyncio.to_thread(_save, ctx.memory, *changed)
    return f"Rolled back run {current.id}; now serving " + (
        f"run {previous.id}'s adapter." if previous else "the base model."
    )


# -- commands -------------------------------------------------------------------------------

_training: asyncio.Task[None] | None = None  # one training run per process at a time

FINETUNE_USAGE = "/finetune enable | disable | export | train | status | rollback"


async def good(ctx: PluginContext, request: Request) -> Reply:
    place = Place(request.transport, request.guild_id, request.channel_id)
    answer = await approve_answer(ctx.memory, place, request.author_id)
    if answer is None:
        return Reply("I have not answered anything here yet.", failed=True)
    return Reply("Thanks: that answer is kept as a good example for fine-tuning.")


async def _progress(ctx: PluginContext, dataset: Dataset) -> AsyncIterator[str]:
    """Run training as a task of its own (leaving the reply early does not stop it) and pass
    its progress lines on."""
    global _training
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    async def train() -> None:
        try:
            async for line in run_finetune(ctx, dataset):
                lines.put_nowait(line)
        except Exception as exc:
            log.exception("fine-tune failed")
            lines.put_nowait(f"fine-tuning failed: {exc}\n")
        finally:
            lines.put_nowait(None)

    _training = asyncio.create_task(train(), name="quill-finetune")
    yield f"dataset {dataset.folder}: {dataset.n_train} train, {dataset.n_heldout} held out\n"
    while (line := await lines.get()) is not None:
        yield line


async def finetune(ctx: PluginContext, request: Request) -> Reply:
    action = request.text.strip().lower()
    try:
        if action in ("enable", "disable"):
            await ctx.memory.set_setting(request.guild_id, request.channel_id, ENABLED, action == "enable")
            return Reply(
                f"Fine-tuning {'will' if action == 'enable' else 'will not'} learn from approved answers "
                f"in this channel ({request.channel_id})."
            )
        if action == "export":
            data = await export_dataset(ctx)
            return Reply(f"Exported {data.n_train} train, {data.n_heldout} held out to {data.folder}")
        if action == "status":
            runs = await asyncio.to_thread(_runs, ctx.memory)
            if not runs:
                return Reply("No fine-tune runs yet. " + ("" if training_available() else HOW_TO_ENABLE))
            lines = [f"run {r.id}: {describe(r)}" for r in runs[:5]]
            if _training is not None and not _training.done():
                lines.insert(0, "A training run is in progress.")
            return Reply("\n".join(lines), title="Fine-tuning")
        if action == "rollback":
            return Reply(await rollback(ctx))
        if action == "train":
            if not training_available():
                return Reply(HOW_TO_ENABLE, failed=True)
            if "lora" not in ctx.engine.features:
                return Reply("This model backend cannot serve LoRA adapters.", failed=True)
            if _training is not None and not _training.done():
                return Reply("A training run is already in progress; /finetune status shows it.", failed=True)
            data = await export_dataset(ctx)
            if data.n_train + data.n_heldout < ctx.settings.finetune_min_examples:
                return Reply(
                    f"{data.n_train + data.n_heldout} approved exchanges; training needs at least "
                    f"{ctx.settings.finetune_min_examples} (QUILL_FINETUNE_MIN_EXAMPLES).",
                    failed=True,
                )
            return Reply(stream=_progress(ctx, data), title="Fine-tuning")
    except FinetuneError as exc:
        return Reply(str(exc), failed=True)
    return Reply(f"Usage: {FINETUNE_USAGE}", failed=True)


def _forget_contributor(ctx: PluginContext, user_id: str) -> int:
    """Drop a user's examples from every dataset and mark the runs trained on them: an adapter
    cannot unlearn, so admins see which ones to retrain (`/finetune status`)."""
    key = contributor_key(user_id)
    removed_from: dict[str, int] = {}
    for listing in sorted((ctx.settings.data_dir / "finetune" / "datasets").glob(f"*/{CONTRIBUTORS}")):
        contributors = json.loads(listing.read_text(encoding="utf-8"))
        dropped = 0
        for name, keys in contributors.items():
            part = listing.parent / f"{name}.jsonl"
            lines = part.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [(line, k) for line, k in zip(lines, keys, strict=True) if k != key]
            dropped += len(lines) - len(kept)
            part.write_text("".join(line for line, _ in kept), encoding="utf-8")
            contributors[name] = [k for _, k in kept]
        if dropped:
            listing.write_text(json.dumps(contributors), encoding="utf-8")
            removed_from[str(listing.parent)] = dropped
    if removed_from:
        stamp = utcnow().date().isoformat()
        with Session(ctx.memory.engine) as session:
            for run in session.exec(select(FinetuneRun).where(col(FinetuneRun.dataset_path).in_(removed_from))):
                count = removed_from[run.dataset_path]
                run.note = f"{run.note}; " * bool(run.note) + f"{ERASED_NOTE} ({count} examples, {stamp}): retrain"
                session.add(run)
            session.commit()
    return sum(removed_from.values())


@hookimpl
async def forget_user(context: PluginContext, user_id: str) -> int:
    return await asyncio.to_thread(_forget_contributor, context, user_id)


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(Command("good", "mark my last answer here as a good example to learn from", good))
    register(
        Command(
            "finetune",
            "learn from approved answers: enable/disable this channel, export, train, status, rollback",
            finetune,
            usage="enable|disable|export|train|status|rollback",
            admin=True,
        )
    )
