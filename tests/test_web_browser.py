"""The admin panel in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium,
never a downloaded one) against the panel served by uvicorn on 127.0.0.1 from the bot's own
loop, over the real core and a SQLite database. Screenshots go to the test's tmp_path."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.api import Request
from bot.app import Quill
from bot.engine.local import LocalEngine
from bot.web.server import serving
from tests.conftest import make_settings
from tests.web_helpers import MANAGED, add_run, free_port, seed

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install -y chromium)"
)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"]
CONSOLE = "console-@console"
TIMEOUT_MS = 30_000


@pytest.fixture
async def site(tmp_path: Path, engine: LocalEngine) -> AsyncIterator[tuple[Quill, str, str]]:
    """(the core, the panel's address, a one-time log-in link) with the panel served for real."""
    port = free_port()
    settings = make_settings(tmp_path, web_port=port, database_url=f"sqlite:///{tmp_path / 'quill.db'}")
    quill = await Quill.start(settings, engine=engine)
    await seed(quill)
    async with serving(quill) as panel:
        assert panel is not None
        yield quill, panel.base_url, panel.login_link()
    await quill.close(close_engine=False)


@pytest.fixture
async def page(site: tuple[Quill, str, str]) -> AsyncIterator[Any]:
    """A logged-in browser tab: the log-in link opened once."""
    from playwright.async_api import async_playwright

    _quill, base, link = site
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        tab = await browser.new_page(viewport={"width": 1100, "height": 800})
        tab.set_default_timeout(TIMEOUT_MS)
        await tab.goto(link)
        await tab.wait_for_url(f"{base}/")
        yield tab
        await browser.close()


async def test_log_in_with_the_one_time_link(page: Any, site: tuple[Quill, str, str], tmp_path: Path) -> None:
    _quill, _base, link = site
    assert await page.locator("h1").inner_text() == "Overview"
    assert await page.locator("text=Log out").count() == 1
    await page.screenshot(path=tmp_path / "overview.png", full_page=True)
    other = await page.context.browser.new_page()
    await other.goto(link)  # spent: a second visit (another browser profile) is refused
    assert "already used" in await other.content()


async def test_upload_two_files_and_see_them_listed(page: Any, site: tuple[Quill, str, str], tmp_path: Path) -> None:
    quill, base, _link = site
    (tmp_path / "deploy.md").write_text("# Deploys\n\nWe deploy on Fridays with the blue button.\n")
    (tmp_path / "部署.md").write_text("# 部署\n\n我们每周五用蓝色按钮部署。\n")
    await page.goto(f"{base}/s/{CONSOLE}/qa/kb")
    await page.set_input_files("input[type=file]", [tmp_path / "deploy.md", tmp_path / "部署.md"])
    await page.click("text=Upload")
    await page.wait_for_selector("#documents >> text=部署.md")
    table = await page.locator("#documents").inner_text()
    assert "deploy.md" in table and "部署.md" in table
    await page.screenshot(path=tmp_path / "kb.png", full_page=True)
    assert sorted(n for n, _ in await quill.context.search.list_documents("console", "", "console")) == [
        "deploy.md",
        "部署.md",
    ]


async def test_the_search_tester_shows_the_passage(page: Any, site: tuple[Quill, str, str], tmp_path: Path) -> None:
    quill, base, _link = site
    await quill.context.search.add_document("console", "", "console", "runbook", "# Deploys\n\nWe deploy on Fridays.")
    await page.goto(f"{base}/s/{CONSOLE}/qa/search")
    await page.fill("input[name=q]", "When do we deploy?")
    await page.click("button:has-text('Search')")
    first = page.locator("#hits tr").nth(1)
    await first.wait_for()
    text = await first.inner_text()
    assert "We deploy on Fridays." in text and "yes" in text
    await page.screenshot(path=tmp_path / "search.png", full_page=True)


async def test_add_and_pause_a_schedule(page: Any, site: tuple[Quill, str, str], tmp_path: Path) -> None:
    quill, base, _link = site
    await page.goto(f"{base}/s/discord-{MANAGED}/schedule/schedules")
    await page.fill("form.inline input[name=when]", "weekly mon 09:00 Europe/Paris")
    await page.click("text=Show the next runs")
    assert await page.locator("#preview li").count() == 5
    form = page.locator("#add-job")
    await form.locator("input[name=job]").fill("weekly-digest")
    await form.locator("input[name=command]").fill("/digest")
    await form.locator("input[name=channel]").fill("general")
    await form.locator("button[type=submit]").click()
    row = page.locator("#jobs tr", has_text="weekly-digest")
    await row.locator("text=Pause").click()
    await page.locator("#jobs tr", has_text="weekly-digest").locator("text=Resume").wait_for()
    assert "paused" in await page.locator("#jobs tr", has_text="weekly-digest").inner_text()
    assert (await quill.scheduler.get("weekly-digest")).paused
    await page.screenshot(path=tmp_path / "schedules.png", full_page=True)


async def test_open_a_fine_tune_run_and_see_its_chart(page: Any, site: tuple[Quill, str, str], tmp_path: Path) -> None:
    quill, base, _link = site
    run = add_run(quill, [2.6, 2.1, 1.7, 1.2, 0.9, 0.8])
    await page.goto(f"{base}/s/{CONSOLE}/finetune/runs")
    await page.click(f"text=run {run}")
    chart = page.locator("svg.chart")
    await chart.wait_for()
    box = await chart.bounding_box()
    assert box is not None and box["width"] > 300 and box["height"] > 150
    assert await chart.locator("circle").count() == 6
    await page.screenshot(path=tmp_path / "finetune.png", full_page=True)


async def test_a_per_server_setting_takes_effect_on_the_next_request(
    page: Any, site: tuple[Quill, str, str], tmp_path: Path
) -> None:
    """The channel's language set to Chinese in the panel: the next /help through the router answers in Chinese."""
    quill, base, _link = site
    ask = Request("discord", "general", "u1", "/help", guild_id=MANAGED)
    assert "Commands:" in (await quill.router.handle(ask)).text
    await page.goto(f"{base}/s/discord-{MANAGED}/settings?channel=general")
    form = page.locator("#settings-language\\.channel")
    await form.locator("input[name=locale]").fill("zh-CN")
    await form.locator("button[type=submit]").click()
    await page.locator(".flash", has_text="Saved the language settings").wait_for()
    await page.screenshot(path=tmp_path / "settings.png", full_page=True)
    answer = (await quill.router.handle(ask)).text
    assert "Commands:" not in answer and re.search(r"[\u4e00-\u9fff]", answer)
