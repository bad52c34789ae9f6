"""The fine-tune loop: approved answers -> dataset -> LoRA adapter -> eval gate -> hot swap.

1. People approve good answers (`/good` approves the latest; a Discord 👍 the answer it is on).
2. `/finetune export` builds a chat-format JSONL dataset from approved exchanges in channels
   where fine-tuning is enabled (`/finetune enable`), with ids, emails and tokens scrubbed,
   split into train and held-out files by groups of near-duplicate questions (never both sides).
3. `/finetune train` trains a LoRA adapter in a child process (`python -m bot.builtin.train`; torch
   never enters the bot's process), streaming its steps and loss back as the reply.
4. Eval gate: llama.cpp measures NLL per answer token without and with the adapter, on the
   held-out part and on a shipped general-chat set; an adapter is deployed (`engine.set_adapter`,
   between requests) only if the held-out part holds enough groups, its NLL fell, and general
   chat got no more than QUILL_FINETUNE_MAX_REGRESSION worse. Every figure is kept with the run;
   a refused adapter stays on disk, and `/finetune deploy RUN` serves it anyway (logged).
5. The previous adapter is kept: `/finetune rollback` swaps back to it (or to the base model).

A built-in plugin (bot/plugins.py CORE_PLUGINS): its commands reach the fine-tune tables directly,
and a 👍 reaches it through the `on_reaction` hook.
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
import unicodedata
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import Field
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from bot.api import (
    N_,
    ChannelSettings,
    Command,
    Page,
    Place,
    PluginContext,
    PluginSettings,
    QuillError,
    Reaction,
    Redirect,
    Reply,
    Request,
    Series,
    Text,
    WebPage,
    WebRequest,
    _,
    chart_font,
    error_text,
    hookimpl,
    line_chart,
)
from bot.memory import Memory
from bot.models import Approval, Conversation, FinetuneRun, Message, ScopeSetting, utcnow

log = logging.getLogger(__name__)

APPROVE_EMOJI = "👍"
# The regression check's general-chat set, shipped with quill (written for it, English and Chinese).
GENERAL_SET = Path(__file__).parent / "data" / "general_chat.jsonl"
GENERAL_BASE_CACHE = "general-base-nll.json"  # the base model's figure on it, per model file
CONTRIBUTORS = "contributors.json"  # per dataset: a contributor key per line of each part
ERASED_NOTE = "trained on data of a since-erased user"
TEMPLATES = Path(__file__).parent / "templates" / "finetune"
EXTRA_PACKAGES = ("torch", "transformers", "peft", "gguf")
HOW_TO_ENABLE = N_(
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


# -- near-duplicate questions ------------------------------------------------------------------
# Approving the same question twice (or with other punctuation, case, full-width forms, a
# "please") must not put it on both sides of the split: the held-out loss would then measure
# recall of a trained answer. Questions are compared by their content words (English) and
# character bigrams (Chinese, Japanese, Korean), once function words are dropped.

NEAR_DUPLICATE = 0.75  # Jaccard similarity of content tokens from which two questions are one
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN = re.compile(rf"(?P<cjk>[{_CJK}]+)|(?P<word>[^\W_{_CJK}]+)")
_EN_STOP = (
    "a an the i me my we our you your it its is are was were be been am do does did can could "
    "would should will shall may might must how what why where when which who whom to of in on "
    "at for from with by and or so if please pls hi hello hey thanks thank there this that these "
    "those any some about just really tell explain"
)
_STOP_WORDS = frozenset(_EN_STOP.split())
# Chinese function words and question phrasing, dropped from runs of CJK text (longest first).
_ZH_STOP = (
    "请问 请 如何 怎么样 怎么 怎样 为什么 什么 哪里 哪个 能不能 可不可以 可以 能否 应该 一下 我们 你们 "
    "他们 我 你 您 他 她 它 的 地 得 了 吗 呢 吧 啊 呀 嘛 和 与 或"
)
_CJK_STOP_RE = re.compile("|".join(map(re.escape, sorted(_ZH_STOP.split(), key=len, reverse=True))))
_TOKEN_TEXT = re.compile(r"[^\W_]+")


def question_tokens(text: str) -> frozenset[str]:
    """The content of a question as a set of tokens: width, case and punctuation folded,
    function words dropped, English words singular-ish, CJK text as character bigrams."""
    text = unicodedata.normalize("NFKC", text).casefold()
    tokens: set[str] = set()
    cjk = []  # spaces between Chinese words are incidental: its content is read as one run
    for match in _TOKEN.finditer(text):
        if word := match.group("word"):
            if word not in _STOP_WORDS:
                tokens.add(word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word)
        else:
            cjk.append(_CJK_STOP_RE.sub("", match.group("cjk")))
    run = "".join(cjk)
    tokens.update(run[i : i + 2] for i in range(len(run) - 1))
    if len(run) == 1:
        tokens.add(run)
    # A question of function words only ("how are you?") is compared as a whole.
    return frozenset(tokens) or frozenset({"".join(_TOKEN_TEXT.findall(text))})


def group_questions(questions: Sequence[str]) -> list[list[int]]:
    """Indexes of `questions` grouped so that near-duplicates (and their near-duplicates) share
    a group; groups in order of their first question."""
    token_sets = [question_tokens(q) for q in questions]
    parent = list(range(len(questions)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[frozenset[str], int] = {}
    distinct = []  # one index per distinct token set: exact duplicates cost nothing below
    for i, tokens in enumerate(token_sets):
        if tokens in first:
            parent[i] = first[tokens]
        else:
            first[tokens] = i
            distinct.append(i)
    for n, i in enumerate(distinct):
        for j in distinct[:n]:
            a, b = token_sets[i], token_sets[j]
            if len(a & b) >= NEAR_DUPLICATE * len(a | b):
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(questions)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def split_groups(groups: list[list[int]], heldout_fraction: float, min_heldout_groups: int) -> list[list[int]]:
    """The groups to hold out: whole groups, drawn in a fixed order (the same data gives the same
    split), until they hold `heldout_fraction` of the examples and `min_heldout_groups` groups,
    leaving training at least as many groups; with too few groups for that, about half of them
    (the eval gate then refuses to deploy: see `gate_problem`)."""
    order = groups[:]
    random.Random(0).shuffle(order)
    target = max(1, round(sum(map(len, groups)) * heldout_fraction))
    want = min_heldout_groups if len(groups) >= 2 * min_heldout_groups else len(groups) // 2
    keep_for_training = max(1, want)
    held: list[list[int]] = []
    for group in order:
        if len(held) >= len(groups) - keep_for_training or (len(held) >= want and sum(map(len, held)) >= target):
            break
        held.append(group)
    return held


class FinetuneSettings(PluginSettings):
    """QUILL_FINETUNE_*: the LoRA training run and the eval gate that decides its deployment."""

    heldout_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of approved exchanges held out for the eval gate."
    )
    lora_rank: int = Field(8, ge=1, le=256, description="LoRA rank.")
    epochs: int = Field(4, ge=1, le=100, description="Training epochs.")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Training learning rate.")
    min_examples: int = Field(8, ge=2, description="Fewest approved exchanges needed before training starts.")
    threads: int = Field(1, ge=1, description="Threads of the training child process (it competes with replies).")
    min_heldout_groups: int = Field(
        4, ge=1, description="Groups of distinct questions the held-out part needs, or nothing is deployed."
    )
    max_regression: float = Field(
        0.05,
        ge=0,
        description="Largest rise of the general-chat NLL an adapter may cause and still deploy (0.05: 5 %).",
    )
    general_sample: int = Field(
        64, ge=1, description="Exchanges of the shipped general set the gate measures (English and Chinese alternate)."
    )


class FinetuneChannel(ChannelSettings):
    """Whether a channel's approved answers are learned from (/finetune enable)."""

    enabled: bool = Field(False, description="Learn from approved answers in this channel.")


