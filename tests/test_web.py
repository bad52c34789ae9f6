"""The admin panel over HTTP (httpx's ASGI transport, and uvicorn on 127.0.0.1 for Discord's
OAuth2 round trip): log-in, authorization per server, CSRF, escaping and CSP, bounded uploads,
no path from input, secrets, and its pages working on the real core and database."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from bot.app import Quill
from bot.engine.local import LocalEngine
from bot.models import utcnow
from bot.web.app import Panel
from bot.web.auth import LoginTokens, discord_visitor
from tests.conftest import make_settings
from tests.test_moderate import request
from tests.test_plugins import greeter  # noqa: F401  (the fixture: a plugin installed by entry point)
from tests.web_helpers import (
    CSRF,
    MANAGED,
    OTHER,
    add_run,
    client_for,
    csrf_of,
    fake_discord,
    free_port,
    logged_in,
    seed,
    served,
)

SECRETS = {"discord_token": "MTIz.discord-bot-token-never-shown", "openai_api_key": "sk-openai-key-never-shown"}
CLIENT_ID, CLIENT_SECRET = "4242", "oauth-client-secret-never-shown"
ADMIN_ID = "999"
CONSOLE = "console-@console"


@pytest.fixture
async def web_app(tmp_path: Path, db_url: str, engine: LocalEngine) -> AsyncIterator[Quill]:
    settings = make_settings(
        tmp_path,
        database_url=db_url,
        discord_client_id=CLIENT_ID,
        discord_client_secret=CLIENT_SECRET,
        admin_ids=[ADMIN_ID],
        max_document_chars=500,
        **SECRETS,
    )
    quill = await Quill.start(settings, engine=engine)
    await seed(quill)
    yield quill
    await quill.close(close_engine=False)


@pytest.fixture
async def panel(web_app: Quill) -> Panel:
    return Panel(web_app, live=True)


@pytest.fixture
async def admin(panel: Panel) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(panel) as client:
        await logged_in(client, panel)
        yield client


def guarded_paths(space: str) -> list[str]:
    return [
        "/",
        f"/s/{space}/settings",
        f"/s/{space}/conversations",
        f"/s/{space}/qa/kb",
        f"/s/{space}/qa/search",
        f"/s/{space}/schedule/schedules",
        f"/s/{space}/finetune/runs",
        f"/s/{space}/privacy/privacy",
        f"/s/{space}/moderate/moderation",
    ]


async def test_every_page_and_every_post_refuses_a_visitor_who_is_not_logged_in(panel: Panel) -> None:
    routes = {r.path for r in panel.app().routes}  # type: ignore[attr-defined]
    # Every guarded route is exercised below (the others: log-in, static files).
    assert routes - {"/login", "/login/link", "/login/discord", "/login/discord/callback", "/static/{name}"} == {
        "/",
        "/logout",
        "/s/{space}/settings",
        "/s/{space}/conversations",
        "/s/{space}/{plugin}/{page}",
    }
    async with client_for(panel) as client:
        for path in guarded_paths(f"discord-{MANAGED}"):
            response = await client.get(path)
            assert response.status_code == 303 and response.headers["location"] == "/login", path
            posted = await client.post(path, data={"action": "erase", "user": "u1", "csrf": "x"})
            assert posted.status_code in (401, 405), path
            assert "hello from" not in posted.text
        assert (await client.post("/logout")).status_code == 401
    assert await panel.quill.memory.export_user("u1")  # nothing was erased


async def test_a_login_link_works_once_and_expires(panel: Panel) -> None:
    async with client_for(panel) as client:
        link = panel.login_link()
        path = link.removeprefix(panel.base_url)
        assert (await client.get(path)).status_code == 303
        assert (await client.get("/")).status_code == 200
    async with client_for(panel) as again:
        refused = await again.get(path)
        assert refused.status_code == 403 and "already used" in refused.text
        assert (await again.get("/")).status_code == 303
        assert (await again.get("/login?token=guessed")).status_code == 403
    now = [1000.0]
    tokens = LoginTokens(minutes=15, clock=lambda: now[0])
    token = tokens.issue()
    now[0] += 15 * 60 + 1
    assert not tokens.redeem(token)
    fresh = tokens.issue()
    assert tokens.redeem(fresh) and not tokens.redeem(fresh)


async def test_logout_ends_the_session(admin: httpx.AsyncClient) -> None:
    csrf = await csrf_of(admin)
    assert (await admin.post("/logout", data={"csrf": csrf})).status_code == 303
    assert (await admin.get("/")).status_code == 303


async def test_the_session_cookie_is_httponly_samesite_lax_and_secure_behind_https(web_app: Quill) -> None:
    for url, secure in (("", False), ("https://panel.example.org", True)):
        web_app.settings.web_url = url
        panel = Panel(web_app, live=True)
        async with client_for(panel) as client:
            link = panel.login_link()
            response = await client.get(link.removeprefix(panel.base_url))
            cookie = response.headers["set-cookie"].lower()
            assert "httponly" in cookie and "samesite=lax" in cookie and "max-age=43200" in cookie
            assert ("secure" in cookie) is secure


async def test_discord_login_shows_only_the_servers_someone_manages(web_app: Quill) -> None:
    """The OAuth2 round trip against a fake Discord served on 127.0.0.1: the visitor has Manage
    Server on MANAGED only; OTHER's pages and forms answer 403 and change nothing."""
    port = free_port()
    guilds = [
        {"id": MANAGED, "name": "Team <b>A</b>", "owner": False, "permissions": str(0x20)},
        {"id": OTHER, "name": "Team B", "owner": False, "permissions": "0"},
    ]
    discord = fake_discord(CLIENT_ID, CLIENT_SECRET, {"id": "555", "username": "ada"}, guilds)
    panel = Panel(web_app, live=True, discord_api=f"http://127.0.0.1:{port}/api")
    async with served(discord, port), client_for(panel) as client:
        login = await client.get("/login")
        assert "/login/discord" in login.text
        to_discord = await client.get("/login/discord")
        assert to_discord.status_code == 302
        async with httpx.AsyncClient() as browser:
            consent = await browser.get(to_discord.headers["location"])
        callback = consent.headers["location"].removeprefix(panel.base_url)
        assert (await client.get(callback)).status_code == 303
        overview = await client.get("/")
        assert f"/s/discord-{MANAGED}/settings" in overview.text and "Team &lt;b&gt;A&lt;/b&gt;" in overview.text
        assert OTHER not in overview.text and "secret-plans" not in overview.text
        csrf = await csrf_of(client, f"/s/discord-{MANAGED}/settings")
        for path in guarded_paths(f"discord-{OTHER}")[1:] + guarded_paths(CONSOLE)[1:]:
            assert (await client.get(path)).status_code == 403, path
            posted = await client.post(path, data={"csrf": csrf, "action": "erase", "user": "u1"})
            assert posted.status_code == 403, path
        assert await web_app.memory.export_user("u1")
        # The fine-tune page acts on the whole bot: not for one server's admin.
        assert (await client.get(f"/s/discord-{MANAGED}/finetune/runs")).status_code == 403
        # A stale or forged callback is refused.
        assert (await client.get("/login/discord/callback?code=x&state=forged")).status_code == 403


