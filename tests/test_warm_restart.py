"""Saved conversation states on disk (bot/engine/kvstore.py): a restart keeps conversations warm,
a changed model or a bad file is never served, the budget holds, and erasing messages erases
the states holding them. Real engines on the embedded model, real files."""

from __future__ import annotations

import logging
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bot.api import Place, Request, state_tags
from bot.app import Quill
from bot.builtin.privacy import PrivacyGuild, apply_retention
from bot.engine import ChatMessage, GenerationOptions
from bot.engine.batched import BatchedEngine
from bot.engine.kvstore import StateStore, state_key
from tests.conftest import assert_same_or_near_tie, make_settings

GREEDY = GenerationOptions(max_tokens=16, temperature=0.0)

HISTORIES = {
    "en": [
        ChatMessage("system", "You are quill, the team's helpful assistant. Answer briefly."),
        *[
            ChatMessage(role, text)
            for i in range(12)
            for role, text in (
                ("user", f"Ada: item {i} of the release plan is the login fix number {i}; who reviews it?"),
                ("assistant", f"Bea reviews item {i} before Thursday."),
            )
        ],
        ChatMessage("user", "Ada: and what ships on Thursday?"),
    ],
    "zh": [
        ChatMessage("system", "你是团队的助手 quill，请简短回答。"),
        *[
            ChatMessage(role, text)
            for i in range(5)
            for role, text in (
                ("user", f"阿达：发布计划第{i}项是第{i}个登录修复，谁来审查？"),
                ("assistant", f"贝拉会在周四前审查第{i}项。"),
            )
        ],
        ChatMessage("user", "阿达：周四发布什么？"),
    ],
}


def engine_settings(data: Path, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "n_ctx": 1024,
        "batch_kv_mb": 1,
        "batch_cache_mb": 64,
        "batch_streams": 2,
        "batch_prefill_chunk": 64,
    }
    values.update(overrides)
    return make_settings(data, **values)


async def started(data: Path, **overrides: Any) -> BatchedEngine:
    engine = BatchedEngine(engine_settings(data, **overrides))
    engine.start()
    return engine


async def first_turn_after_restart(
    data: Path, history: list[ChatMessage], **overrides: Any
) -> tuple[BatchedEngine, str]:
    """Answer `history` once, stop (states go to disk), start again and answer its next turn;
    the restarted engine (to close) and that reply."""
    first = await started(data, **overrides)
    try:
        reply = await first.chat(history, GREEDY)
    finally:
        await first.close()
    second = await started(data, **overrides)
    follow_up = [*history, ChatMessage("assistant", reply.text), ChatMessage("user", "Thanks. 谢谢。")]
    return second, (await second.chat(follow_up, GREEDY)).text


@pytest.mark.parametrize("language", ["en", "zh"])
async def test_first_turn_after_a_restart_restores_the_saved_state_and_answers_the_same(
    tmp_path: Path, batched_engine: BatchedEngine, language: str
) -> None:
    history = HISTORIES[language]
    engine, warm = await first_turn_after_restart(tmp_path, history)
    try:
        stats = engine.stats
        assert stats.disk_restores == 1
        assert stats.prompt_tokens_reused > 250  # the whole history, not evaluated again
        assert stats.prompt_tokens_evaluated < 40
        first = await batched_engine.chat(history, GREEDY)
        follow_up = [*history, ChatMessage("assistant", first.text), ChatMessage("user", "Thanks. 谢谢。")]
        cold = await batched_engine.chat(follow_up, GREEDY)
        await assert_same_or_near_tie(batched_engine, follow_up, cold.text, warm)
    finally:
        await engine.close()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
async def test_a_truncated_or_altered_state_file_is_ignored_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    history = HISTORIES["zh" if damage == "flip" else "en"]
    first = await started(tmp_path)
    await first.chat(history, GREEDY)
    await first.close()
    (path,) = (tmp_path / "data" / "kv").glob("*/*.qkv")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 8]) + data[middle + 8 :])
    engine = await started(tmp_path)
    try:
        with caplog.at_level(logging.WARNING, logger="bot.engine.kvstore"):
            reply = await engine.chat(history, GREEDY)
        assert reply.text
        assert engine.stats.disk_restores == 0 and engine.stats.prompt_tokens_reused == 0
        assert any("truncated or corrupt" in r.getMessage() for r in caplog.records)
        assert not path.exists()
    finally:
        await engine.close()


async def test_a_changed_model_file_never_reuses_the_old_states(tmp_path: Path) -> None:
    base = make_settings(tmp_path).model_path
    model = tmp_path / "model.gguf"
    shutil.copyfile(base, model)
    first = await started(tmp_path, model_path=model)
    await first.chat(HISTORIES["en"], GREEDY)
    await first.close()
    assert list((tmp_path / "data" / "kv").glob("*/*.qkv"))
    # Same size, one byte of the last tensor changed: another model for the key.
    with model.open("r+b") as fh:
        fh.seek(-16, 2)
        byte = fh.read(1)
        fh.seek(-16, 2)
        fh.write(bytes([byte[0] ^ 1]))
    engine = await started(tmp_path, model_path=model)
    try:
        assert engine.stats.disk_states == 0
        await engine.chat(HISTORIES["en"], GREEDY)
        assert engine.stats.disk_restores == 0 and engine.stats.prompt_tokens_reused == 0
    finally:
        await engine.close()


