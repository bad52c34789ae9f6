"""The plugin contract: a third-party plugin installed by entry point declares settings and a
command without touching bot/; hooks are called plugin by plugin; the core imports no feature."""

from __future__ import annotations

import ast
import asyncio
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bot.api import Place, PluginContext, Reaction, Request, SettingError, hookimpl
from bot.app import Quill
from bot.config import REPO_ROOT
from bot.engine.local import LocalEngine
from bot.plugins import CORE_PLUGINS
from tests.conftest import make_settings

PLUGIN = """
from pydantic import Field

from bot.api import Command, GuildSettings, PluginSettings, Reply, hookimpl


class GreeterSettings(PluginSettings):
    greeting: str = Field("Hello", max_length=40, description="What the greeter says.")


class GreeterGuild(GuildSettings):
    name: str = Field("stranger", max_length=40, description="Whom it greets in this server.")


async def greet(ctx, request):
    if request.text:
        await ctx.update(GreeterGuild, request.place, name=request.text)
    here = await ctx.scoped(GreeterGuild, request.place)
    return Reply(f"{ctx.config(GreeterSettings).greeting}, {here.name}!")


@hookimpl
def register_settings(register):
    register(GreeterSettings)
    register(GreeterGuild)


@hookimpl
def register_commands(register):
    register(Command("greet", "greets someone", greet, "[name]"))
"""


@pytest.fixture
def greeter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A plugin package installed the way pip installs one: a module and a dist-info folder
    with a `quill.plugins` entry point, on sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "quill_greeter.py").write_text(textwrap.dedent(PLUGIN))
    dist = site / "quill_greeter-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: quill-greeter\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[quill.plugins]\ngreeter = quill_greeter\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("QUILL_GREETER_GREETING", "你好")
    yield
    sys.modules.pop("quill_greeter", None)


@pytest.fixture
async def greeter_app(greeter: None, tmp_path: Path, db_url: str, engine: LocalEngine) -> AsyncIterator[Quill]:
    app = await Quill.start(make_settings(tmp_path, database_url=db_url), engine=engine)
    yield app
    await app.close(close_engine=False)


def ask(text: str, guild: str = "g1") -> Request:
    return Request("test", "c1", "u1", text, guild_id=guild)


async def test_a_third_party_plugin_declares_its_settings_and_a_command(greeter_app: Quill) -> None:
    """Its global setting comes from QUILL_GREETER_*, its per-guild one is stored as
    `greeter.name` for that guild only, and its command shows in /help."""
    assert "/greet" in (await greeter_app.router.handle(ask("/help"))).text
    assert (await greeter_app.router.handle(ask("/greet"))).text == "你好, stranger!"
    assert (await greeter_app.router.handle(ask("/greet 小明"))).text == "你好, 小明!"
    assert (await greeter_app.router.handle(ask("/greet"))).text == "你好, 小明!"
    assert (await greeter_app.router.handle(ask("/greet", guild="g2"))).text == "你好, stranger!"
    assert await greeter_app.memory.get_settings("g1", "", "greeter") == {"greeter.name": "小明"}
    described = {(d["plugin"], d["scope"]) for d in (e.describe() for e in greeter_app.registry.declared.values())}
    assert {("greeter", "global"), ("greeter", "guild")} <= described


async def test_a_refused_setting_value_names_the_setting(greeter_app: Quill) -> None:
    """A value is validated where it is declared: too long for `max_length` is refused, with
    the setting named, and nothing is stored; the default again clears the stored row."""
    reply = await greeter_app.router.handle(ask("/greet " + "x" * 41))
    assert reply.failed and reply.text.startswith("greeter setting name:")
    assert await greeter_app.memory.get_settings("g1", "", "greeter") == {}
    await greeter_app.router.handle(ask("/greet Ada"))
    await greeter_app.router.handle(ask("/greet stranger"))
    assert await greeter_app.memory.get_settings("g1", "", "greeter") == {}