def test_discord_admin_rights_come_from_manage_server_administrator_ownership_or_admin_ids() -> None:
    guilds = [
        {"id": "1", "name": "manage", "permissions": str(0x20)},
        {"id": "2", "name": "admin", "permissions": str(0x8)},
        {"id": "3", "name": "owned", "owner": True, "permissions": "0"},
        {"id": "4", "name": "member", "permissions": str(0x400 | 0x800)},
        {"id": "5", "name": "odd", "permissions": "not a number"},
    ]
    visitor = discord_visitor({"id": "7", "username": "ada"}, guilds, [])
    assert sorted(visitor.guilds) == ["1", "2", "3"] and not visitor.every
    assert visitor.manages("discord", "1") and not visitor.manages("discord", "4")
    assert not visitor.manages("console", "") and not visitor.manages("discord", "")
    assert discord_visitor({"id": "7"}, [], ["7"]).manages("discord", "4")
    assert not discord_visitor({"id": "7"}, [], ["7"]).manages("discord", "")  # DMs stay private


async def test_every_form_carries_the_csrf_token_and_a_post_without_it_is_refused(
    admin: httpx.AsyncClient, web_app: Quill
) -> None:
    add_run(web_app, [2.0, 1.5])
    pages = [*guarded_paths(CONSOLE), f"/s/{CONSOLE}/conversations?channel=console"]
    forms = 0
    for path in pages:
        html = (await admin.get(path)).text
        for form in re.findall(r"<form[^>]*method=\"post\".*?</form>", html, re.S):
            forms += 1
            assert CSRF.search(form), (path, form[:200])
    assert forms >= 8
    for path in guarded_paths(CONSOLE)[1:]:
        for data in ({}, {"csrf": "forged"}):
            response = await admin.post(path, data={**data, "action": "erase", "user": "u1"})
            assert response.status_code == 403, path
    assert await web_app.memory.export_user("u1")