async def test_a_state_saved_without_flash_attention_is_not_loaded_with_it(tmp_path: Path) -> None:
    """The two kernels lay V out differently in the cache."""
    first = await started(tmp_path, flash_attn=False)
    await first.chat(HISTORIES["zh"], GREEDY)
    await first.close()
    engine = await started(tmp_path, flash_attn=True)
    try:
        assert engine.stats.disk_states == 0
        assert (await engine.chat(HISTORIES["zh"], GREEDY)).text
        assert engine.stats.disk_restores == 0 and engine.stats.prompt_tokens_reused == 0
    finally:
        await engine.close()
    again = await started(tmp_path, flash_attn=False)
    try:
        assert again.stats.disk_states == 1  # still there for when it is off again
    finally:
        await again.close()


def test_the_key_follows_the_model_and_the_adapter_content(tmp_path: Path) -> None:
    model, adapter, hashes = tmp_path / "m.gguf", tmp_path / "a.gguf", tmp_path / "hashes.json"
    model.write_bytes(b"GGUF" + b"\0" * 4096)
    adapter.write_bytes(b"GGUF" + b"\1" * 64)
    plain = state_key(model, None, hashes, "layout")
    assert state_key(model, None, hashes, "layout") == plain  # the remembered hash
    assert state_key(model, adapter, hashes, "layout") != plain
    assert state_key(model, None, hashes, "other layout") != plain
    tuned = state_key(model, adapter, hashes, "layout")
    adapter.write_bytes(b"GGUF" + b"\2" * 64)  # a new fine-tune at the same path
    assert state_key(model, adapter, hashes, "layout") != tuned
    model.write_bytes(b"GGUF" + b"\0" * 4095 + b"\1")
    assert state_key(model, None, hashes, "layout") != plain


def test_the_disk_budget_drops_the_least_recently_used_first(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "kv", budget=2500)
    store.open("key")
    written = [store.write([i] * 20, frozenset({f"user:{i}"}), bytes([i]) * 1000) for i in range(3)]
    assert all(written)
    first, second, third = written
    assert first is not None and second is not None and third is not None
    assert not first.path.exists() and second.path.exists() and third.path.exists()
    assert store.read(second) == bytes([1]) * 1000  # used now: newer than the third
    store.write([9] * 20, frozenset(), bytes([9]) * 1000)
    assert second.path.exists() and not third.path.exists()
    assert store.write([8], frozenset(), bytes(3000)) is None  # larger than the whole budget
    reopened = StateStore(tmp_path / "kv", budget=2500)
    reopened.open("key")
    assert sorted(s.tokens[0] for s in reopened.states) == [1, 9]


def ask(app: Quill, text: str, author: str, channel: str, guild: str = "g1", **fields: Any) -> Any:
    return app.router.handle(Request("discord", channel, author, text, guild_id=guild, **fields))


async def talk(app: Quill, text: str, author: str, channel: str, guild: str = "g1") -> None:
    reply = await ask(app, text, author, channel, guild)
    assert reply.stream is not None
    assert "".join([piece async for piece in reply.stream])


@pytest.mark.parametrize("language", ["en", "zh"])
async def test_forget_and_retention_drop_the_states_holding_erased_messages(tmp_path: Path, language: str) -> None:
    """Replies are labelled by place, guild and users; retention drops a guild's states, /forget
    me a user's, /forget channel a channel's, in host memory and on disk, and no other."""
    settings = engine_settings(tmp_path, batch_cache_mb=6, max_reply_tokens=16)
    engine = BatchedEngine(settings)
    engine.start()
    app = await Quill.start(settings, engine=engine)
    try:
        text = {
            "en": "Please remember that our team ships the release on Thursday after the QA pass. " * 8,
            "zh": "请记住我们团队在测试通过后于周四发布新版本。" * 3,
        }[language]
        places = {"u1": ("g1", "c1"), "u2": ("g1", "c2"), "u3": ("g2", "c3")}
        for user, (guild, channel) in places.items():
            await talk(app, f"{user}: {text}", user, channel, guild)
        tags = {user: state_tags(Place("discord", g, c), [user]) for user, (g, c) in places.items()}

        def held() -> set[frozenset[str]]:
            assert engine._store is not None
            return {s.tags for s in engine._saved.values()} | {s.tags for s in engine._store.states}

        assert set(tags.values()) <= held()
        assert engine.stats.disk_writes >= 1  # 6 MB holds one of these states (~200 tokens): the others spilled

        key = app.registry.entry(PrivacyGuild).key("retention_days")
        await app.memory.set_settings("g2", "", {key: 1})
        assert await apply_retention(app.context, now=datetime.now(UTC) + timedelta(days=2)) == {"g2": 2}
        assert tags["u3"] not in held() and {tags["u1"], tags["u2"]} <= held()
        reply = await ask(app, "/forget me", "u1", "c1")
        assert not reply.failed, reply.text
        assert tags["u1"] not in held() and tags["u2"] in held()
        reply = await ask(app, "/forget channel", "boss", "c2", is_admin=True)
        assert not reply.failed, reply.text
        assert held() == set()
    finally:
        await app.close()  # the engine too: what is left in host memory goes to disk
    assert not list((tmp_path / "data" / "kv").glob("*/*.qkv"))
