"""The Discord transport, driven through dpytest's simulated Discord with the real model.

Messages, DMs, typing, edits and replies go through dpytest (a real discord.py client against a
fake gateway and HTTP API). dpytest has no threads and no slash commands; tests/discord_helpers.py
says how those are supplied with discord.py's own parsing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import discord
import discord.ext.test as dpytest
import pytest
from aiohttp import web
from discord.ext.test import backend, callbacks, factories
from discord.webhook.async_ import async_context
from pydantic import SecretStr
from sqlmodel import Session, select
from typer.testing import CliRunner

from bot import cli
from bot.api import BOT_AUTHOR_ID, Command, Option, Place, PluginContext, Reply, Request, hookimpl
from bot.app import Quill
from bot.models import Approval, Message
from bot.router import Router
from bot.transports.discord import DiscordGuild, DiscordStartError, QuillClient, make_client, run_discord
from plugins.digest import chart
from tests.conftest import make_settings
from tests.discord_helpers import (
    RecordingWebhookAdapter,
    attach,
    bot_messages,
    interaction_payload,
    invoke,
    post,
)

LONG_REPLY = "\n\n".join(
    f"Paragraph {i}: " + "words " * 60 + ("\n```python\n" + "x = 1\n" * 40 + "```" if i % 4 == 0 else "")
    for i in range(40)
)


class ProbePlugin:
    """Commands and an observer whose effects the tests can see."""

    def __init__(self) -> None:
        self.calls: list[Request] = []
        self.observed: list[Request] = []
        self.pieces_made = 0

    @hookimpl
    def register_commands(self, register: Callable[[Command], None]) -> None:
        async def echo(ctx: PluginContext, request: Request) -> Reply:
            self.calls.append(request)
            return Reply(f"echo {dict(request.options)} | {request.text}")

        async def secret(ctx: PluginContext, request: Request) -> Reply:
            self.calls.append(request)
            return Reply("admin things done")

        async def card(ctx: PluginContext, request: Request) -> Reply:
            return Reply("Three things happened today.", title="Digest")

        async def long(ctx: PluginContext, request: Request) -> Reply:
            return Reply(LONG_REPLY)

        async def slow(ctx: PluginContext, request: Request) -> Reply:
            async def pieces() -> AsyncIterator[str]:
                for i in range(24):
                    await asyncio.sleep(0.05)
                    self.pieces_made += 1
                    yield f"piece{i} "

            return Reply(stream=pieces())

        register(
            Command(
                "echo",
                "shows what it got",
                echo,
                "<text>",
                options=(
                    Option("tone", "a tone"),
                    Option("to", "language", required=True, choices=("fr", "de")),
                ),
            )
        )
        register(Command("secret", "admins only", secret, admin=True))
        register(Command("card", "answers with a titled card", card))
        register(Command("long", "a 10,000-character answer", long))
        register(Command("slow", "streams slowly", slow))

    @hookimpl
    async def on_message(self, context: PluginContext, request: Request) -> Reply | None:
        self.observed.append(request)
        if "forbidden" in request.text:
            mods = discord.utils.get(backend.get_state().guilds[0].text_channels, name="mods")
            return Reply(f"flagged message {request.message_id}", channel_id=str(mods.id))
        return None


@pytest.fixture
def probe(app: Quill) -> ProbePlugin:
    plugin = ProbePlugin()
    app.plugins.register(plugin, "probe")
    app.router = Router(app.context)
    return plugin


@pytest.fixture
async def bot(app: Quill, probe: ProbePlugin) -> AsyncIterator[QuillClient]:
    app.settings.discord_edit_interval = 0.2
    app.settings.max_reply_tokens = 16  # the machine is shared; the replies' wisdom is not tested
    intents = discord.Intents.default()
    intents.message_content = intents.members = True  # dpytest keeps its members in the member cache
    client = QuillClient(app, intents=intents)
    client.retry_delay = 0.01
    client.api = attach(client)  # type: ignore[attr-defined]
    await client._async_setup_hook()  # dpytest's documented set-up: gives the client its event loop
    yield client
    await dpytest.empty_queue()
    for event in ("send_typing", "edit_message"):
        callbacks.remove_callback(event)


def channel(name: str) -> discord.TextChannel:
    return discord.utils.get(dpytest.get_config().guilds[0].text_channels, name=name)


def member(name: str) -> discord.Member:
    return next(m for m in dpytest.get_config().members if m.name == name)


async def stored(app: Quill, guild: str, channel_id: str) -> list[Message]:
    conv = await app.memory.conversation("discord", guild, channel_id)
    return await app.memory.history(conv.id, 10**9)


async def test_a_mention_gets_a_streamed_answer_with_typing_and_both_turns_stored(bot: QuillClient, app: Quill) -> None:
    general, typing_in = channel("general"), []

    async def typed(channel: Any) -> None:
        typing_in.append(channel.id)

    callbacks.set_callback(typed, "send_typing")
    question = await post(general, member("ada"), f"{bot.user.mention} Say hello to the team.")

    [answer] = await bot_messages(bot, general)
    assert answer.content.strip()
    assert general.id in typing_in
    turns = await stored(app, str(general.guild.id), str(general.id))
    assert [(t.role, t.author_id) for t in turns] == [
        ("user", str(member("ada").id)),
        ("assistant", BOT_AUTHOR_ID),
    ]
    assert turns[0].content == "Say hello to the team." and turns[0].external_id == str(question.id)
    assert turns[1].content == answer.content.strip()  # the last edit shows the whole stored reply


async def test_a_dm_is_answered_in_the_dm_with_its_own_memory(bot: QuillClient, app: Quill) -> None:
    ada = member("ada")
    dm = await ada.create_dm()
    await dpytest.message("What is a haiku?", channel=dm, member=ada)

    [answer] = await bot_messages(bot, dm)
    assert answer.content.strip()
    turns = await stored(app, "", str(dm.id))
    assert [t.role for t in turns] == ["user", "assistant"] and turns[0].content == "What is a haiku?"


async def test_a_help_channel_question_is_answered_in_a_new_thread_that_continues_it(
    bot: QuillClient, app: Quill
) -> None:
    help_channel, ada = channel("help"), member("ada")
    guild = str(help_channel.guild.id)
    await app.context.update(DiscordGuild, Place("discord", guild, ""), help_channels=[str(help_channel.id)])

    await post(help_channel, ada, "How do I reset my password?")
    [thread] = bot.api.threads
    assert thread.name == "How do I reset my password?" and thread.parent_id == help_channel.id
    assert await bot_messages(bot, help_channel) == []  # the answer is in the thread, not the channel
    assert len(await bot_messages(bot, thread)) == 1

    await post(thread, ada, "And if I forgot my email too?")  # a follow-up, no mention needed
    assert len(await bot_messages(bot, thread)) == 2
    turns = await stored(app, guild, str(thread.id))
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[0].content == "How do I reset my password?"
    assert await stored(app, guild, str(help_channel.id)) == []  # routed, so not stored twice


async def test_a_thread_refused_by_discord_falls_back_to_answering_in_the_channel(bot: QuillClient, app: Quill) -> None:
    help_channel = channel("help")
    await app.context.update(
        DiscordGuild, Place("discord", str(help_channel.guild.id), ""), help_channels=[str(help_channel.id)]
    )

    async def refuse(*args: Any, **kwargs: Any) -> None:
        raise discord.Forbidden(backend.FakeRequest(403, "Forbidden"), "Missing Permissions")

    bot.http.start_thread_with_message = refuse
    await post(help_channel, member("ada"), "/help")
    [answer] = await bot_messages(bot, help_channel)
    assert "Commands:" in answer.content


async def test_replying_to_the_bot_addresses_it_and_replying_to_people_does_not(
    bot: QuillClient, app: Quill, probe: ProbePlugin
) -> None:
    general, ada, bob = channel("general"), member("ada"), member("bob")
    await post(general, ada, f"{bot.user.mention} /help")
    [help_message] = await bot_messages(bot, general)

    await post(general, ada, "/echo to:fr again please", reply_to=help_message)
    assert probe.calls[-1].text == "again please" and probe.calls[-1].options == {"to": "fr"}

    chatter = await post(general, bob, "lunch at noon?")
    await post(general, ada, "sure, see you there", reply_to=chatter)
    assert len(await bot_messages(bot, general)) == 2
    history = await stored(app, str(general.guild.id), str(general.id))
    assert [m.content for m in history] == ["lunch at noon?", "sure, see you there"]
    # Plugins learn which message a reply answers, and it is stored (the digest's reply chains).
    assert probe.observed[-1].reply_to == str(chatter.id) and probe.observed[-2].reply_to is None
    assert [m.reply_to for m in history] == [None, str(chatter.id)]


async def test_unaddressed_messages_are_stored_as_history_and_shown_to_observers(
    bot: QuillClient, app: Quill, probe: ProbePlugin
) -> None:
    general, bob = channel("general"), member("bob")
    message = await post(general, bob, "the build is green again")
    flagged = await post(general, bob, "this is forbidden talk")

    [first, second] = await stored(app, str(general.guild.id), str(general.id))
    assert (first.content, first.role, first.author_id) == ("the build is green again", "user", str(bob.id))
    assert first.author_name == bob.display_name and first.external_id == str(message.id)
    assert first.token_count > 0 and second.content == "this is forbidden talk"
    assert [r.text for r in probe.observed] == ["the build is green again", "this is forbidden talk"]
    assert await bot_messages(bot, general) == []  # not addressed: no answer
    [report] = await bot_messages(bot, channel("mods"))  # Reply.channel_id: posted there instead
    assert report.content == f"flagged message {flagged.id}"


async def test_edits_and_deletions_on_discord_are_followed_in_the_memory(bot: QuillClient, app: Quill) -> None:
    general, bob = channel("general"), member("bob")
    kept = await post(general, bob, "meeting at 3")
    gone = await post(general, bob, "my phone number is 555-0100")
    data = factories.make_message_dict(general, bob, id_num=kept.id, content="meeting at 4")
    del data["member"]  # dpytest fills it with a user, which an update cannot parse
    backend.get_state().parse_message_update(data)
    backend.delete_message(gone)
    await dpytest.run_all_events()
    [message] = await stored(app, str(general.guild.id), str(general.id))
    assert message.content == "meeting at 4" and message.external_id == str(kept.id)


async def test_an_export_file_goes_to_the_requester_privately(
    bot: QuillClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, webhook: RecordingWebhookAdapter
) -> None:
    monkeypatch.chdir(tmp_path)  # dpytest writes sent attachments to the working directory
    general, ada = channel("general"), member("ada")
    await post(general, ada, f"{bot.user.mention} /export me")  # the real data-controls plugin
    [answer] = await bot_messages(bot, general)
    [private] = await bot_messages(bot, ada.dm_channel)
    assert answer.content.startswith("Your data:") and private.attachments[0].filename.endswith(".json")

    me = [{"name": "text", "type": 3, "value": "me"}]
    await invoke(interaction_payload(bot, general, ada, ["export"], me))
    *_, (method, _, payload) = webhook.calls
    assert method == "POST" and payload["attachments"][0]["filename"].startswith("quill-export-")
    assert payload["flags"] & discord.MessageFlags(ephemeral=True).value


async def test_attachments_alone_and_bare_mentions_get_a_clear_answer(bot: QuillClient, tmp_path: Any) -> None:
    general, ada = channel("general"), member("ada")
    await dpytest.message(bot.user.mention, channel=general, member=ada, attachments=["notes.pdf"])
    await post(general, ada, bot.user.mention)
    [attachment, bare] = await bot_messages(bot, general)
    assert "notes.pdf" in attachment.content and "only read the text" in attachment.content
    assert "empty message" in bare.content


async def test_admin_commands_are_refused_to_members_without_manage_server(
    bot: QuillClient, app: Quill, probe: ProbePlugin
) -> None:
    general, ada, bob = channel("general"), member("ada"), member("bob")
    app.settings.admin_ids = [str(ada.id)]
    await post(general, bob, f"{bot.user.mention} /secret")
    await post(general, ada, f"{bot.user.mention} /secret")
    refusal, done = await bot_messages(bot, general)
    assert "admins only" in refusal.content and done.content == "admin things done"
    assert [r.author_id for r in probe.calls] == [str(ada.id)]


async def test_a_long_reply_is_split_into_messages_that_keep_code_blocks_whole(bot: QuillClient) -> None:
    general = channel("general")
    assert len(LONG_REPLY) > 10_000
    await post(general, member("ada"), f"{bot.user.mention} /long")
    parts = [m.content for m in await bot_messages(bot, general)]
    assert len(parts) >= 6 and all(len(p) <= 2000 for p in parts)
    assert all(sum(line.startswith("```") for line in p.split("\n")) % 2 == 0 for p in parts)
    assert "".join("".join(parts).split()).replace("`", "").replace("python", "") == "".join(
        LONG_REPLY.split()
    ).replace("`", "").replace("python", "")


async def test_a_titled_reply_is_shown_as_an_embed(bot: QuillClient) -> None:
    general = channel("general")
    await post(general, member("ada"), f"{bot.user.mention} /card")
    [card] = await bot_messages(bot, general)
    assert card.embeds[0].title == "Digest" and card.embeds[0].description == "Three things happened today."


async def test_streaming_edits_the_message_at_most_once_per_interval(bot: QuillClient) -> None:
    general, edits = channel("general"), []

    async def edited(channel: Any, message: Any, fields: Any) -> None:
        edits.append(time.monotonic())

    callbacks.set_callback(edited, "edit_message")
    await post(general, member("ada"), f"{bot.user.mention} /slow")
    [message] = await bot_messages(bot, general)
    assert message.content == " ".join(f"piece{i}" for i in range(24))
    assert 2 <= len(edits) <= 7  # 24 pieces over ~1.2 s, edits every >= 0.2 s
    assert all(b - a >= 0.19 for a, b in itertools.pairwise(edits))


async def test_discord_errors_while_replying_are_retried_or_given_up_without_crashing(
    bot: QuillClient, probe: ProbePlugin, caplog: pytest.LogCaptureFixture
) -> None:
    general, ada = channel("general"), member("ada")
    real_send, real_edit, failures = bot.http.send_message, bot.http.edit_message, []

    async def flaky_send(*args: Any, **kwargs: Any) -> Any:
        channel = sys._getframe(1).f_locals["channel"]  # noqa: F841 (dpytest reads it from its caller)
        if not failures:
            failures.append("500")
            raise discord.DiscordServerError(backend.FakeRequest(500, "Internal Server Error"), "oops")
        return await real_send(*args, **kwargs)

    bot.http.send_message = flaky_send
    await post(general, ada, f"{bot.user.mention} /card")
    assert len(await bot_messages(bot, general)) == 1  # retried once, delivered

    async def channel_gone(*args: Any, **kwargs: Any) -> Any:
        raise discord.NotFound(backend.FakeRequest(404, "Not Found"), "Unknown Channel")

    bot.http.edit_message = channel_gone  # the channel is deleted while the reply streams
    await post(general, ada, f"{bot.user.mention} /slow")
    assert "reply not delivered" in caplog.text
    assert probe.pieces_made < 24  # the stream was closed, so generation stopped early

    bot.http.edit_message = real_edit
    bot.http.send_message = channel_gone
    await post(general, ada, f"{bot.user.mention} /card")  # Forbidden/NotFound on send: logged

    async def rate_limited(*args: Any, **kwargs: Any) -> Any:
        raise discord.RateLimited(600.0)  # longer than discord.py waits by itself

    bot.http.send_message = rate_limited
    started = time.monotonic()
    await post(general, ada, f"{bot.user.mention} /card")
    assert time.monotonic() - started < 5 and "Retry in 600" in caplog.text  # given up, not waited
    bot.http.send_message = real_send
    await post(general, ada, f"{bot.user.mention} /card")  # and the bot still works afterwards
    *_, last = await bot_messages(bot, general)
    assert last.embeds[0].title == "Digest"


@pytest.fixture
def webhook(bot: QuillClient) -> AsyncIterator[RecordingWebhookAdapter]:
    adapter = RecordingWebhookAdapter(bot, channel("general"))
    token = async_context.set(adapter)
    yield adapter
    async_context.reset(token)


async def test_a_slash_command_runs_its_plugin_with_options_and_text(
    bot: QuillClient, probe: ProbePlugin, webhook: RecordingWebhookAdapter
) -> None:
    options = [{"name": "to", "type": 3, "value": "fr"}, {"name": "text", "type": 3, "value": "good morning"}]
    await invoke(interaction_payload(bot, channel("general"), member("ada"), ["echo"], options))
    [request] = probe.calls
    assert (request.command, request.text, dict(request.options)) == ("echo", "good morning", {"to": "fr"})
    assert request.transport == "discord" and request.channel_id == str(channel("general").id)
    assert webhook.calls[0][2]["type"] == 5  # deferred ("thinking") before the plugin ran
    assert webhook.texts() == ["echo {'to': 'fr'} | good morning"]
    assert webhook.calls[-1][2]["allowed_mentions"] == {"parse": []}  # a reply never pings anyone


async def test_a_slash_command_streams_into_its_response_and_continues_in_follow_ups(
    bot: QuillClient, webhook: RecordingWebhookAdapter
) -> None:
    await invoke(interaction_payload(bot, channel("general"), member("ada"), ["slow"], []))
    edits = [c for c in webhook.calls if c[0] == "PATCH" and c[1].endswith("/messages/@original")]
    assert len(edits) >= 2 and webhook.texts()[-1] == " ".join(f"piece{i}" for i in range(24))

    webhook.calls.clear()
    await invoke(interaction_payload(bot, channel("general"), member("ada"), ["long"], []))
    [_defer, first, *follow_ups] = webhook.calls
    assert first[0] == "PATCH" and len(follow_ups) >= 5
    assert all(method == "POST" and "/webhooks/" in path for method, path, _ in follow_ups)
    assert all(len(text) <= 2000 for text in webhook.texts())


async def test_slash_command_options_autocomplete_from_their_choices(
    bot: QuillClient, webhook: RecordingWebhookAdapter
) -> None:
    options = [{"name": "to", "type": 3, "value": "f", "focused": True}]
    await invoke(interaction_payload(bot, channel("general"), member("ada"), ["echo"], options, autocomplete=True))
    [(_, _, payload)] = webhook.calls
    assert payload["type"] == 8 and payload["data"]["choices"] == [{"name": "fr", "value": "fr"}]


async def test_admin_slash_commands_are_refused_privately_without_manage_server(
    bot: QuillClient, app: Quill, probe: ProbePlugin, webhook: RecordingWebhookAdapter
) -> None:
    general, bob = channel("general"), member("bob")
    await invoke(interaction_payload(bot, general, bob, ["secret"], []))
    await invoke(interaction_payload(bot, general, bob, ["quill", "helpchannel", "add"], []))
    assert probe.calls == [] and await bot.help_channels(str(general.guild.id)) == []
    assert all("Manage Server" in text for text in webhook.texts()) and webhook.ephemeral()

    manager = discord.Permissions(manage_guild=True)
    await invoke(interaction_payload(bot, general, bob, ["quill", "helpchannel", "add"], [], permissions=manager))
    assert await bot.help_channels(str(general.guild.id)) == [str(general.id)]
    await invoke(interaction_payload(bot, general, bob, ["secret"], [], permissions=manager))
    assert webhook.texts()[-1] == "admin things done"


async def test_quill_sync_publishes_the_generated_commands_to_the_guild(
    bot: QuillClient, webhook: RecordingWebhookAdapter
) -> None:
    general = channel("general")
    options = [{"name": "scope", "type": 3, "value": "guild"}]
    manager = discord.Permissions(manage_guild=True)
    await invoke(interaction_payload(bot, general, member("ada"), ["quill", "sync"], options, permissions=manager))
    published = {c["name"]: c for c in bot.api.synced[str(general.guild.id)]}
    assert {"chat", "echo", "secret", "help", "quill"} <= set(published)
    echo = published["echo"]["options"]
    assert [(o["name"], o["required"]) for o in echo] == [("text", True), ("to", True), ("tone", False)]
    assert echo[1]["autocomplete"] is True and published["echo"]["description"] == "shows what it got"
    assert int(published["secret"]["default_member_permissions"]) == manager.value
    assert "Synced" in webhook.texts()[-1] and "to this server" in webhook.texts()[-1]


async def test_help_channel_marks_made_by_another_process_apply_at_once(
    bot: QuillClient, app: Quill, settings: Any, engine: Any
) -> None:
    other = await Quill.start(settings, engine=engine)  # a second bot process on the same database
    help_channel = channel("help")
    await other.context.update(
        DiscordGuild, Place("discord", str(help_channel.guild.id), ""), help_channels=[str(help_channel.id)]
    )
    await other.close(close_engine=False)
    await post(help_channel, member("ada"), "/help")
    assert len(bot.api.threads) == 1


async def test_a_rejected_token_fails_clearly_and_never_reaches_the_logs(
    app: Quill, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A real discord.py login against a local stand-in for Discord's API that refuses the token."""
    token = "MTIz.secret-token-value.abc"
    seen: list[str] = []

    async def users_me(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"message": "401: Unauthorized", "code": 0}, status=401)

    server = web.Application()
    server.router.add_get("/api/v10/users/@me", users_me)
    runner = web.AppRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    monkeypatch.setattr(discord.http.Route, "BASE", f"http://127.0.0.1:{port}/api/v10")
    app.settings.discord_token = SecretStr(token)
    caplog.set_level(logging.DEBUG)
    caplog.handler.addFilter(cli.SecretFilter(cli.secrets_in(app.settings)))  # as `quill run` sets up logging
    try:
        with pytest.raises(DiscordStartError) as failure:
            await run_discord(app)
        logging.getLogger("discord.gateway").debug("identify payload %s", {"token": token})
    finally:
        await runner.cleanup()
    assert seen == [f"Bot {token}"]  # the token was really sent to the (stand-in) API
    assert "rejected the bot token" in str(failure.value) and token not in str(failure.value)
    assert "[redacted]" in caplog.text and token not in caplog.text
    assert token not in repr(app.settings)