async def test_output_is_escaped_and_every_response_has_a_content_security_policy(
    admin: httpx.AsyncClient, web_app: Quill
) -> None:
    csrf = await csrf_of(admin, f"/s/{CONSOLE}/qa/kb")
    name = "<script>alert(1)<script>.md"  # a "/" would end the name there: only the last part is kept
    files = [("files", (name, b"# Note\n\n<img src=x onerror=alert(2)> a harmless note"))]
    response = await admin.post(f"/s/{CONSOLE}/qa/kb", data={"csrf": csrf, "action": "upload"}, files=files)
    assert response.status_code == 303
    page = await admin.get(f"/s/{CONSOLE}/qa/kb")
    assert "&lt;script&gt;alert(1)&lt;script&gt;.md" in page.text and "<script>" not in page.text
    shown = await admin.get(f"/s/{CONSOLE}/qa/kb", params={"doc": name})
    assert "&lt;img src=x onerror=alert(2)&gt;" in shown.text and "<img" not in shown.text
    for path in ("/", "/login", f"/s/{CONSOLE}/qa/kb", "/static/panel.css", "/nowhere"):
        csp = (await admin.get(path)).headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp


async def test_uploads_are_bounded_by_size_and_type_and_the_rest_is_added(
    admin: httpx.AsyncClient, web_app: Quill
) -> None:
    csrf = await csrf_of(admin, f"/s/{CONSOLE}/qa/kb")
    files = [
        ("files", ("ok.md", "部署在周五。We deploy on Fridays.".encode())),
        ("files", ("long.txt", b"x" * 501)),  # QUILL_MAX_DOCUMENT_CHARS is 500 here
        ("files", ("tool.exe", b"MZ\x90\x00")),
        ("files", ("latin1.txt", "caf\xe9".encode("latin-1"))),
    ]
    response = await admin.post(f"/s/{CONSOLE}/qa/kb", data={"csrf": csrf, "action": "upload"}, files=files)
    assert response.status_code == 303
    page = (await admin.get(response.headers["location"])).text
    assert "over QUILL_MAX_DOCUMENT_CHARS (500)" in page and "not a text file" in page and "not UTF-8" in page
    docs = await web_app.context.search.list_documents("console", "", "console")
    assert [name for name, _ in docs] == ["ok.md"]


async def test_no_path_built_from_user_input_reaches_the_file_system(
    admin: httpx.AsyncClient, web_app: Quill, tmp_path: Path
) -> None:
    before = sorted(p for p in tmp_path.rglob("*") if "quill.db" not in p.name)
    for path in ("/static/..%2F..%2Fapp.py", "/static/../app.py", "/static/%2Fetc%2Fpasswd", "/static/app.py"):
        response = await admin.get(path)
        assert response.status_code == 404 and "import" not in response.text, path
    csrf = await csrf_of(admin, f"/s/{CONSOLE}/qa/kb")
    files = [("files", ("../../outside.md", b"escape attempt")), ("files", ("..\\..\\win.md", b"other"))]
    await admin.post(f"/s/{CONSOLE}/qa/kb", data={"csrf": csrf, "action": "upload"}, files=files)
    names = {name for name, _ in await web_app.context.search.list_documents("console", "", "console")}
    assert names == {"outside.md", "win.md"}
    assert not (tmp_path.parent / "outside.md").exists()
    after = sorted(p for p in tmp_path.rglob("*") if "quill.db" not in p.name)
    assert after == before
    assert (await admin.get("/s/..%2F..%2Fetc/settings")).status_code == 404


