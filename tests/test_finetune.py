"""The fine-tune loop: approvals, scrubbed JSONL export, eval gate, rollback and LoRA hot swap,
on the real embedded model (adapters written with the `gguf` package like the trainer does).

`test_training_improves_the_heldout_loss_and_is_served` trains for real (PEFT in a child
process, about a minute on 2 idle cores): it needs the `finetune` extra, which CI installs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlmodel import Session, select

from bot.api import Reply, Request
from bot.app import Quill
from bot.builtin import finetune
from bot.builtin.finetune import FinetuneSettings
from bot.builtin.train import permute, write_adapter
from bot.engine import ChatMessage, GenerationOptions
from bot.engine.local import LocalEngine
from bot.models import FinetuneRun

GREEDY = GenerationOptions(max_tokens=16, temperature=0.0)
QUESTION = [ChatMessage("user", "How do I handle deploys in Zorblax?")]
N_LAYERS, N_EMBD = 30, 576  # SmolLM2-135M


def random_adapter(path: Path, seed: int, scale: float = 0.2) -> Path:
    """An untrained adapter on every layer's attention output: it changes outputs, and worsens them."""
    rng = np.random.default_rng(seed)
    pairs = {
        f"blk.{i}.attn_output.weight": (rng.normal(0, scale, (4, N_EMBD)), rng.normal(0, scale, (N_EMBD, 4)))
        for i in range(N_LAYERS)
    }
    write_adapter(path, "llama", 4.0, pairs, (9, 3))
    return path


def zorblax(n: int = 16) -> list[tuple[str, str]]:
    """A tiny team-specific set with a pattern the base model does not know."""
    topics = "deploy rollback logs backups tickets on-call metrics alerts releases secrets tests reviews"
    topics += " builds docs billing access"
    return [
        (
            f"How do I handle {t} in Zorblax?",
            f"Zorblax tip: open the {t} panel, press Sync, then wait for the green light.",
        )
        for t in topics.split()[:n]
    ]


def user(text: str, channel: str = "team", **fields: object) -> Request:
    values: dict[str, object] = {
        "transport": "console",
        "channel_id": channel,
        "author_id": "4242",
        "author_name": "ada",
        "text": text,
        "is_admin": True,
    }
    values.update(fields)
    return Request(**values)  # type: ignore[arg-type]


async def exchange(app: Quill, question: str, answer: str, channel: str = "team", approve: bool = True) -> None:
    conv = await app.memory.conversation("console", "", channel)
    await app.memory.add_message(conv.id, role="user", content=question, author_id="4242", author_name="ada")
    await app.memory.add_message(conv.id, role="assistant", content=answer, author_id="quill")
    if approve:
        reply = await app.router.handle(user("/good", channel))
        assert not reply.failed


async def text_of(reply: Reply) -> str:
    if reply.stream is None:
        return reply.text
    return "".join([piece async for piece in reply.stream])


async def answer(engine: LocalEngine) -> str:
    return (await engine.chat(QUESTION, GREEDY)).text


async def cold(engine: LocalEngine, adapter: Path | None = None) -> str:
    """The answer right after a swap, which empties the prompt cache. Answers are compared
    only cold: a reused prefix is evaluated in other batches, and greedy decoding of a 4-bit
    model can then take another path even with the same weights."""
    await engine.set_adapter(adapter)
    return await answer(engine)


def runs(app: Quill) -> list[FinetuneRun]:
    with Session(app.memory.engine) as session:
        return list(session.exec(select(FinetuneRun).order_by(FinetuneRun.id)))


def test_scrub_removes_ids_emails_and_tokens() -> None:
    text = (
        "mail ada.l@example.co.uk, ping <@123456789012345678> in <#987654321098765432>, "
        "key sk-abcdefghijklmnop1234, token MTIzNDU2Nzg5MDEyMzQ1Njc4.GhIjKl.abcdefghijklmnopqrstuvwxyz12345, "
        "user 4242 said hi, version 3.11 stays"
    )
    clean = finetune.scrub(text, ["4242"])
    assert clean == (
        "mail [email], ping @someone in @someone, key [secret], token [secret], user [user] said hi, version 3.11 stays"
    )


