"""Routing through real pluggy plugins: commands, help, bad input and failing plugins."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bot.api import NO_ANSWER, Command, Option, Place, PluginContext, Reply, Request, Section, hookimpl
from bot.app import Quill
from bot.engine import GenerationOptions
from bot.plugins import make_plugin_manager
from bot.router import Router, clean_text


def request(text: str, **fields: object) -> Request:
    values: dict[str, object] = {"transport": "test", "channel_id": "c1", "author_id": "u1", "text": text}
    values.update(fields)
    return Request(**values)  # type: ignore[arg-type]


async def read(reply: Reply) -> str:
    if reply.stream is None:
        return reply.text
    return "".join([piece async for piece in reply.stream])


class TroublePlugin:
    """Commands that fail in every way a plugin can."""

    @hookimpl
    def register_commands(self, register: Callable[[Command], None]) -> None:
        async def boom(ctx: PluginContext, req: Request) -> Reply:
            raise RuntimeError("plugin bug")

        async def hang(ctx: PluginContext, req: Request) -> Reply:
            await asyncio.sleep(3600)
            return Reply("never")

        async def half(ctx: PluginContext, req: Request) -> Reply:
            async def pieces() -> AsyncIterator[str]:
                yield "partial "
                raise RuntimeError("died mid-stream")

            return Reply(stream=pieces())

        async def secret(ctx: PluginContext, req: Request) -> Reply:
            return Reply("admin things done")

        register(Command("boom", "always raises", boom))
        register(Command("hang", "never answers", hang))
        register(Command("half", "fails mid-reply", half))

        async def echo(ctx: PluginContext, req: Request) -> Reply:
            return Reply(f"{dict(req.options)} | {req.text}")

        register(Command("secret", "admin only", secret, admin=True))
        register(
            Command(
                "echo",
                "shows its options",
                echo,
                "<text>",
                options=(Option("to", "target language", required=True), Option("tone", "a tone")),
            )
        )
        register(Command("chat", "a second /chat, which must be refused", boom))


class Watcher:
    """An on_message observer: answers one word, raises on another, ignores the rest."""

    seen: list[str]

    def __init__(self) -> None:
        self.seen = []

    @hookimpl
    async def on_message(self, context: PluginContext, request: Request) -> Reply | None:
        self.seen.append(request.text)
        if "forbidden" in request.text:
            return Reply("flagged", channel_id="mods")
        if "explode" in request.text:
            raise RuntimeError("observer bug")
        return None


class BrokenRegistration:
    @hookimpl
    def register_commands(self, register: Callable[[Command], None]) -> None:
        raise RuntimeError("cannot even register")


@pytest.fixture
def router(app: Quill) -> Router:
    pm = app.plugins
    pm.register(TroublePlugin(), "trouble")
    pm.register(BrokenRegistration(), "broken")
    pm.register(Watcher(), "watcher")
    return Router(app.context)


async def test_help_lists_plugin_commands_and_hides_admin_ones(router: Router) -> None:
    text = await read(await router.handle(request("/help")))
    assert "/chat <message>" in text and "/boom" in text
    assert "  /echo to:<target language> [tone:<a tone>] <text>  shows its options" in text
    assert "/secret" not in text
    assert "/secret" in await read(await router.handle(request("/help", is_admin=True)))


async def test_a_command_name_taken_twice_keeps_the_first(router: Router) -> None:
    assert router.commands["chat"].help.startswith("talk with the assistant")


@pytest.mark.parametrize("text", ["", "   \n\t ", "\u200b\u200d\ufeff", "\x00\x07"])
async def test_empty_messages_get_a_clear_reply(router: Router, text: str) -> None:
    reply = await router.handle(request(text))
    assert reply.failed and "empty message" in reply.text


async def test_huge_message_is_refused_clearly(router: Router) -> None:
    reply = await router.handle(request("x" * 100_000))
    assert reply.failed and "100,000 characters" in reply.text and "QUILL_MAX_INPUT_CHARS" in reply.text


async def test_unknown_command(router: Router) -> None:
    reply = await router.handle(request("/nope now"))
    assert reply.failed and "Unknown command /nope" in reply.text and "/help" in reply.text


async def test_admin_command_is_refused_for_others(router: Router) -> None:
    refused = await router.handle(request("/secret"))
    assert refused.failed and "admins only" in refused.text
    assert (await router.handle(request("/secret", is_admin=True))).text == "admin things done"


async def test_a_raising_plugin_is_answered_and_the_others_keep_working(router: Router) -> None:
    reply = await router.handle(request("/boom"))
    assert reply.failed and "Sorry, /boom failed" in reply.text
    answer = await router.handle(request("hello there"))
    assert not answer.failed and (await read(answer)).strip()


async def test_a_hanging_plugin_times_out(router: Router, app: Quill) -> None:
    app.settings.plugin_timeout = 0.5
    reply = await router.handle(request("/hang"))
    assert reply.failed and "took too long" in reply.text


class SlowButSteady:
    """Work longer than the time-out in steps, each one reported: as a command, and as a digest
    section inside a command (the summarizer's case)."""

    @staticmethod
    async def steps(ctx: PluginContext) -> None:
        for _ in range(5):
            await asyncio.sleep(0.15)
            ctx.progress()

    @hookimpl
    def register_commands(self, register: Callable[[Command], None]) -> None:
        async def steady(ctx: PluginContext, req: Request) -> Reply:
            await self.steps(ctx)
            return Reply("steady done")

        async def digest(ctx: PluginContext, req: Request) -> Reply:
            results = await ctx.hooks.call("digest_sections", place=Place("test", "", "c1"), since=datetime.now(UTC))
            return Reply(" ".join(r.value.body for r in results if isinstance(r.value, Section)))

        register(Command("steady", "slow but reports progress", steady))
        register(Command("digest", "a digest of slow sections", digest))

    @hookimpl
    async def digest_sections(self, context: PluginContext, place: Place, since: datetime) -> Section:
        await self.steps(context)
        return Section("Slow", "section done")


async def test_a_plugin_reporting_progress_outlives_the_time_out(app: Quill) -> None:
    app.settings.plugin_timeout = 0.4  # each run takes 0.75 s, in steps of 0.15 s
    pm = app.plugins
    pm.register(SlowButSteady(), "steady")
    router = Router(app.context)
    assert (await router.handle(request("/steady"))).text == "steady done"
    assert "section done" in (await router.handle(request("/digest"))).text
    app.context.progress()  # outside any handler: nothing to renew, no error


async def test_a_stream_failing_mid_way_ends_with_an_apology(router: Router) -> None:
    reply = await router.handle(request("/half"))
    assert await read(reply) == "partial \nSorry, /half failed. The error is logged; other commands still work."
    assert reply.failed


async def test_conversation_goes_to_the_chat_plugin_and_is_stored(router: Router, app: Quill) -> None:
    reply = await router.handle(request("Hi, who are you?", author_name="Ada", message_id="m1"))
    answer = await read(reply)
    conv = await app.memory.conversation("test", "", "c1")
    stored = await app.memory.history(conv.id, 10_000)
    assert [(m.role, m.content) for m in stored] == [
        ("user", "Hi, who are you?"),
        ("assistant", answer.strip()),
    ]
    assert stored[0].external_id == "m1" and stored[0].author_name == "Ada" and stored[0].token_count > 0


async def test_an_empty_model_reply_is_said_and_not_stored(app: Quill) -> None:
    # A grammar that lets the real model answer only a space: what it does on some odd input.
    blank = GenerationOptions(max_tokens=4, temperature=0.0, grammar='root ::= " "')
    reply = await app.context.converse(request("````````"), "You are terse.", blank)
    assert await read(reply) == " " + NO_ANSWER
    conv = await app.memory.conversation("test", "", "c1")
    assert [m.role for m in await app.memory.history(conv.id, 10_000)] == ["user"]


async def test_message_too_long_for_the_context_is_refused_and_kept(router: Router, app: Quill) -> None:
    app.settings.max_input_chars = 50_000
    text = "lorem ipsum dolor " * 1500  # under the character limit, far over the 2,048-token context
    reply = await router.handle(request(text))
    assert reply.failed and "Please shorten it" in reply.text and "QUILL_N_CTX" in reply.text
    conv = await app.memory.conversation("test", "", "c1")
    assert [m.content for m in await app.memory.history(conv.id, 100_000)] == [text.strip()]


async def test_the_chat_command_rejects_an_empty_argument(router: Router) -> None:
    reply = await router.handle(request("/chat"))
    assert reply.failed and "Usage: /chat" in reply.text


async def test_options_are_parsed_from_the_text_form(router: Router) -> None:
    reply = await router.handle(request('/echo to:fr tone:"very formal" Hello: world'))
    assert reply.text == "{'to': 'fr', 'tone': 'very formal'} | Hello: world"


async def test_a_missing_required_option_gets_the_usage(router: Router) -> None:
    reply = await router.handle(request("/echo Hello"))
    assert reply.failed and reply.text == "/echo needs to. Usage: /echo to:<target language> [tone:<a tone>] <text>"


async def test_run_command_takes_options_directly(router: Router) -> None:
    reply = await router.run_command("echo", request("Hi\u200b", options={"to": "de"}))
    assert reply.text == "{'to': 'de'} | Hi"


async def test_observers_see_every_message_and_one_failing_does_not_stop_routing(router: Router) -> None:
    assert await router.observe(request("nothing to see")) == []
    (flag,) = await router.observe(request("a forbidden word"))
    assert flag.text == "flagged" and flag.channel_id == "mods"
    assert await router.observe(request("explode now")) == []  # logged, not posted
    assert len(await router.observe(request("forbidden again"))) == 1
    watcher = router.plugins.get_plugin("watcher")
    assert watcher.seen == ["nothing to see", "a forbidden word", "explode now", "forbidden again"]


def test_clean_text() -> None:
    assert clean_text("  a\u200bb\u202ec\x00d\n\te\ud800 ") == "abcd\n\te?"
    assert clean_text("e\u0301") == "\u00e9"


def test_entry_point_plugins_load_and_a_broken_one_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "quill_extra.py").write_text(
        textwrap.dedent(
            """
            from bot.api import Command, Reply, hookimpl

            async def hello(ctx, req):
                return Reply("hello from a third-party plugin")

            @hookimpl
            def register_commands(register):
                register(Command("hello", "says hello", hello))
            """
        )
    )
    (tmp_path / "quill_bad.py").write_text("raise ImportError('missing dependency')\n")
    dist = tmp_path / "quill_extra-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: quill-extra\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[quill.plugins]\nextra = quill_extra\nbad = quill_bad\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = make_plugin_manager()
    names = {name for name, _ in pm.list_name_plugin()}
    assert "extra" in names and "plugins.chat" in names and "bad" not in names
    sys.modules.pop("quill_extra", None)