async def test_secrets_never_appear_in_a_page(admin: httpx.AsyncClient, web_app: Quill) -> None:
    add_run(web_app, [1.0])
    secrets = [*SECRETS.values(), CLIENT_SECRET]
    for path in guarded_paths(CONSOLE) + guarded_paths(f"discord-{MANAGED}") + ["/login"]:
        body = (await admin.get(path)).text
        assert not any(secret in body for secret in secrets), path


async def test_a_per_server_setting_is_saved_validated_and_read_by_the_next_request(
    admin: httpx.AsyncClient, web_app: Quill
) -> None:
    path = f"/s/discord-{MANAGED}/settings"
    page = await admin.get(path, params={"channel": "general"})
    assert 'id="settings-privacy.guild"' in page.text and 'id="settings-language.channel"' in page.text
    csrf = CSRF.search(page.text).group(1)  # type: ignore[union-attr]
    refused = await admin.post(
        path + "?channel=general", data={"csrf": csrf, "settings": "privacy.guild", "retention_days": "-3"}
    )
    assert "Not saved: privacy setting retention_days" in (await admin.get(refused.headers["location"])).text
    assert await web_app.memory.get_settings(MANAGED, "", "privacy") == {}
    await admin.post(
        path + "?channel=general", data={"csrf": csrf, "settings": "privacy.guild", "retention_days": "30"}
    )
    assert await web_app.memory.get_settings(MANAGED, "", "privacy") == {"privacy.retention_days": 30}
    await admin.post(path + "?channel=general", data={"csrf": csrf, "settings": "language.channel", "locale": "zh-CN"})
    from bot.api import Request

    reply = await web_app.router.handle(
        Request("discord", "general", "u1", "/retention", guild_id=MANAGED, is_admin=True)
    )
    assert reply.text == "此处的消息保留 30 天。" or ("30" in reply.text and re.search(r"[\u4e00-\u9fff]", reply.text))


async def test_the_search_tester_shows_lexical_semantic_and_fused_scores_against_the_threshold(
    admin: httpx.AsyncClient, web_app: Quill
) -> None:
    await web_app.context.search.add_document("console", "", "console", "runbook", "# Deploys\n\nWe deploy on Fridays.")
    await web_app.context.search.add_document("console", "", "console", "手册", "# 部署\n\n我们每周五部署新版本。")
    for question, passage in (
        ("When do we deploy?", "We deploy on Fridays."),
        ("我们什么时候部署？", "我们每周五部署新版本。"),
    ):
        page = (await admin.get(f"/s/{CONSOLE}/qa/search", params={"q": question})).text
        rows = re.findall(r"<tr>\s*<td>(\d+)</td>(.*?)</tr>", page, re.S)
        assert rows and passage in rows[0][1] and 'class="pass"' in rows[0][1]
    nothing = (await admin.get(f"/s/{CONSOLE}/qa/search", params={"q": "cinema tickets price"})).text
    assert 'class="pass"' not in nothing