async def test_good_approves_the_last_answer_and_export_keeps_enabled_approved_scrubbed(app: Quill) -> None:
    reply = await app.router.handle(user("/finetune enable"))
    assert not reply.failed
    await exchange(app, "what is ada's mail? I am 4242", "It is ada@example.com, ask <@123456789012345678>")
    await exchange(app, "second question", "second answer")
    await exchange(app, "unapproved question", "unapproved answer", approve=False)
    await exchange(app, "third question", "third answer")
    assert not (await app.router.handle(user("/good"))).failed  # approving twice keeps one approval
    await exchange(app, "question elsewhere", "answer elsewhere", channel="other")  # not enabled

    reply = await app.router.handle(user("/finetune export"))
    summary, warning = reply.text.split("\n")
    assert summary.startswith("Exported 2 train, 1 held out; 3 groups of distinct questions, 1 of them held out, to ")
    assert warning.startswith("The eval gate would refuse it: too few distinct questions")
    folder = Path(summary.rsplit(" to ", 1)[1])
    rows = [
        json.loads(line)
        for name in ("train.jsonl", "heldout.jsonl")
        for line in (folder / name).read_text().splitlines()
    ]
    assert all([m["role"] for m in row["messages"]] == ["user", "assistant"] for row in rows)
    pairs = {row["messages"][0]["content"]: row["messages"][1]["content"] for row in rows}
    assert pairs == {
        "what is [user]'s mail? I am [user]": "It is [email], ask @someone",
        "second question": "second answer",
        "third question": "third answer",
    }


async def test_good_with_no_answer_and_export_with_too_little_data_say_so(app: Quill) -> None:
    reply = await app.router.handle(user("/good"))
    assert reply.failed and "not answered" in reply.text
    reply = await app.router.handle(user("/finetune export"))
    assert reply.failed and "Only 0 approved exchange(s)" in reply.text