def test_the_logging_set_up_redacts_the_token_and_the_api_key(tmp_path: Any) -> None:
    """`quill run` logs through `setup_logging`, which hides both secrets from messages and
    tracebacks (the rejected-token test above applies the same filter to a real login)."""
    settings = make_settings(
        tmp_path, discord_token=SecretStr(" MTIz.token-value.xyz "), openai_api_key=SecretStr("sk-local-key")
    )
    root = logging.getLogger()
    level, before = root.level, list(root.handlers)
    cli.setup_logging(settings, interactive=True)
    try:
        log = logging.getLogger("discord.http")
        log.warning("sending Bot MTIz.token-value.xyz with key %s", "sk-local-key")
        try:
            raise RuntimeError("Authorization: Bearer sk-local-key")
        except RuntimeError:
            log.exception("request failed")
    finally:
        for handler in set(root.handlers) - set(before):
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)
    logged = (settings.data_dir / "quill.log").read_text()
    assert "sending Bot [redacted] with key [redacted]" in logged and "Bearer [redacted]" in logged
    assert "token-value" not in logged and "sk-local-key" not in logged


def test_quill_run_without_a_token_points_to_console_mode(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no .env here
    for name in ("QUILL_DISCORD_TOKEN", "DISCORD_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(cli.app, ["run"])
    assert result.exit_code == 2 and "quill chat" in result.output and "QUILL_DISCORD_TOKEN" in result.output


async def test_sharding_is_a_setting(app: Quill) -> None:
    assert type(make_client(app)) is QuillClient
    app.settings.discord_sharded, app.settings.discord_shard_ids = True, [2, 3]
    with pytest.raises(DiscordStartError, match="SHARD_COUNT"):
        make_client(app)
    app.settings.discord_shard_count, app.settings.discord_shard_ids = 4, [2, 3]
    sharded = make_client(app)
    assert isinstance(sharded, discord.AutoShardedClient) and isinstance(sharded, QuillClient)
    assert (sharded.shard_count, sharded.shard_ids) == (4, [2, 3])
    assert sharded.tree.get_command("chat") is not None


def test_one_client_class_runs_one_shard_or_as_many_as_discord_recommends(app: Quill) -> None:
    """Always an AutoShardedClient: not sharded is a single shard; sharded without a count
    leaves it to Discord, which names the recommended count at login."""
    single = make_client(app)
    assert isinstance(single, discord.AutoShardedClient) and (single.shard_count, single.shard_ids) == (1, None)
    app.settings.discord_sharded = True
    recommended = make_client(app)
    assert (recommended.shard_count, recommended.shard_ids) == (None, None)


# -- wiring to the scheduler, fine-tuning and moderation --------------------------------------


async def test_scheduled_replies_are_posted_to_their_target_channel(bot: QuillClient, app: Quill) -> None:
    await bot.on_ready()
    assert app.scheduler.posters["discord"] == bot.post_scheduled
    mods, general = channel("mods"), channel("general")
    place = Place("discord", str(general.guild.id), str(general.id))
    await app.scheduler.posters["discord"](place, f"<#{mods.id}>", Reply("Three things happened.", title="Digest"))
    [posted] = await bot_messages(bot, mods)
    assert posted.embeds[0].title == "Digest" and posted.embeds[0].description == "Three things happened."


async def test_a_replys_image_is_attached_and_shown_inside_its_embed(bot: QuillClient) -> None:
    """dpytest drops the embed of a message sent with files (discord.py sends both as multipart
    form data, which its fake HTTP layer does not read), so a recorder stands in for the channel."""
    sent: list[dict[str, Any]] = []

    class Recorder:
        async def send(self, **fields: Any) -> Any:
            sent.append(fields)
            return discord.Object(len(sent))

    png = chart.draw({"Mon 11-23": {"neutral": 3}}, "Messages per day, by mood")
    assert await bot._deliver(Reply("With a chart.", title="Digest", image=png), Recorder())
    ((fields),) = sent
    assert fields["embed"].image.url == "attachment://chart.png"
    assert fields["file"].filename == "chart.png" and fields["file"].fp.read() == png


async def test_a_thumbs_up_approves_the_answer_it_is_on_for_fine_tuning(bot: QuillClient, app: Quill) -> None:
    general = channel("general")
    await post(general, member("ada"), f"{bot.user.mention} Say hello.")
    await post(general, member("ada"), f"{bot.user.mention} Name a colour.")
    first, second = await bot_messages(bot, general)
    await post(general, member("ada"), f"{bot.user.mention} /help")
    help_text = (await bot_messages(bot, general))[-1]
    react(bot, first, member("bob"), "👍")  # the older answer, not the latest
    react(bot, first, member("bob"), "🎉")  # other emoji mean nothing
    react(bot, help_text, member("bob"), "👍")  # not an answer: nothing to approve
    await dpytest.run_all_events()
    with Session(app.memory.engine) as session:
        approvals = session.exec(select(Approval)).all()
    assert [a.approved_by for a in approvals] == [str(member("bob").id)]
    stored_answer = session_get_message(app, approvals[0].message_id)
    assert stored_answer.role == "assistant" and stored_answer.content == first.content.strip()
    assert stored_answer.external_id == str(first.id) and first.content != second.content


def react(bot: QuillClient, message: discord.Message, user: discord.Member, emoji: str) -> None:
    """A MESSAGE_REACTION_ADD gateway event, parsed and dispatched by discord.py itself.
    (dpytest 0.7.0's add_reaction builds a payload without the `type` field that discord.py
    2.6+ requires.)"""
    bot._connection.parse_message_reaction_add(
        {
            "message_id": str(message.id),
            "channel_id": str(message.channel.id),
            "guild_id": str(message.guild.id),
            "user_id": str(user.id),
            "message_author_id": str(message.author.id),
            "emoji": {"id": None, "name": emoji},
            "burst": False,
            "type": 0,
        }
    )


def session_get_message(app: Quill, message_id: int) -> Message:
    with Session(app.memory.engine) as session:
        found = session.get(Message, message_id)
    assert found is not None
    return found


class Deleter:
    """A moderation-like observer that asks for the flagged message to be deleted."""

    @hookimpl
    async def on_message(self, context: PluginContext, request: Request) -> Reply | None:
        if "spam-link" not in request.text:
            return None
        mods = channel("mods")
        return Reply(f"deleted spam from {request.author_name}", channel_id=str(mods.id), delete_original=True)


async def test_delete_original_removes_the_flagged_message_and_reports_it(bot: QuillClient, app: Quill) -> None:
    app.plugins.register(Deleter(), "deleter")
    general = channel("general")
    kept = await post(general, member("ada"), "a normal message")
    await post(general, member("bob"), "buy now spam-link")
    left = [m.content async for m in general.history(limit=50)]
    assert left == [kept.content]
    [report] = await bot_messages(bot, channel("mods"))
    assert report.content == f"deleted spam from {member('bob').display_name}"


async def test_replying_to_a_message_with_translate_translates_that_message(bot: QuillClient, app: Quill) -> None:
    general = channel("general")
    original = await post(general, member("ada"), "Guten Morgen, das Treffen beginnt heute um neun Uhr.")
    await post(general, member("bob"), f"{bot.user.mention} /translate to:en", reply_to=original)
    [answer] = await bot_messages(bot, general)
    assert answer.content.rstrip().endswith("_(German → English)_"), answer.content


async def test_a_markdown_file_attached_to_kb_add_becomes_a_document(
    bot: QuillClient, app: Quill, tmp_path: Any
) -> None:
    app.settings.admin_ids = [str(member("ada").id)]
    guide = tmp_path / "onboarding.md"
    guide.write_text("# Onboarding\n\nNew people get their laptop from Priya on day one.\n")
    general = channel("general")
    await dpytest.message(
        f"{bot.user.mention} /kb-add name:onboarding", channel=general, member=member("ada"), attachments=[str(guide)]
    )
    await dpytest.run_all_events()
    [answer] = await bot_messages(bot, general)
    assert "Added “onboarding” to the knowledge base" in answer.content, answer.content
    hits = await app.context.search.search("laptop Priya", "discord", str(general.guild.id), str(general.id), 5)
    assert any("Priya" in hit.text and hit.name == "onboarding" for hit in hits)


async def test_slash_options_are_typed_and_bounded_as_declared(
    bot: QuillClient, webhook: RecordingWebhookAdapter
) -> None:
    general, manager = channel("general"), discord.Permissions(manage_guild=True)
    scope = [{"name": "scope", "type": 3, "value": "guild"}]
    await invoke(interaction_payload(bot, general, member("ada"), ["quill", "sync"], scope, permissions=manager))
    published = {c["name"]: {o["name"]: o for o in c.get("options", [])} for c in bot.api.synced[str(general.guild.id)]}
    days = published["retention"]["days"]
    assert (days["type"], days["min_value"], days["max_value"], days["required"]) == (4, 0, 36_500, False)
    hours = published["summarize"]["hours"]
    assert (hours["type"], hours["min_value"], hours["max_value"]) == (4, 1, 24 * 365)
    assert [c["value"] for c in published["write"]["tone"]["choices"]] == ["formal", "friendly", "concise"]
    name = published["kb-add"]["name"]
    assert (name["type"], name["min_length"], name["max_length"]) == (3, 1, 100)


async def test_a_slash_number_out_of_range_is_refused_before_the_plugin(
    bot: QuillClient, app: Quill, webhook: RecordingWebhookAdapter
) -> None:
    """Discord enforces the bounds it was given; a stale command published before them still
    reaches the router, which refuses it naming the option."""
    general, manager = channel("general"), discord.Permissions(manage_guild=True)
    huge = [{"name": "days", "type": 4, "value": 10**12}]
    await invoke(interaction_payload(bot, general, member("ada"), ["retention"], huge, permissions=manager))
    assert "days takes a whole number from 0 to 36,500" in webhook.texts()[-1]
    assert await app.memory.get_settings(str(general.guild.id), "", "privacy") == {}
    ok = [{"name": "days", "type": 4, "value": 7}]
    await invoke(interaction_payload(bot, general, member("ada"), ["retention"], ok, permissions=manager))
    assert await app.memory.get_settings(str(general.guild.id), "", "privacy") == {"privacy.retention_days": 7}


async def test_forget_channel_by_a_member_is_refused_privately_and_by_mention_names_the_permission(
    bot: QuillClient, app: Quill, webhook: RecordingWebhookAdapter
) -> None:
    general, bob = channel("general"), member("bob")
    await post(general, bob, "meeting at 4")  # history of the channel
    text = [{"name": "text", "type": 3, "value": "channel"}]
    await invoke(interaction_payload(bot, general, bob, ["forget"], text))
    assert webhook.ephemeral()  # deferred privately: refusal (or answer) seen by bob alone
    assert "admins only" in webhook.texts()[-1] and "Manage Server" in webhook.texts()[-1]
    assert len(await stored(app, str(general.guild.id), str(general.id))) == 1

    await post(general, bob, f"{bot.user.mention} /kb-add name:notes some text")
    [refusal] = await bot_messages(bot, general)
    assert "/kb-add is for admins only" in refusal.content and "Manage Server" in refusal.content


async def test_several_files_attached_to_kb_add_become_one_document_each(
    bot: QuillClient, app: Quill, tmp_path: Any
) -> None:
    app.settings.admin_ids = [str(member("ada").id)]
    (tmp_path / "vpn.md").write_text("# VPN\n\nThe WireGuard key rotates every ninety days.\n")
    (tmp_path / "值班.txt").write_text("值班每班一周，结束后可以调休一天。", encoding="utf-8")
    (tmp_path / "empty.md").write_text("  \n")
    general = channel("general")
    files = [str(tmp_path / n) for n in ("vpn.md", "值班.txt", "empty.md")]
    await dpytest.message(
        f"{bot.user.mention} /kb-add name:handbook", channel=general, member=member("ada"), attachments=files
    )
    await dpytest.run_all_events()
    [answer] = await bot_messages(bot, general)
    assert "“handbook/vpn.md” (1 passage)" in answer.content and "“handbook/值班.txt”" in answer.content
    assert "empty.md: not added, it is empty" in answer.content
    where = ("discord", str(general.guild.id), str(general.id))
    (hit,) = await app.context.search.search("值班结束后能休息吗？", *where, 4, min_relevance=0.4)
    assert hit.name == "handbook/值班.txt"


def zh_cn(payload: dict[str, Any]) -> dict[str, Any]:
    """The interaction as a Discord client set to Simplified Chinese sends it."""
    return {**payload, "locale": "zh-CN"}


async def test_a_zh_cn_slash_command_gets_chinese_refusals_and_usage_and_an_english_user_english(
    bot: QuillClient, app: Quill, webhook: RecordingWebhookAdapter
) -> None:
    general, manager = channel("general"), discord.Permissions(manage_guild=True)
    huge = [{"name": "days", "type": 4, "value": 10**12}]
    await invoke(zh_cn(interaction_payload(bot, general, member("ada"), ["retention"], huge, permissions=manager)))
    refusal = webhook.texts()[-1]
    assert refusal.startswith("/retention：days 需要0 到 36,500 之间的整数") and "用法：/retention" in refusal
    await invoke(interaction_payload(bot, general, member("bob"), ["retention"], huge, permissions=manager))
    assert webhook.texts()[-1].startswith("/retention: days takes a whole number from 0 to 36,500")
    await invoke(zh_cn(interaction_payload(bot, general, member("bob"), ["secret"], [])))
    assert webhook.texts()[-1] == "/secret 仅限管理员使用。这需要“管理服务器”权限（或你的 ID 在 QUILL_ADMIN_IDS 中）。"
    await invoke(zh_cn(interaction_payload(bot, general, member("bob"), ["help"], [])))
    listed = webhook.texts()[-1]
    assert listed.startswith("命令：") and "/ask" in listed and "根据团队知识库和以往消息回答问题" in listed
    await invoke(interaction_payload(bot, general, member("ada"), ["help"], []))
    assert webhook.texts()[-1].startswith("Commands:")


async def test_the_translator_gives_every_quill_command_and_option_a_chinese_description(
    bot: QuillClient, probe: ProbePlugin, webhook: RecordingWebhookAdapter
) -> None:
    await bot.setup_hook()  # where the client sets its translator (syncing globally too)
    general, manager = channel("general"), discord.Permissions(manage_guild=True)
    scope = [{"name": "scope", "type": 3, "value": "guild"}]
    await invoke(zh_cn(interaction_payload(bot, general, member("ada"), ["quill", "sync"], scope, permissions=manager)))
    assert (
        webhook.texts()[-1] == f"已向本服务器同步 {len(bot.api.synced[str(general.guild.id)])} 个命令；现在即可使用。"
    )
    probes = {"echo", "secret", "card", "long", "slow"}  # the test plugin's, which ships no catalog
    published = [c for c in bot.api.synced[str(general.guild.id)] if c["name"] not in probes]
    assert {c["name"] for c in published} >= {"ask", "summarize", "digest", "help", "quill", "language"}

    def described(item: dict[str, Any]) -> list[tuple[str, str, str | None]]:
        """(name, English, zh-CN) of an item and of every option and subcommand under it."""
        own = [(item["name"], item["description"], (item.get("description_localizations") or {}).get("zh-CN"))]
        return own + [d for option in item.get("options", []) for d in described(option)]

    everything = [d for command in published for d in described(command)]
    untranslated = [(name, english) for name, english, chinese in everything if not chinese or chinese == english]
    # The free-text option's description is the command's usage syntax (`<question>`), not prose.
    assert [(n, e) for n, e in untranslated if n != "text"] == []
    ask = next(c for c in published if c["name"] == "ask")
    assert ask["description_localizations"]["zh-CN"] == "根据团队知识库和以往消息回答问题，并注明来源"
    assert "團隊知識庫" in ask["description_localizations"]["zh-TW"]  # a Taiwanese client: Traditional
    assert ask["description"].startswith("answer a question")  # English stays the default
    assert all(len(chinese or "") <= 100 for _name, _english, chinese in everything)