async def test_schedules_are_added_with_a_preview_paused_and_kept_to_their_server(
    admin: httpx.AsyncClient, web_app: Quill
) -> None:
    path = f"/s/discord-{MANAGED}/schedule/schedules"
    preview = (await admin.get(path, params={"when": "daily 09:30 Asia/Shanghai"})).text
    assert len(re.findall(r"<li>", preview.split('id="preview"')[1].split("</ol>")[0])) == 5
    assert "Unknown time zone" in (await admin.get(path, params={"when": "daily 09:30 Mars/Base"})).text
    csrf = CSRF.search(preview).group(1)  # type: ignore[union-attr]
    form = {
        "csrf": csrf,
        "action": "add",
        "job": "morning",
        "when": "daily 09:30",
        "command": "/digest",
        "channel": "general",
    }
    assert (await admin.post(path, data=form)).status_code == 303
    await admin.get(path)  # shows (and clears) the message of the add
    bad = await admin.post(path, data={**form, "job": "bad", "when": "hourly"})
    shown = (await admin.get(bad.headers["location"])).text
    assert "Unknown schedule kind" in shown, re.findall(r"class=\"flash[^>]*>([^<]*)", shown)
    await admin.post(path, data={"csrf": csrf, "action": "pause", "job": "morning"})
    job = await web_app.scheduler.get("morning")
    assert job.paused and job.place.guild_id == MANAGED
    await web_app.scheduler.add("theirs", "daily 10:00", job.place._replace(guild_id=OTHER), "/digest", "c")
    assert "theirs" not in (await admin.get(path)).text
    await admin.post(path, data={"csrf": csrf, "action": "remove", "job": "theirs"})
    assert (await web_app.scheduler.get("theirs")).id == "theirs"  # another server's job is untouched


async def test_a_fine_tune_run_shows_its_loss_curve_nll_and_the_erased_user_warning(
    admin: httpx.AsyncClient, web_app: Quill
) -> None:
    run = add_run(web_app, [2.4, 1.8, 1.1, 0.7], note="trained on data of a since-erased user (2 examples): retrain")
    listing = (await admin.get(f"/s/{CONSOLE}/finetune/runs")).text
    assert f"run {run}" in listing and "served now" in listing and "erased user" in listing
    page = (await admin.get(f"/s/{CONSOLE}/finetune/runs", params={"run": run})).text
    svg = page.split("<svg", 1)[1].split("</svg>", 1)[0]
    assert "<polyline" in svg and svg.count("<circle") == 4 and "train loss" in svg
    assert "2.500" in page and "1.900" in page and "16 train, 4 held out" in page and "cannot unlearn" in page


async def test_conversations_show_recent_messages_a_chart_and_erase_a_channel(
    admin: httpx.AsyncClient, web_app: Quill
) -> None:
    path = f"/s/discord-{MANAGED}/conversations"
    page = await admin.get(path, params={"channel": "general"})
    assert "hello from general" in page.text and "Messages per day per channel" in page.text
    assert "secret-plans" not in page.text
    csrf = CSRF.search(page.text).group(1)  # type: ignore[union-attr]
    await admin.post(path + "?channel=general", data={"csrf": csrf, "action": "erase"})
    assert "hello from general" not in (await admin.get(path, params={"channel": "general"})).text
    assert "hello from secret-plans" in str(await web_app.memory.export_user("u1"))


async def test_the_overview_shows_the_engine_live(admin: httpx.AsyncClient, web_app: Quill) -> None:
    from bot.api import Request

    reply = await web_app.router.handle(Request("console", "console", "u1", "Say hi."))
    assert reply.stream is not None
    async for _piece in reply.stream:
        pass
    page = (await admin.get("/")).text
    assert "Replies in the last hour</dt><dd>1</dd>" in page
    assert re.search(r"p50 / p95</dt><dd>\d+\.\d\d s / \d+\.\d\d s", page)
    assert ('id="running">0<' in page and "sqlite" in page) or "postgresql" in page


async def test_the_panel_speaks_the_browsers_language_chinese_or_english(admin: httpx.AsyncClient) -> None:
    zh = await admin.get(f"/s/{CONSOLE}/schedule/schedules", headers={"accept-language": "zh-CN,zh;q=0.9"})
    assert "定时任务" in zh.text and "添加任务" in zh.text and "知识库" in zh.text and "Schedules" not in zh.text
    tw = await admin.get("/", headers={"accept-language": "zh-TW"})
    assert "概覽" in tw.text
    en = await admin.get(f"/s/{CONSOLE}/schedule/schedules", headers={"accept-language": "en-GB,en;q=0.8"})
    assert "Schedules" in en.text and "定时任务" not in en.text
    csrf = CSRF.search(zh.text).group(1)  # type: ignore[union-attr]
    refused = await admin.post(
        f"/s/{CONSOLE}/schedule/schedules",
        data={"csrf": csrf, "action": "pause", "job": "nope"},
        headers={"accept-language": "zh-CN"},
    )
    shown = await admin.get(refused.headers["location"], headers={"accept-language": "zh-CN"})
    assert "这里没有名为 nope 的定时任务。" in shown.text


