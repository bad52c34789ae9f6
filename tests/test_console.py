"""The console transport and the `quill` command, end to end on the real model and SQLite."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from bot.api import Command, PluginContext, Reply, Request, hookimpl
from bot.app import Quill
from bot.config import Settings
from bot.engine import ChatMessage, EngineError, GenerationOptions
from bot.engine.local import LocalEngine
from bot.router import Router
from bot.transports.console import ConsoleTransport
from tests.conftest import make_settings


class RecordingEngine:
    """The real engine, with the prompts it was given kept for inspection."""

    def __init__(self, engine: LocalEngine) -> None:
        self._engine = engine
        self.prompts: list[list[ChatMessage]] = []

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def stream(self, messages: Sequence[ChatMessage], options: GenerationOptions) -> AsyncIterator[str]:
        self.prompts.append(list(messages))
        return self._engine.stream(messages, options)

    async def close(self) -> None:  # the shared engine outlives each app
        pass


async def test_ask_streams_and_the_conversation_survives_a_restart(settings: Settings, engine: LocalEngine) -> None:
    recorder = RecordingEngine(engine)
    out = io.StringIO()
    first = await Quill.start(settings, engine=recorder)
    reply = await ConsoleTransport(first, user="ada", out=out).ask("My name is Ada. Remember it.")
    assert not reply.failed and out.getvalue().strip()
    await first.close()

    second = await Quill.start(settings, engine=recorder)
    await ConsoleTransport(second, user="ada", out=io.StringIO()).ask("What is my name?")
    await second.close()

    prompt = recorder.prompts[-1]
    assert prompt[0].role == "system" and "quill" in prompt[0].content
    assert [m.role for m in prompt[1:]] == ["user", "assistant", "user"]
    assert prompt[1].content == "My name is Ada. Remember it."
    assert prompt[-1].content == "What is my name?"


async def test_history_is_trimmed_oldest_first_and_the_system_prompt_kept(tmp_path: Path, engine: LocalEngine) -> None:
    recorder = RecordingEngine(engine)
    settings = make_settings(tmp_path, max_reply_tokens=16)
    app = await Quill.start(settings, engine=recorder)
    conv = await app.memory.conversation("console", "", "console")
    for i in range(12):  # about 12 x 250 tokens: more than the 2,048-token context holds
        for role, text in (
            ("user", f"Note {i}: " + "tell me about the weather today please " * 25),
            ("assistant", "ok"),
        ):
            tokens = await engine.count_tokens(text)
            await app.memory.add_message(conv.id, role=role, content=text, author_id="u", token_count=tokens)
    reply = await app.router.handle(ConsoleTransport(app).request("And now?"))
    await reply.stream.aclose()  # the prompt is built; generating the reply is not needed here
    await app.close()
    prompt = recorder.prompts[-1]
    total = sum([await engine.count_tokens(m.content) + 8 for m in prompt])
    assert prompt[0].role == "system"
    assert prompt[-1].content == "And now?"
    assert prompt[-3].content.startswith("Note 11:")
    assert not any(m.content.startswith("Note 0:") for m in prompt)
    assert total + settings.max_reply_tokens <= engine.n_ctx
    assert total + settings.max_reply_tokens > engine.n_ctx - 300  # trimmed no more than needed


async def test_repl_runs_commands_and_chat_until_quit(settings: Settings, engine: LocalEngine) -> None:
    lines = iter(["/help\n", "\n", "Hello!\n", "/nosuch\n", "/quit\n", "never read\n"])
    out = io.StringIO()

    async def read_line() -> str:
        return next(lines)

    app = await Quill.start(settings, engine=engine)
    await ConsoleTransport(app, out=out).repl(read_line)
    await app.close(close_engine=False)
    text = out.getvalue()
    assert "/help lists commands" in text and "/chat <message>" in text and "Unknown command /nosuch" in text
    assert next(lines) == "never read\n"


async def test_titled_replies_show_their_title(settings: Settings, engine: LocalEngine) -> None:
    out = io.StringIO()
    app = await Quill.start(settings, engine=engine)
    await ConsoleTransport(app, out=out).render(Reply("- point one", title="Summary of #general"))
    await app.close(close_engine=False)
    assert out.getvalue() == "== Summary of #general ==\n- point one\n"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Scripted:
    """Replies the test controls: one that starts when told, one that fails mid-way."""

    def __init__(self) -> None:
        self.go = asyncio.Event()

    @hookimpl
    def register_commands(self, register: Callable[[Command], None]) -> None:
        async def slow(ctx: PluginContext, req: Request) -> Reply:
            async def pieces() -> AsyncIterator[str]:
                await self.go.wait()  # a cold history being read
                yield "the reply"

            return Reply(stream=pieces())

        async def half(ctx: PluginContext, req: Request) -> Reply:
            async def pieces() -> AsyncIterator[str]:
                yield "partial"
                raise EngineError("The model server stopped in the middle of the reply.")

            return Reply(stream=pieces())

        register(Command("slow", "starts when told", slow))
        register(Command("half", "fails mid-reply", half))


@pytest.fixture
async def scripted(app: Quill) -> tuple[Quill, Scripted]:
    plugin = Scripted()
    pm = app.plugins
    pm.register(plugin, "scripted")
    app.router = Router(app.context)
    return app, plugin


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_terminal_sees_progress_from_the_first_moment_until_the_reply_starts(
    scripted: tuple[Quill, Scripted],
) -> None:
    app, plugin = scripted
    out = Terminal()
    asking = asyncio.create_task(ConsoleTransport(app, out=out).ask("/slow"))
    async with asyncio.timeout(30):
        while "… thinking" not in out.getvalue():  # shown before any reply exists
            await asyncio.sleep(0.01)
        while "… thinking 1 s" not in out.getvalue():  # and it counts
            await asyncio.sleep(0.05)
    assert "the reply" not in out.getvalue()
    plugin.go.set()
    async with asyncio.timeout(30):
        await asking
    shown = out.getvalue()
    cleared = shown.rindex("\r" + " " * 24 + "\r")
    assert shown[cleared:].strip() == "the reply" and shown.endswith("the reply\n")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_failed_stream_ends_its_line_and_shows_the_error_once(scripted: tuple[Quill, Scripted]) -> None:
    app, _ = scripted
    out = io.StringIO()
    reply = await ConsoleTransport(app, out=out).ask("/half")
    assert reply.failed
    assert out.getvalue() == "partial\nThe model server stopped in the middle of the reply.\n"


def run_quill(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("QUILL_", "DISCORD_"))}
    environ.update({"QUILL_N_CTX": "1024", "QUILL_MAX_REPLY_TOKENS": "24", "QUILL_N_THREADS": "2", **env})
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_ask_answers_and_stores_under_the_data_dir(tmp_path: Path) -> None:
    done = run_quill(tmp_path, "ask", "Say hello.")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert (tmp_path / "data" / "quill.db").is_file()
    assert run_quill(tmp_path, "ask", "/help").stdout.startswith("Commands:")


def chat_process(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("QUILL_")}
    return subprocess.run(
        [sys.executable, "-m", "bot", "chat", "--channel", "team", *args],
        input="/help\nHi!\n/retention 5\n",
        cwd=tmp_path,
        env={**environ, "QUILL_MAX_REPLY_TOKENS": "16", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_chat_reads_stdin_and_keeps_the_log_out_of_the_conversation(tmp_path: Path) -> None:
    # Not an admin here, so /retention is refused, which logs a WARNING.
    done = chat_process(tmp_path, QUILL_ADMIN_IDS='["someone-else"]', QUILL_LOG_LEVEL="DEBUG")
    assert done.returncode == 0, done.stderr
    assert "conversation 'team'" in done.stdout and "/chat <message>" in done.stdout
    assert "/retention is for admins only. Admins here are the users listed in QUILL_ADMIN_IDS." in done.stdout
    logged = (tmp_path / "data" / "quill.log").read_text()
    assert "WARNING bot.router: refused admin command /retention" in logged and " INFO " in logged
    for printed in (done.stdout, done.stderr):
        assert " WARNING " not in printed and " INFO " not in printed
    verbose = chat_process(tmp_path, "--verbose", QUILL_ADMIN_IDS='["someone-else"]')
    assert "WARNING bot.router: refused admin command /retention" in verbose.stderr


def test_cli_missing_model_is_one_clear_line(tmp_path: Path) -> None:
    done = run_quill(tmp_path, "ask", "hi", QUILL_MODEL_PATH=str(tmp_path / "gone.gguf"))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"quill: Model file not found: {tmp_path / 'gone.gguf'}. Set QUILL_MODEL_PATH to a GGUF model file "
        "(or unset it to use the embedded SmolLM2-135M)."
    )


def test_cli_error_reply_exits_non_zero(tmp_path: Path) -> None:
    done = run_quill(tmp_path, "ask", "/nosuch")
    assert done.returncode == 1 and "Unknown command /nosuch" in done.stdout


def test_cli_db_upgrade_and_unusable_database(tmp_path: Path) -> None:
    *applied, last = run_quill(tmp_path, "db", "upgrade").stdout.strip().splitlines()
    assert applied[0] == "applied 0001: initial schema" and all(line.startswith("applied 0") for line in applied)
    assert last == f"database schema is up to date ({len(applied)} revision(s) applied)"
    again = run_quill(tmp_path, "db", "upgrade").stdout.strip()
    assert again == "database schema is up to date (nothing to apply)"
    (tmp_path / "blocked").write_text("not a folder")
    done = run_quill(tmp_path, "ask", "hi", QUILL_DATA_DIR=str(tmp_path / "blocked"))
    assert done.returncode == 1 and "Cannot open the database" in done.stderr and "Traceback" not in done.stderr


def test_discord_token_never_appears_in_settings_output(monkeypatch) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", "very-secret-token")
    settings = Settings(_env_file=None)
    assert settings.discord_token is not None
    assert settings.discord_token.get_secret_value() == "very-secret-token"
    assert "very-secret-token" not in repr(settings) and "very-secret-token" not in str(settings.model_dump())


def test_cli_invalid_setting_is_one_clear_line(tmp_path: Path) -> None:
    done = run_quill(tmp_path, "ask", "hi", QUILL_MAX_REPLY_TOKENS="8")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        "quill: invalid setting QUILL_MAX_REPLY_TOKENS: Input should be greater than or equal to 16"
    )