async def test_a_bad_environment_value_stops_start_up_naming_it(
    greeter: None, tmp_path: Path, engine: LocalEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUILL_GREETER_GREETING", "x" * 100)
    with pytest.raises(SettingError, match="QUILL_GREETER_GREETING"):
        await Quill.start(make_settings(tmp_path), engine=engine)


class Keeper:
    """A plugin keeping its own data about people; `broken` makes its erase and export fail."""

    def __init__(self, broken: bool) -> None:
        self.broken = broken
        self.notes = {"u1": ["on call this week"]}

    @hookimpl
    def forget_user(self, user_id: str) -> int:
        if self.broken:
            raise RuntimeError("disk full")
        return len(self.notes.pop(user_id, []))

    @hookimpl
    def export_user(self, context: PluginContext, user_id: str) -> dict[str, list[str]]:
        if self.broken:
            raise RuntimeError("disk full")
        return {"notes": self.notes.get(user_id, [])}


async def test_a_failing_forget_user_does_not_stop_the_others_and_is_reported(app: Quill) -> None:
    """One plugin raising does not keep the next from erasing, and the reply names the one that
    failed instead of reporting a whole erase."""
    good, bad = Keeper(broken=False), Keeper(broken=True)
    app.plugins.register(bad, "brokenkeeper")
    app.plugins.register(good, "keeper")
    conv = await app.memory.conversation("test", "g1", "c1")
    await app.memory.add_message(conv.id, role="user", content="我明天值班", author_id="u1")
    reply = await app.router.handle(ask("/forget me"))
    assert good.notes == {} and bad.notes == {"u1": ["on call this week"]}
    assert reply.failed
    assert reply.text == (
        "Erased part of what is stored about you: 1 from message, 1 from plugin data. "
        "Not erased: what the plugin(s) brokenkeeper keep; that failed and is logged."
    )


async def test_export_me_includes_what_plugins_keep(app: Quill) -> None:
    app.plugins.register(Keeper(broken=False), "keeper")
    reply = await app.router.handle(ask("/export me"))
    assert not reply.failed and reply.file is not None
    assert '"keeper": {\n      "notes": [\n        "on call this week"' in reply.file.read_text(encoding="utf-8")
    app.plugins.register(Keeper(broken=True), "brokenkeeper")
    reply = await app.router.handle(ask("/export me"))
    assert reply.failed and "brokenkeeper" in reply.text


async def test_scoped_settings_of_another_place_are_apart(app: Quill) -> None:
    """Guild settings are shared by a guild's channels, channel settings are not."""
    from plugins.translate import TranslateChannel

    here, there = Place("test", "g1", "c1"), Place("test", "g1", "c2")
    await app.context.update(TranslateChannel, here, auto="FR")
    assert (await app.context.scoped(TranslateChannel, here)).auto == "FR"
    assert (await app.context.scoped(TranslateChannel, there)).auto is None
    with pytest.raises(KeyError, match="no channel setting colour"):
        await app.context.update(TranslateChannel, here, colour="red")


FEATURES = ("plugins", "bot.builtin")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_no_core_module_imports_a_feature() -> None:
    """Only the plugin manager names the built-in plugins (as strings), and only the built-in
    plugins themselves may reach into each other's package."""
    core = [p for p in (REPO_ROOT / "bot").rglob("*.py") if "builtin" not in p.relative_to(REPO_ROOT).parts]
    offenders = {
        str(path.relative_to(REPO_ROOT)): sorted(
            m for m in _imports(path) if m.split(".")[0] == "plugins" or m.startswith("bot.builtin")
        )
        for path in core
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    assert all(name.startswith("bot.builtin.") for name in CORE_PLUGINS)


def test_plugins_import_only_the_api_from_bot() -> None:
    for path in (REPO_ROOT / "plugins").rglob("*.py"):
        used = {m for m in _imports(path) if m.startswith("bot.") or m == "bot"}
        assert {m for m in used if not m.startswith("bot.api")} == set(), path


class Stuck:
    @hookimpl
    async def on_reaction(self, reaction: Reaction) -> str:
        await asyncio.Event().wait()  # never set: a plugin that hangs
        return "unreachable"


class Counter:
    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl
    def on_reaction(self, context: PluginContext, reaction: Reaction) -> str:
        self.seen.append(reaction.emoji)
        return f"counted {reaction.emoji}"


async def test_a_hook_that_hangs_times_out_alone(app: Quill) -> None:
    """Each plugin's implementation runs under QUILL_PLUGIN_TIMEOUT on its own: the stuck one
    comes back as a TimeoutError, the next one still runs, sync or async alike."""
    app.settings.plugin_timeout = 0.3
    counter = Counter()
    app.plugins.register(Stuck(), "stuck")
    app.plugins.register(counter, "counter")
    reaction = Reaction(Place("test", "g1", "c1"), "u1", "🎉", "m1")
    results = {r.plugin: r for r in await app.hooks.call("on_reaction", reaction=reaction)}
    assert isinstance(results["stuck"].error, TimeoutError)
    assert results["counter"].value == "counted 🎉" and counter.seen == ["🎉"]