@pytest.mark.usefixtures("greeter")
async def test_a_third_party_plugins_settings_appear_with_no_panel_code_of_its_own(
    tmp_path: Path, engine: LocalEngine
) -> None:
    """The greeter plugin (tests/test_plugins.py: installed by entry point, declares a GuildSettings
    and nothing for the panel) gets a form; what is saved there is what its command reads."""
    quill = await Quill.start(make_settings(tmp_path), engine=engine)
    try:
        await seed(quill)
        panel = Panel(quill, live=True)
        async with client_for(panel) as client:
            await logged_in(client, panel)
            path = f"/s/discord-{MANAGED}/settings"
            page = (await client.get(path)).text
            form = page.split('id="settings-greeter.guild"')[1].split("</form>")[0]
            assert "Whom it greets in this server." in form and 'maxlength="40"' in form
            csrf = CSRF.search(page).group(1)  # type: ignore[union-attr]
            await client.post(path, data={"csrf": csrf, "settings": "greeter.guild", "name": "Ada"})
            assert "GREETER_GREETING" in page and "你好" in page  # its global setting, read-only
        from bot.api import Request

        reply = await quill.router.handle(Request("discord", "general", "u1", "/greet", guild_id=MANAGED))
        assert reply.text == "你好, Ada!"
    finally:
        await quill.close(close_engine=False)


# -- the Moderation page (plugins/moderate.py) ----------------------------------------------

MODERATION = f"/s/discord-{MANAGED}/moderate/moderation"


def reports_table(html: str) -> str:
    return html.split('id="reports"')[1].split("</table>")[0]


async def flag(app: Quill, text: str, **fields: object) -> None:
    values: dict[str, object] = {"guild_id": MANAGED, "channel_id": "333", **fields}
    await app.router.observe(request(text, **values))


async def test_reports_are_listed_newest_first_escaped_with_jump_links_and_kept_to_their_server(
    admin: httpx.AsyncClient, web_app: Quill
) -> None:
    await web_app.memory.set_settings(MANAGED, "", {"moderate.terms": ["机密", "badword"]})
    await flag(web_app, "这份文件是机密，不要外传", message_id="444", author_name="小明")
    await flag(web_app, "<script>alert(1)</script> badword", message_id="555", author_id="u9")
    await web_app.memory.set_settings(OTHER, "", {"moderate.terms": ["badword"]})
    await flag(web_app, "their badword", guild_id=OTHER, message_id="666")
    table = reports_table((await admin.get(MODERATION)).text)
    assert table.index("badword") < table.index("机密") and "小明" in table and "词语“机密”" in table
    assert "&lt;script&gt;alert(1)&lt;/script&gt; badword" in table and "<script>" not in table
    assert f'href="https://discord.com/channels/{MANAGED}/333/444"' in table
    assert "their badword" not in table
    (theirs,) = await web_app.memory.reports("discord", OTHER, 10)
    csrf = await csrf_of(admin, MODERATION)
    refused = await admin.post(MODERATION, data={"csrf": csrf, "action": "dismiss", "report": str(theirs.id)})
    assert "There is no such report here." in (await admin.get(refused.headers["location"])).text
    assert len(await web_app.memory.reports("discord", OTHER, 10)) == 1  # another server's: untouched
    mine = await web_app.memory.reports("discord", MANAGED, 10)
    await admin.post(MODERATION, data={"csrf": csrf, "action": "dismiss", "report": str(mine[0].id)})
    assert [r.message_id for r in await web_app.memory.reports("discord", MANAGED, 10)] == ["444"]