async def test_finetune_is_for_admins_and_explains_itself(app: Quill, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "admins only" in (await app.router.handle(user("/finetune status", is_admin=False))).text
    assert (await app.router.handle(user("/finetune"))).text.startswith("Usage: /finetune")
    monkeypatch.setattr(finetune, "EXTRA_PACKAGES", ("torch", "no_such_training_package"))
    reply = await app.router.handle(user("/finetune train"))
    assert reply.failed and 'pip install -e ".[finetune]"' in reply.text


async def test_hot_swap_changes_outputs_between_requests_and_detaching_restores_the_base(
    engine: LocalEngine, tmp_path: Path
) -> None:
    adapter = random_adapter(tmp_path / "random.gguf", seed=1)
    base = await cold(engine)
    try:
        with_adapter = await cold(engine, adapter)
        assert with_adapter != base
        assert engine.adapter == adapter.resolve()
        # Requests queued around a swap all complete: the swap is a job between them, and the
        # request after it sees the new weights from an empty cache.
        await engine.set_adapter(None)
        before, _, after = await asyncio.gather(answer(engine), engine.set_adapter(adapter), answer(engine))
        assert before == base
        assert after == with_adapter
    finally:
        await engine.set_adapter(None)
    assert await answer(engine) == base  # detached: the base model exactly
    assert engine.adapter is None


async def test_a_missing_adapter_is_a_clear_error(engine: LocalEngine, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="LoRA adapter file not found"):
        await engine.set_adapter(tmp_path / "nope.gguf")
    assert await answer(engine) == await answer(engine)


def pairs_to_examples(pairs: list[tuple[str, str]]) -> list[tuple[list[dict[str, str]], str]]:
    return [([{"role": "user", "content": q}, {"role": "assistant", "content": a}], "4242") for q, a in pairs]


async def dataset(app: Quill, tmp_path: Path) -> finetune.Dataset:
    return finetune._write_dataset(pairs_to_examples(zorblax()), tmp_path / "data", 0.25, 4)


QMARK, COMMA = "\uff1f", "\uff0c"  # full-width question mark and comma
NEAR_DUPLICATES = [  # each list: one question asked several ways; none of them another's
    ["How do I reset my password?", "how do i reset my password", "How can I reset my  PASSWORD??"],
    [f"Zorblax 怎么部署{QMARK}", "zorblax如何部署", "ZORBLAX 部署"],
    [f"如何重置密码{QMARK}", "我怎么重置我的密码", "怎么 重置 密码?", f"请问{COMMA}如何重置密码"],
    [f"会议室在哪里预订{QMARK}", "会议室在哪里预订", f"请问会议室在哪里预订{QMARK}"],
    ["\uff28\uff2f\uff37 \uff24\uff2f \uff29 \uff33\uff29\uff27\uff2e \uff35\uff30?", "How do I sign up?"],
    ["How are you?", "how are you"],
]


@pytest.mark.parametrize("fraction", [0.2, 0.35, 0.5])
def test_near_duplicate_questions_never_straddle_the_split(tmp_path: Path, fraction: float) -> None:
    """English and Chinese near-duplicates (case, width, punctuation, spacing, function words)
    land on one side; questions that differ in content (one template, another topic) do not merge."""
    distinct = zorblax()  # one template, 16 topics: 16 different questions
    pairs = [(q, f"answer {n}") for n, cluster in enumerate(NEAR_DUPLICATES) for q in cluster] + distinct
    data = finetune._write_dataset(pairs_to_examples(pairs), tmp_path / "data", fraction, 4)
    assert data.n_groups == len(NEAR_DUPLICATES) + len(distinct)
    assert data.n_heldout_groups >= 4 and data.n_train + data.n_heldout == len(pairs)
    held = {json.loads(line)["messages"][0]["content"] for line in data.heldout.read_text().splitlines()}
    trained = {json.loads(line)["messages"][0]["content"] for line in data.train.read_text().splitlines()}
    assert held and trained and not held & trained
    for cluster in NEAR_DUPLICATES:
        assert set(cluster) <= held or set(cluster) <= trained, cluster


async def test_too_few_distinct_questions_are_never_trained_or_deployed(app: Quill, tmp_path: Path) -> None:
    """Ten approvals of three questions: no held-out part worth the name, so no training and no
    deployment, and both the command and the recorded run say why."""
    asked = [q for cluster in NEAR_DUPLICATES[:3] for q in cluster][:10]
    data = finetune._write_dataset(pairs_to_examples([(q, "the answer") for q in asked]), tmp_path / "d", 0.2, 4)
    assert (data.n_groups, data.n_heldout_groups) == (3, 1)
    lines = [line async for line in finetune.run_finetune(app.context, data)]
    (run,) = runs(app)
    assert run.status == "rejected" and run.adapter_path == ""
    assert "not deployed: too few distinct questions for a held-out check: 3 group(s)" in lines[-1]
    assert app.engine.adapter is None  # type: ignore[attr-defined]

    await app.router.handle(user("/finetune enable"))
    for question in asked:
        await exchange(app, question, "the answer")
    reply = await app.router.handle(user("/finetune train"))
    assert reply.failed and reply.text.startswith("Not training: too few distinct questions"), reply.text
    assert len(runs(app)) == 1


async def test_the_gate_keeps_an_adapter_that_does_not_improve_out_of_service(app: Quill, tmp_path: Path) -> None:
    data = await dataset(app, tmp_path)
    adapter = random_adapter(tmp_path / "worse.gguf", seed=2)
    lines = [line async for line in finetune.run_finetune(app.context, data, adapter=adapter)]
    (run,) = runs(app)
    assert run.status == "rejected"
    assert run.nll_after is not None and run.nll_before is not None and run.nll_after > run.nll_before
    assert (run.dataset_path, run.dataset_sha256, run.n_train, run.n_heldout) == (
        str(data.folder),
        data.sha256,
        12,
        4,
    )
    assert "not deployed" in lines[-1]
    assert app.engine.adapter is None  # type: ignore[attr-defined]


async def test_rollback_returns_to_the_previous_adapter_then_to_the_base(
    app: Quill, tmp_path: Path, engine: LocalEngine
) -> None:
    base = await cold(engine)
    first, second = random_adapter(tmp_path / "a1.gguf", seed=3), random_adapter(tmp_path / "a2.gguf", seed=4)
    try:
        with_first = await cold(engine, first)
        await engine.set_adapter(second)
        common = {"base_model": "m", "dataset_path": "d", "dataset_sha256": "s"}
        with Session(app.memory.engine) as session:
            session.add(FinetuneRun(status="retired", adapter_path=str(first), **common))
            session.add(FinetuneRun(status="deployed", adapter_path=str(second), **common))
            session.commit()

        reply = await app.router.handle(user("/finetune rollback"))
        assert reply.text == "Rolled back run 2; now serving run 1's adapter."
        assert await answer(engine) == with_first
        assert [r.status for r in runs(app)] == ["deployed", "rolled_back"]

        # A restart serves the deployed adapter again.
        await engine.set_adapter(None)
        again = await Quill.start(app.settings, engine=engine)
        assert engine.adapter == first.resolve()
        assert await answer(engine) == with_first
        await again.close(close_engine=False)

        assert (await app.router.handle(user("/finetune rollback"))).text.endswith("now serving the base model.")
        assert await answer(engine) == base
        assert "No fine-tuned adapter is deployed" in (await app.router.handle(user("/finetune rollback"))).text
    finally:
        await engine.set_adapter(None)


def quick_training(app: Quill, **overrides: object) -> None:
    """Tiny real training runs: rank 4, one epoch, 8 exchanges of the general set."""
    app.settings.plugin_timeout = 1800  # per progress line; a loaded machine steps slowly
    values: dict[str, object] = {
        "lora_rank": 4,
        "epochs": 1,
        "threads": 2,
        "heldout_fraction": 0.25,
        "general_sample": 8,
    }
    config = app.context.config(FinetuneSettings)
    for name, value in {**values, **overrides}.items():
        setattr(config, name, value)


async def test_training_improves_the_heldout_loss_and_is_served(app: Quill, engine: LocalEngine) -> None:
    """The whole loop for real: approvals -> /finetune train (child process) -> gate -> hot swap."""
    quick_training(app)
    base = await cold(engine)
    await app.router.handle(user("/finetune enable"))
    for question, reply_text in zorblax():
        await exchange(app, question, reply_text)
    try:
        reply = await app.router.handle(user("/finetune train"))
        assert reply.title == "Fine-tuning"
        progress = await text_of(reply)
        assert "step 1/12" in progress and "step 12/12" in progress
        (run,) = runs(app)
        assert run.status == "deployed", progress
        assert run.nll_after < run.nll_before
        assert engine.adapter == Path(run.adapter_path).resolve()  # served without a restart
        assert await answer(engine) != base
        status = await app.router.handle(user("/finetune status"))
        assert f"run 1: deployed (served now), held-out NLL/token {run.nll_before:.3f}" in status.text
        figures = json.loads(run.figures)
        assert len(figures["losses"]) == 12 and figures["general"]["examples"] == 8
        assert figures["general"]["change"] <= app.context.config(FinetuneSettings).max_regression
        assert figures["groups"] == {"exchanges": 16, "groups": 16, "train": 12, "heldout": 4}
        assert "general-chat NLL/answer token: base" in status.text and "deploy: held-out NLL fell" in status.text
    finally:
        await engine.set_adapter(None)
    assert await answer(engine) == base


async def test_an_adapter_that_ruins_general_chat_is_refused_and_the_served_one_stays(
    app: Quill, engine: LocalEngine, tmp_path: Path
) -> None:
    """Every answer replaced by one fixed string, at a high learning rate: the held-out NLL falls
    (its answers are that string too) but general chat gets much worse, so the regression check
    refuses the adapter; the one served before stays. An admin can still deploy it, logged."""
    quick_training(app, learning_rate=1e-2, heldout_fraction=1 / 3)
    served = random_adapter(tmp_path / "served.gguf", seed=5, scale=0.05)
    common = {"base_model": "m", "dataset_path": "d", "dataset_sha256": "s"}
    with Session(app.memory.engine) as session:
        session.add(FinetuneRun(status="deployed", adapter_path=str(served), **common))
        session.commit()
    await engine.set_adapter(served)
    ruin = [(question, "Ask the Zorblax desk.") for question, _ in zorblax(12)]
    data = finetune._write_dataset(pairs_to_examples(ruin), tmp_path / "ruin", 1 / 3, 4)
    try:
        lines = [line async for line in finetune.run_finetune(app.context, data)]
        first, run = runs(app)
        figures = json.loads(run.figures)
        assert run.status == "rejected", lines
        assert figures["heldout"]["adapter"] < figures["heldout"]["base"]  # the held-out check alone would pass it
        assert figures["general"]["change"] > 0.05
        assert "not deployed: general chat got worse: its NLL rose" in lines[-1]
        assert (first.status, engine.adapter) == ("deployed", served.resolve())
        assert Path(run.adapter_path).is_file()  # kept aside for inspection

        status = await app.router.handle(user("/finetune status"))
        assert "refused: general chat got worse" in status.text and "QUILL_FINETUNE_MAX_REGRESSION" in status.text
        assert "train loss: 8 steps" in status.text
        assert status.file is not None
        with Image.open(status.file) as chart:
            assert chart.format == "PNG" and chart.size == (760, 300)

        reply = await app.router.handle(user(f"/finetune deploy {run.id}"))
        assert reply.text.startswith(f"Run {run.id}'s adapter is served now, overruling the gate: general chat"), reply
        assert engine.adapter == Path(run.adapter_path).resolve()
        assert [r.status for r in runs(app)] == ["retired", "deployed"]
        assert "deployed by an admin on" in runs(app)[1].note
        assert (await app.router.handle(user("/finetune rollback"))).text.endswith("now serving run 1's adapter.")
        assert engine.adapter == served.resolve()
    finally:
        await engine.set_adapter(None)


@pytest.mark.parametrize(("n_head", "rows"), [(9, 576), (3, 192)])  # SmolLM2's q and k
def test_adapter_rows_are_permuted_back_to_llama_cpp_order(n_head: int, rows: int) -> None:
    """transformers un-permutes q/k when it loads a llama GGUF; the adapter's lora_b must be
    permuted back, or llama.cpp applies it to the wrong rows (it looks fine in PyTorch)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    gguf_rows = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    hf_rows = LlamaTensorProcessor()._reverse_permute_weights(gguf_rows, n_head, n_head)
    assert not np.array_equal(hf_rows, gguf_rows)
    assert np.array_equal(permute(hf_rows, n_head), gguf_rows)


async def test_forgetting_a_place_or_a_user_drops_their_approvals(app: Quill) -> None:
    await app.router.handle(user("/finetune enable"))
    await exchange(app, "q1", "a1")
    await exchange(app, "q2", "a2")
    assert (await app.memory.forget_user("4242"))["approval"] == 2  # the approver's approvals
    await exchange(app, "q3", "a3")
    assert await app.memory.forget_place("console", "", "team") > 0  # the answers, with their approvals
    reply = await app.router.handle(user("/finetune export"))
    assert reply.failed and "Only 0 approved" in reply.text


async def test_erasing_a_user_drops_their_examples_and_flags_adapters_trained_on_them(app: Quill) -> None:
    await app.router.handle(user("/finetune enable"))
    conv = await app.memory.conversation("console", "", "team")
    for n, author in enumerate(["4242", "7777", "4242", "7777", "7777"]):
        await app.memory.add_message(conv.id, role="user", content=f"question {n}", author_id=author)
        await app.memory.add_message(conv.id, role="assistant", content=f"answer {n}", author_id="quill")
        assert not (await app.router.handle(user("/good"))).failed
    data = await finetune.export_dataset(app.context)
    assert "4242" not in data.train.read_text() + data.heldout.read_text()  # ids never reach the files
    run = FinetuneRun(status="deployed", base_model="m", dataset_path=str(data.folder), dataset_sha256=data.sha256)
    with Session(app.memory.engine) as session:
        session.add(run)
        session.commit()

    exported = await app.router.handle(user("/export me", author_id="4242"))
    assert exported.file is not None
    (examples,) = json.loads(exported.file.read_text())["plugins"]["finetune"]["datasets"].values()
    assert sorted(e["messages"][0]["content"] for e in examples) == ["question 0", "question 2"]
    reply = await app.router.handle(user("/forget me", author_id="4242"))
    assert "2 from plugin data" in reply.text, reply.text

    left = [json.loads(line)["messages"][0]["content"] for f in (data.train, data.heldout) for line in f.open()]
    assert sorted(left) == ["question 1", "question 3", "question 4"]
    keys = json.loads((data.folder / finetune.CONTRIBUTORS).read_text())
    assert finetune.contributor_key("4242") not in keys["train"] + keys["heldout"]
    status = await text_of(await app.router.handle(user("/finetune status")))
    assert "trained on data of a since-erased user (2 examples" in status and "retrain" in status
    again = await app.router.handle(user("/forget me", author_id="4242"))
    assert again.text == "Nothing is stored about you."