class FinetuneError(QuillError):
    """A fine-tune step that cannot go on; the message is fit to show a user."""


@dataclass(frozen=True)
class Dataset:
    folder: Path
    train: Path
    heldout: Path
    n_train: int
    n_heldout: int
    sha256: str
    # Groups of near-duplicate questions in all, and in the held-out part.
    n_groups: int = 0
    n_heldout_groups: int = 0

    def summary(self) -> str:
        return _(
            "{train} train, {heldout} held out; {groups} groups of distinct questions, {heldout_groups} of them "
            "held out",
            train=self.n_train,
            heldout=self.n_heldout,
            groups=self.n_groups,
            heldout_groups=self.n_heldout_groups,
        )


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


def _exchanges(memory: Memory, enabled_key: str) -> list[tuple[list[dict[str, str]], str]]:
    """Approved answers with the user turn before each, in enabled channels, scrubbed; each with
    the asker's id (kept out of the files; see `_write_dataset`)."""
    with Session(memory.engine) as session:
        enabled = {
            (row.guild_id, row.channel_id)
            for row in session.exec(select(ScopeSetting).where(ScopeSetting.key == enabled_key))
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


def _write_dataset(
    examples: list[tuple[list[dict[str, str]], str]], folder: Path, heldout_fraction: float, min_heldout_groups: int
) -> Dataset:
    folder.mkdir(parents=True, exist_ok=True)
    groups = group_questions([messages[0]["content"] for messages, _ in examples])
    held = split_groups(groups, heldout_fraction, min_heldout_groups)
    heldout_rows = {i for group in held for i in group}
    parts = {
        "heldout": [e for i, e in enumerate(examples) if i in heldout_rows],
        "train": [e for i, e in enumerate(examples) if i not in heldout_rows],
    }
    digest = hashlib.sha256()
    for name, rows in parts.items():
        data = "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m, _ in rows)
        (folder / f"{name}.jsonl").write_text(data, encoding="utf-8")
        digest.update(data.encode())
    contributors = {name: [contributor_key(author) for _, author in rows] for name, rows in parts.items()}
    (folder / CONTRIBUTORS).write_text(json.dumps(contributors), encoding="utf-8")
    train, heldout = folder / "train.jsonl", folder / "heldout.jsonl"
    n_train, n_heldout = len(parts["train"]), len(parts["heldout"])
    return Dataset(folder, train, heldout, n_train, n_heldout, digest.hexdigest(), len(groups), len(held))


async def export_dataset(ctx: PluginContext) -> Dataset:
    """Build and write the dataset; at least two approved exchanges are needed (train + held out)."""
    enabled_key = ctx.registry.entry(FinetuneChannel).key("enabled")
    examples = await asyncio.to_thread(_exchanges, ctx.memory, enabled_key)
    if len(examples) < 2:
        raise FinetuneError(
            Text(
                "Only {count} approved exchange(s) in enabled channels; approve answers with /good in channels "
                "where /finetune enable was run.",
                count=len(examples),
            )
        )
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    folder = ctx.settings.data_dir / "finetune" / "datasets" / stamp
    config = ctx.config(FinetuneSettings)
    return await asyncio.to_thread(_write_dataset, examples, folder, config.heldout_fraction, config.min_heldout_groups)


# -- runs -----------------------------------------------------------------------------------


def _runs(memory: Memory, *statuses: str) -> list[FinetuneRun]:
    with Session(memory.engine, expire_on_commit=False) as session:
        query = select(FinetuneRun).order_by(col(FinetuneRun.id).desc())
        if statuses:
            query = query.where(col(FinetuneRun.status).in_(statuses))
        return list(session.exec(query))


def _run(memory: Memory, run_id: int) -> FinetuneRun | None:
    with Session(memory.engine, expire_on_commit=False) as session:
        return session.get(FinetuneRun, run_id)


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
    """Run `python -m bot.builtin.train ARGS`, yielding its JSON events; its stderr goes to `log_path`."""
    with log_path.open("ab") as errors:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot.builtin.train", *args, stdout=asyncio.subprocess.PIPE, stderr=errors
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
        raise FinetuneError(Text("The training process failed (exit {code}); see {log}.", code=code, log=str(log_path)))


def gate_problem(dataset: Dataset, min_heldout_groups: int) -> str | None:
    """Why `dataset` cannot judge an adapter (too few distinct questions to hold some out), or None."""
    if dataset.n_heldout_groups >= min_heldout_groups:
        return None
    return (
        f"too few distinct questions for a held-out check: {dataset.n_groups} group(s) among "
        f"{dataset.n_train + dataset.n_heldout} approved exchanges (near-duplicates count once); the gate "
        f"holds out {min_heldout_groups} and trains on at least as many, so approve answers to at least "
        f"{2 * min_heldout_groups} different questions (QUILL_FINETUNE_MIN_HELDOUT_GROUPS)"
    )


def decide(figures: dict[str, Any], max_regression: float) -> tuple[bool, str]:
    """The eval gate: deploy only if the held-out NLL fell and the general-chat NLL did not rise
    by more than `max_regression` (a fraction)."""
    held, general = figures["heldout"], figures["general"]
    if held["adapter"] >= held["base"]:
        return False, f"the held-out NLL did not improve ({held['base']:.3f} -> {held['adapter']:.3f})"
    if general["change"] > max_regression:
        return False, (
            f"general chat got worse: its NLL rose {general['change']:+.1%} ({general['base']:.3f} -> "
            f"{general['adapter']:.3f}), more than the {max_regression:.0%} allowed (QUILL_FINETUNE_MAX_REGRESSION)"
        )
    return True, (
        f"held-out NLL fell {held['adapter'] / held['base'] - 1:+.1%}; general chat {general['change']:+.1%} "
        f"(at most +{max_regression:.0%})"
    )


def figures_of(run: FinetuneRun) -> dict[str, Any]:
    return json.loads(run.figures or "{}")


async def run_finetune(ctx: PluginContext, dataset: Dataset, adapter: Path | None = None) -> AsyncIterator[str]:
    """Train (or, given `adapter`, only evaluate) and deploy if the eval gate says so.

    Yields progress lines; the run and all its figures are recorded whatever the outcome."""
    s, config = ctx.settings, ctx.config(FinetuneSettings)
    folder = s.data_dir / "finetune" / "adapters"
    folder.mkdir(parents=True, exist_ok=True)
    groups = {
        "exchanges": dataset.n_train + dataset.n_heldout,
        "groups": dataset.n_groups,
        "train": dataset.n_groups - dataset.n_heldout_groups,
        "heldout": dataset.n_heldout_groups,
    }
    figures: dict[str, Any] = {"groups": groups, "losses": []}
    run = FinetuneRun(
        status="training",
        base_model=str(s.model_path),
        dataset_path=str(dataset.folder),
        dataset_sha256=dataset.sha256,
        n_train=dataset.n_train,
        n_heldout=dataset.n_heldout,
    )
    problem = gate_problem(dataset, config.min_heldout_groups)
    if problem is not None:  # never trained: nothing could tell whether it helps
        figures["decision"] = {"deploy": False, "reason": problem}
        run.status, run.figures = "rejected", json.dumps(figures)
        await asyncio.to_thread(_save, ctx.memory, run)
        yield _("run {id}: {summary}", id=run.id, summary=describe(run)) + "\n"
        return
    await asyncio.to_thread(_save, ctx.memory, run)
    out = adapter or folder / f"run-{run.id}.gguf"
    run.adapter_path = str(out)
    args = ["eval", "--model", str(s.model_path), "--heldout", str(dataset.heldout), "--out", str(out)]
    if adapter is None:
        args[0] = "train"
        args += ["--train", str(dataset.train), "--rank", str(config.lora_rank)]
        args += ["--epochs", str(config.epochs), "--lr", str(config.learning_rate)]
    args += ["--general", str(GENERAL_SET), "--general-sample", str(config.general_sample)]
    args += ["--base-cache", str(folder.parent / GENERAL_BASE_CACHE), "--threads", str(config.threads)]
    try:
        async for event in child(args, folder / f"run-{run.id}.log"):
            if event["event"] == "step":
                figures["losses"].append(event["loss"])
                yield _(
                    "step {step}/{steps}  loss {loss}",
                    step=event["step"],
                    steps=event["steps"],
                    loss=f"{event['loss']:.3f}",
                )
                yield "\n"
                log.info("fine-tune run %s: %s", run.id, event)
            elif event["event"] == "start":
                yield (
                    _("training on {count} exchanges, {steps} steps", count=dataset.n_train, steps=event["steps"])
                    + "\n"
                )
            elif event["event"] == "eval":
                general = event["general"]
                general["change"] = round(general["adapter"] / general["base"] - 1, 4)
                figures.update(heldout=event["heldout"], general=general, eval_seconds=event["seconds"])
                run.nll_before, run.nll_after = event["heldout"]["base"], event["heldout"]["adapter"]
    except BaseException as exc:
        run.status, run.note, run.figures = "failed", str(exc), json.dumps(figures)
        await asyncio.to_thread(_save, ctx.memory, run)
        raise
    if "heldout" not in figures:
        run.status, run.note = "failed", "no evaluation came back"
    else:
        deploy, reason = decide(figures, config.max_regression)
        figures["decision"] = {"deploy": deploy, "reason": reason}
        if deploy:
            await _serve(ctx, run)
        else:
            run.status = "rejected"
    run.figures = json.dumps(figures)
    await asyncio.to_thread(_save, ctx.memory, run)
    yield _("run {id}: {summary}", id=run.id, summary=describe(run)) + "\n"


async def _serve(ctx: PluginContext, run: FinetuneRun) -> None:
    """Swap `run`'s adapter in; the one served before becomes the rollback target."""
    current = await deployed(ctx.memory)
    await ctx.engine.set_adapter(Path(run.adapter_path))
    run.status = "deployed"
    if current is not None and current.id != run.id:
        current.status = "retired"
        await asyncio.to_thread(_save, ctx.memory, current)


async def deploy_anyway(ctx: PluginContext, run_id: int) -> str:
    """Serve a refused run's adapter because an admin asked for it, and log that the gate was
    overruled (the log, and the run's note that /finetune status shows)."""
    run = await asyncio.to_thread(_run, ctx.memory, run_id)
    if run is None:
        raise FinetuneError(Text("There is no fine-tune run {id}; /finetune status lists them.", id=run_id))
    if run.status == "deployed":
        return _("Run {id}'s adapter is already served.", id=run.id)
    if not run.adapter_path or not Path(run.adapter_path).is_file():
        raise FinetuneError(
            Text("Run {id} has no adapter file to deploy ({status}).", id=run.id, status=_status(run.status))
        )
    reason = figures_of(run).get("decision", {}).get("reason", "no gate decision")
    await _serve(ctx, run)
    stamp = utcnow().strftime("%Y-%m-%d %H:%M UTC")
    run.note = f"{run.note}; " * bool(run.note) + f"deployed by an admin on {stamp} despite the gate ({reason})"
    await asyncio.to_thread(_save, ctx.memory, run)
    log.warning("fine-tune run %s deployed explicitly by an admin, overruling the gate: %s", run.id, reason)
    return _(
        "Run {id}'s adapter is served now, overruling the gate: {reason}. /finetune rollback undoes it.",
        id=run.id,
        reason=reason,
    )


# A run's status as /finetune status shows it.
STATUSES = {
    "training": N_("training"),
    "deployed": N_("deployed (served now)"),
    "failed": N_("failed"),
    "retired": N_("retired"),
    "rolled_back": N_("rolled back"),
}


def _status(status: str) -> str:
    return _(STATUSES[status]) if status in STATUSES else status


def describe(run: FinetuneRun) -> str:
    """A run on one line: its verdict, held-out figures, dataset and note. The gate's reason and
    the note are stored as written when the run ended (in English)."""
    reason = figures_of(run).get("decision", {}).get("reason", "")
    verdict = _("not deployed: {reason}", reason=reason) if run.status == "rejected" else _status(run.status)
    if run.nll_before is not None and run.nll_after is not None:
        verdict = _(
            "{verdict}, held-out NLL/token {before} -> {after}",
            verdict=verdict,
            before=f"{run.nll_before:.3f}",
            after=f"{run.nll_after:.3f}",
        )
    data = _(
        "dataset {path} ({train} train, {heldout} held out)",
        path=run.dataset_path,
        train=run.n_train,
        heldout=run.n_heldout,
    )
    line = _("{verdict}; {dataset}", verdict=verdict, dataset=data)
    return _("{summary} ({note})", summary=line, note=run.note) if run.note else line


def details(run: FinetuneRun) -> list[str]:
    """Every figure of a run, one line each, for /finetune status."""
    f = figures_of(run)
    lines = []
    if groups := f.get("groups"):
        lines.append(
            _(
                "groups of distinct questions: {groups} among {exchanges} exchanges ({train} train, {heldout} "
                "held out)",
                groups=groups["groups"],
                exchanges=groups["exchanges"],
                train=groups["train"],
                heldout=groups["heldout"],
            )
        )
    if losses := f.get("losses"):
        lines.append(
            _(
                "train loss: {steps} steps, {first} -> {last} (lowest {lowest})",
                steps=len(losses),
                first=f"{losses[0]:.3f}",
                last=f"{losses[-1]:.3f}",
                lowest=f"{min(losses):.3f}",
            )
        )
    names = {"heldout": N_("held-out NLL/answer token"), "general": N_("general-chat NLL/answer token")}
    for key, name in names.items():
        if nll := f.get(key):
            change = nll["adapter"] / nll["base"] - 1 if nll["base"] else 0.0
            lines.append(
                _(
                    "{what}: base {base}, adapter {adapter} ({change}; {count} exchanges)",
                    what=_(name),
                    base=f"{nll['base']:.3f}",
                    adapter=f"{nll['adapter']:.3f}",
                    change=f"{change:+.1%}",
                    count=nll["examples"],
                )
            )
    if decision := f.get("decision"):
        verdict = N_("deploy: {reason}") if decision["deploy"] else N_("refused: {reason}")
        lines.append(_(verdict, reason=decision["reason"]))
    return [f"  {line}" for line in lines]


async def rollback(ctx: PluginContext) -> str:
    """Swap back to the adapter deployed before the current one, or to the base model."""
    current = await deployed(ctx.memory)
    if current is None:
        return _("No fine-tuned adapter is deployed; the base model is served.")
    retired = await asyncio.to_thread(_runs, ctx.memory, "retired")
    previous = next((r for r in retired if Path(r.adapter_path).is_file()), None)
    await ctx.engine.set_adapter(Path(previous.adapter_path) if previous else None)
    current.status = "rolled_back"
    changed = [current]
    if previous is not None:
        previous.status = "deployed"
        changed.append(previous)
    await asyncio.to_thread(_save, ctx.memory, *changed)
    if previous is None:
        return _("Rolled back run {id}; now serving the base model.", id=current.id)
    return _("Rolled back run {id}; now serving run {previous}'s adapter.", id=current.id, previous=previous.id)


# The chart's NLL bars, named in the reader's language.
CHART_BARS = {"heldout": N_("held-out"), "general": N_("general chat")}


def chart(run: FinetuneRun, path: Path) -> Path | None:
    """Draw a run's figures as a PNG (train loss per step; held-out and general NLL, base against
    adapter) for people who would rather look than read; None when the run has no figures."""
    from PIL import Image, ImageDraw

    f = figures_of(run)
    losses: list[float] = f.get("losses", [])
    bars = [(_(name), f[key]) for key, name in CHART_BARS.items() if key in f]
    if not losses and not bars:
        return None
    width, height, pad = 760, 300, 36
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = chart_font(11)
    verdict = _status("deployed" if f.get("decision", {}).get("deploy") else run.status)
    draw.text((pad, 8), _("fine-tune run {id}: {status}", id=run.id, status=verdict), fill="black", font=font)
    # Left: train loss per step.
    left, top, right, bottom = pad, pad, width // 2 - pad // 2, height - pad
    draw.rectangle((left, top, right, bottom), outline="#999999")
    draw.text((left, bottom + 6), _("train loss per step ({count} steps)", count=len(losses)), fill="black", font=font)
    if losses:
        high, low = max(losses), min(0.0, *losses)
        span = high - low or 1.0
        points = [
            (left + (right - left) * i / max(len(losses) - 1, 1), bottom - (bottom - top) * (v - low) / span)
            for i, v in enumerate(losses)
        ]
        draw.line(points if len(points) > 1 else points * 2, fill="#1f77b4", width=2)
        draw.text((left + 4, top + 2), f"{high:.2f}", fill="#555555", font=font)
        draw.text((right - 60, bottom - 14), _("last {loss}", loss=f"{losses[-1]:.2f}"), fill="#555555", font=font)
    # Right: NLL per answer token, base (grey) against adapter (green: better, red: worse).
    left, right = width // 2 + pad // 2, width - pad
    draw.rectangle((left, top, right, bottom), outline="#999999")
    draw.text((left, bottom + 6), _("NLL per answer token: base | adapter"), fill="black", font=font)
    scale = max([max(n["base"], n["adapter"]) for _, n in bars], default=1.0) or 1.0
    slot = (right - left) / max(len(bars), 1)
    for i, (name, nll) in enumerate(bars):
        x = left + slot * i + slot * 0.15
        bar = slot * 0.3
        for j, (value, colour) in enumerate(
            [(nll["base"], "#aaaaaa"), (nll["adapter"], "#2ca02c" if nll["adapter"] <= nll["base"] else "#d62728")]
        ):
            y = bottom - (bottom - top - 20) * value / scale
            draw.rectangle((x + j * bar, y, x + (j + 1) * bar - 4, bottom), fill=colour)
            draw.text((x + j * bar, y - 13), f"{value:.2f}", fill="black", font=font)
        draw.text((x, top + 4), name, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


async def status(ctx: PluginContext) -> Reply:
    """The last runs, every figure of the latest, and its chart."""
    runs = await asyncio.to_thread(_runs, ctx.memory)
    if not runs:
        return Reply(_("No fine-tune runs yet.") + ("" if training_available() else " " + _(HOW_TO_ENABLE)))
    lines = [_("run {id}: {summary}", id=runs[0].id, summary=describe(runs[0])), *details(runs[0])]
    lines += [_("run {id}: {summary}", id=r.id, summary=describe(r)) for r in runs[1:5]]
    if _training is not None and not _training.done():
        lines.insert(0, _("A training run is in progress."))
    png = ctx.settings.data_dir / "finetune" / "charts" / f"run-{runs[0].id}.png"
    return Reply("\n".join(lines), title=_("Fine-tuning"), file=await asyncio.to_thread(chart, runs[0], png))


# -- commands -------------------------------------------------------------------------------

_training: asyncio.Task[None] | None = None  # one training run per process at a time

FINETUNE_USAGE = "/finetune enable | disable | export | train | status | rollback | deploy RUN"


async def good(ctx: PluginContext, request: Request) -> Reply:
    place = request.place
    answer = await approve_answer(ctx.memory, place, request.author_id)
    if answer is None:
        return Reply(_("I have not answered anything here yet."), failed=True)
    return Reply(_("Thanks: that answer is kept as a good example for fine-tuning."))


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
            lines.put_nowait(_("fine-tuning failed: {problem}", problem=error_text(exc)) + "\n")
        finally:
            lines.put_nowait(None)

    _training = asyncio.create_task(train(), name="quill-finetune")
    yield _("dataset {folder}: {summary}", folder=str(dataset.folder), summary=dataset.summary()) + "\n"
    while (line := await lines.get()) is not None:
        yield line


async def finetune(ctx: PluginContext, request: Request) -> Reply:
    action = request.text.strip().lower()
    config = ctx.config(FinetuneSettings)
    try:
        if action in ("enable", "disable"):
            await ctx.update(FinetuneChannel, request.place, enabled=action == "enable")
            if action == "enable":
                return Reply(
                    _(
                        "Fine-tuning will learn from approved answers in this channel ({channel}).",
                        channel=request.channel_id,
                    )
                )
            return Reply(
                _(
                    "Fine-tuning will not learn from approved answers in this channel ({channel}).",
                    channel=request.channel_id,
                )
            )
        if action == "export":
            data = await export_dataset(ctx)
            problem = gate_problem(data, config.min_heldout_groups)
            warning = "\n" + _("The eval gate would refuse it: {problem}.", problem=problem) if problem else ""
            return Reply(_("Exported {summary}, to {folder}", summary=data.summary(), folder=data.folder) + warning)
        if action == "status":
            return await status(ctx)
        if action == "rollback":
            return Reply(await rollback(ctx))
        if (deploy := re.fullmatch(r"deploy\s+(\d+)", action)) is not None:
            return Reply(await deploy_anyway(ctx, int(deploy.group(1))))
        if action == "train":
            if not training_available():
                return Reply(_(HOW_TO_ENABLE), failed=True)
            if "lora" not in ctx.engine.features:
                return Reply(_("This model backend cannot serve LoRA adapters."), failed=True)
            if _training is not None and not _training.done():
                return Reply(_("A training run is already in progress; /finetune status shows it."), failed=True)
            data = await export_dataset(ctx)
            if data.n_train + data.n_heldout < config.min_examples:
                refusal = _(
                    "{count} approved exchanges; training needs at least {least} (QUILL_FINETUNE_MIN_EXAMPLES).",
                    count=data.n_train + data.n_heldout,
                    least=config.min_examples,
                )
                return Reply(refusal, failed=True)
            if problem := gate_problem(data, config.min_heldout_groups):
                return Reply(_("Not training: {problem}.", problem=problem), failed=True)
            return Reply(stream=_progress(ctx, data), title=_("Fine-tuning"))
    except FinetuneError as exc:
        return Reply(error_text(exc), failed=True)
    return Reply(_("Usage: {usage}", usage=FINETUNE_USAGE), failed=True)


def _listings(ctx: PluginContext) -> list[Path]:
    """Each dataset's contributor listing (a contributor key per line of each part)."""
    return sorted((ctx.settings.data_dir / "finetune" / "datasets").glob(f"*/{CONTRIBUTORS}"))


def _contributed(ctx: PluginContext, user_id: str) -> dict[str, list[Any]]:
    """The user's examples in every dataset written so far, by dataset folder (for /export me)."""
    key = contributor_key(user_id)
    found: dict[str, list[Any]] = {}
    for listing in _listings(ctx):
        for name, keys in json.loads(listing.read_text(encoding="utf-8")).items():
            lines = (listing.parent / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
            mine = [json.loads(line) for line, k in zip(lines, keys, strict=True) if k == key]
            if mine:
                found.setdefault(str(listing.parent), []).extend(mine)
    return found


def _forget_contributor(ctx: PluginContext, user_id: str) -> int:
    """Drop a user's examples from every dataset and mark the runs trained on them: an adapter
    cannot unlearn, so admins see which ones to retrain (`/finetune status`)."""
    key = contributor_key(user_id)
    removed_from: dict[str, int] = {}
    for listing in _listings(ctx):
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
async def export_user(context: PluginContext, user_id: str) -> dict[str, Any] | None:
    """The user's exchanges copied into training datasets (scrubbed, as trained on)."""
    found = await asyncio.to_thread(_contributed, context, user_id)
    return {"datasets": found} if found else None


@hookimpl
def register_settings(register: Callable[[type], None]) -> None:
    register(FinetuneSettings)
    register(FinetuneChannel)


@hookimpl
async def startup(context: PluginContext) -> None:
    await restore_adapter(context)


@hookimpl
async def on_reaction(context: PluginContext, reaction: Reaction) -> str | None:
    """A 👍 on one of the bot's answers approves that answer (/good approves the latest); on a
    message that is no stored answer (help text, say) it does nothing."""
    if reaction.emoji != APPROVE_EMOJI:
        return None
    approved = await approve_answer(context.memory, reaction.place, reaction.user_id, reaction.message_id)
    if approved is None:
        return f"👍 on message {reaction.message_id}, which is not a stored answer: nothing approved"
    return f"answer {approved.id} approved by {reaction.user_id}"


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(Command("good", N_("mark my last answer here as a good example to learn from"), good))
    register(
        Command(
            "finetune",
            N_(
                "learn from approved answers: enable/disable this channel, export, train, status, rollback, "
                "deploy a refused run anyway"
            ),
            finetune,
            usage="enable|disable|export|train|status|rollback|deploy RUN",
            admin=True,
        )
    )


# -- admin panel page -----------------------------------------------------------------------


async def runs_page(ctx: PluginContext, request: WebRequest) -> Page | Redirect:
    """The fine-tune runs: each with its loss curve per step, held-out and general-chat NLL base
    against adapter, dataset size, which one is served, the erased-user warning; roll back, or
    deploy a refused run anyway."""
    if request.method == "POST":
        action = request.form.get("action", "")
        try:
            if action == "rollback":
                return Redirect(request.url(), await rollback(ctx))
            if action == "deploy" and request.form.get("run", "").isdigit():
                return Redirect(
                    request.url(run=request.form["run"]), await deploy_anyway(ctx, int(request.form["run"]))
                )
        except QuillError as exc:  # FinetuneError included
            return Redirect(request.url(), error_text(exc), error=True)
        return Redirect(request.url(), _("Usage: {usage}", usage=FINETUNE_USAGE), error=True)
    runs = await asyncio.to_thread(_runs, ctx.memory)
    chosen = request.query.get("run", "")
    run = next((r for r in runs if chosen.isdigit() and r.id == int(chosen)), None)
    if run is None:
        return Page(
            "runs.html",
            {"runs": runs, "erased": ERASED_NOTE, "training": _training is not None and not _training.done()},
        )
    f = figures_of(run)
    losses: list[float] = f.get("losses", [])
    chart = line_chart(
        [Series(_("train loss"), [(i + 1, loss) for i, loss in enumerate(losses)])],
        title=_("Fine-tune run {run}: train loss per step", run=run.id),
        x_ticks=[(1, "1"), (len(losses), str(len(losses)))] if losses else [],
        y_label=_("loss"),
    )
    nll = [(key, f[key]) for key in ("heldout", "general") if key in f]
    values = {"run": run, "chart": chart, "nll": nll, "figures": f, "erased": ERASED_NOTE in run.note}
    return Page("run.html", values)


@hookimpl
def register_web_pages(register: Callable[[WebPage], None]) -> None:
    register(WebPage("runs", N_("Fine-tune runs"), runs_page, TEMPLATES, post=True, everywhere=True))