async def test_a_term_added_on_the_page_flags_the_next_message_and_bad_input_is_told(
    admin: httpx.AsyncClient, web_app: Quill
) -> None:
    csrf = await csrf_of(admin, MODERATION)
    for term in ("凤凰", "phoenix"):
        added = await admin.post(MODERATION, data={"csrf": csrf, "action": "add", "term": f"  {term} "})
        assert added.status_code == 303
        assert f"Messages with “{term}” will be reported." in (await admin.get(added.headers["location"])).text
    await flag(web_app, "凤凰项目明天上线", message_id="1")
    await flag(web_app, "Project PHOENIX ships", message_id="2")
    await flag(web_app, "nothing to see", message_id="3")
    assert [r.reasons for r in await web_app.memory.reports("discord", MANAGED, 10)] == [
        "term “phoenix”",
        "词语“凤凰”",
    ]
    terms = (await admin.get(MODERATION)).text.split('id="terms"')[1].split("</ul>")[0]
    assert "凤凰" in terms and "phoenix" in terms
    empty = await admin.post(MODERATION, data={"csrf": csrf, "action": "add", "term": "   "})
    assert "Usage: /moderation" in (await admin.get(empty.headers["location"])).text
    missing = await admin.post(MODERATION, data={"csrf": csrf, "action": "remove", "term": "dragon"})
    assert "“dragon” is not one of this guild" in (await admin.get(missing.headers["location"])).text
    await admin.post(MODERATION, data={"csrf": csrf, "action": "remove", "term": "phoenix"})
    await flag(web_app, "phoenix again", message_id="4")
    assert len(await web_app.memory.reports("discord", MANAGED, 10)) == 2
    assert "凤凰" in (await admin.get(MODERATION)).text


async def test_a_post_without_the_csrf_token_changes_nothing(admin: httpx.AsyncClient, web_app: Quill) -> None:
    await web_app.memory.set_settings(MANAGED, "", {"moderate.terms": ["badword"]})
    await flag(web_app, "badword", message_id="7")
    (report,) = await web_app.memory.reports("discord", MANAGED, 10)
    html = (await admin.get(MODERATION)).text
    assert all(CSRF.search(f) for f in re.findall(r"<form[^>]*method=\"post\".*?</form>", html, re.S))
    for data in ({}, {"csrf": "forged"}):
        for form in ({"action": "dismiss", "report": str(report.id)}, {"action": "add", "term": "x"}):
            assert (await admin.post(MODERATION, data={**data, **form})).status_code == 403
    assert len(await web_app.memory.reports("discord", MANAGED, 10)) == 1
    assert "x" not in (await web_app.memory.get_settings(MANAGED, "", "moderate"))["moderate.terms"]


async def test_forget_erases_a_persons_reports_and_export_lists_them(web_app: Quill) -> None:
    await web_app.memory.set_settings(MANAGED, "", {"moderate.terms": ["机密"]})
    await flag(web_app, "机密文件", message_id="8", author_id="u5")
    await flag(web_app, "又是机密", message_id="9", author_id="u6")
    exported = await web_app.memory.export_user("u5")
    assert [r["excerpt"] for r in exported["moderation_report"]] == ["机密文件"]
    reply = await web_app.router.handle(request("/forget me", guild_id=MANAGED, author_id="u5"))
    assert not reply.failed, reply.text
    assert [r.author_id for r in await web_app.memory.reports("discord", MANAGED, 10)] == ["u6"]
    assert "moderation_report" not in await web_app.memory.export_user("u5")


async def test_retention_deletes_old_reports_with_old_messages(web_app: Quill) -> None:
    await web_app.memory.set_settings(MANAGED, "", {"moderate.terms": ["badword"], "privacy.retention_days": 30})
    await flag(web_app, "badword here", message_id="10")
    key = "privacy.retention_days"
    await web_app.memory.apply_retention(0, key, now=utcnow() + timedelta(days=29))
    assert len(await web_app.memory.reports("discord", MANAGED, 10)) == 1
    await web_app.memory.apply_retention(0, key, now=utcnow() + timedelta(days=31))
    assert await web_app.memory.reports("discord", MANAGED, 10) == []
