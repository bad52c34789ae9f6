"""Scheduled jobs on real APScheduler with its SQLAlchemy job store (SQLite; PostgreSQL too)."""

from __future__ import annotations

import asyncio
import io
import zlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MISSED, EVENT_JOB_SUBMITTED
from sqlalchemy import text as sql

from bot.api import Place, Reply, Request
from bot.app import Quill
from bot.config import Settings
from bot.engine.local import LocalEngine
from bot.scheduler import ScheduleError, parse_when
from bot.transports.console import ConsoleTransport
from tests.conftest import make_settings

PLACE = Place("console", "", "team")


class Recorder:
    """A poster that keeps what it was given."""

    def __init__(self) -> None:
        self.posts: list[tuple[Place, str, Reply]] = []

    async def __call__(self, place: Place, target: str, reply: Reply) -> None:
        self.posts.append((place, target, reply))


def admin(text: str, **fields: object) -> Request:
    values: dict[str, object] = {
        "transport": PLACE.transport,
        "channel_id": PLACE.channel_id,
        "author_id": "ada",
        "author_name": "Ada",
        "text": text,
        "is_admin": True,
    }
    values.update(fields)
    return Request(**values)  # type: ignore[arg-type]


async def ask(app: Quill, text: str, **fields: object) -> Reply:
    return await app.router.handle(admin(text, **fields))


async def started(settings: Settings, engine: LocalEngine) -> Quill:
    """The core with a recording poster and without the summarizer: its grammar-bound summary
    of a digest takes minutes on a shared 2-core machine, and tests/test_summarize.py covers it."""
    quill = await Quill.start(settings, engine=engine)
    quill.plugins.unregister(name="plugins.summarize")
    quill.scheduler.posters["console"] = Recorder()
    return quill


@pytest.fixture
async def bot(settings: Settings, engine: LocalEngine) -> AsyncIterator[Quill]:
    quill = await started(settings, engine)
    yield quill
    await quill.close(close_engine=False)


def posts(app: Quill) -> list[tuple[Place, str, Reply]]:
    return app.scheduler.posters["console"].posts  # type: ignore[attr-defined]


async def seed(app: Quill, channel: str = "team") -> None:
    conv = await app.memory.conversation("console", "", channel)
    for author, text in [("ada", "the release is friday"), ("bob", "ok"), ("ada", "who reviews?")]:
        await app.memory.add_message(conv.id, role="user", content=text, author_id=author, author_name=author)


class Events:
    """What a scheduler did with its jobs (APScheduler's own events), to wait on."""

    def __init__(self, app: Quill) -> None:
        self.seen: list[tuple[int, str]] = []
        app.scheduler.aps.add_listener(
            lambda event: self.seen.append((event.code, event.job_id)),
            EVENT_JOB_SUBMITTED | EVENT_JOB_EXECUTED | EVENT_JOB_ERROR | EVENT_JOB_MISSED,
        )

    def __call__(self, code: int, job_id: str) -> bool:
        return (code, job_id) in self.seen


def count_calls(monkeypatch: pytest.MonkeyPatch, app: Quill) -> list[int]:
    """Counts the scheduler's tries at the leader lock (each poll of a follower), so a test can
    wait for polls to have happened instead of sleeping."""
    tries = [0]
    real = app.scheduler._try_lead

    async def try_lead() -> None:
        tries[0] += 1
        await real()

    monkeypatch.setattr(app.scheduler, "_try_lead", try_lead)
    return tries


async def wait_for(condition, seconds: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def test_presets_and_cron_parse() -> None:
    daily = parse_when("daily 09:30 Europe/Paris", "UTC")
    assert str(daily.timezone) == "Europe/Paris"
    assert {f.name: str(f) for f in daily.fields}["hour"] == "9"
    weekly = parse_when("weekly Monday 18:05", "UTC")
    assert {f.name: str(f) for f in weekly.fields}["day_of_week"] == "mon"
    cron = parse_when("cron */15 8-18 * * mon-fri", "America/New_York")
    assert {f.name: str(f) for f in cron.fields}["minute"] == "*/15"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "No schedule given"),
        ("hourly 10", "Unknown schedule kind 'hourly'"),
        ("daily 25:00", "Bad time '25:00'"),
        ("daily 9", "Bad time '9'"),
        ("daily \u00b2:00", "Bad time '\u00b2:00'"),  # '²' passes str.isdigit(), not int()
        ("weekly funday 09:00", "Unknown weekday 'funday'"),
        ("daily 09:00 Mars/Base", "Unknown time zone 'Mars/Base'"),
        ("daily 09:00 Europe", "Unknown time zone .Europe."),
        ("cron 0 9 * *", "`cron` takes 5 value"),
        ("cron 99 9 * * *", "Bad cron expression '99 9 \\* \\* \\*'"),
    ],
)
def test_bad_schedules_get_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        parse_when(spec, "UTC")


async def test_bad_schedule_via_the_command_is_refused_and_adds_nothing(bot: Quill) -> None:
    reply = await ask(bot, "/schedule add d daily 9am /digest")
    assert reply.failed and "Bad time '9am'" in reply.text
    reply = await ask(bot, "/schedule add d daily 09:00")
    assert reply.failed and "Say which command" in reply.text
    assert (await ask(bot, "/schedule list")).text == "No scheduled jobs."


async def test_schedule_is_for_admins(bot: Quill) -> None:
    reply = await ask(bot, "/schedule list", is_admin=False)
    assert reply.failed and "admins only" in reply.text


async def test_schedules_survive_a_restart(settings: Settings, engine: LocalEngine) -> None:
    first = await started(settings, engine)
    reply = await ask(first, "/schedule to:digests add team-digest daily 09:00 Europe/Paris /digest")
    assert not reply.failed, reply.text
    before = await first.scheduler.get("team-digest")
    await first.close(close_engine=False)

    again = await started(settings, engine)  # a new scheduler on the same database
    try:
        (job,) = await again.scheduler.jobs()
        assert (job.id, job.command, job.target, job.place) == ("team-digest", "/digest", "digests", PLACE)
        assert job.next_run == before.next_run and job.next_run.hour == 9
        # Adding the same id again replaces it rather than adding a copy.
        await ask(again, "/schedule add team-digest daily 10:00 /digest")
        assert [j.id for j in await again.scheduler.jobs()] == ["team-digest"]
    finally:
        await again.close(close_engine=False)


async def test_run_now_posts_the_digest_to_the_target(bot: Quill) -> None:
    await seed(bot)
    await ask(bot, "/schedule to:digests add d weekly fri 17:00 /digest")
    reply = await ask(bot, "/schedule run d")
    assert reply.text == "Ran d."
    ((place, target, post),) = posts(bot)
    assert (place, target) == (PLACE, "digests")
    assert post.title and post.title.startswith("Digest since")
    assert "3 messages from 2 people" in post.text
    # The next digest covers only what came after this one.
    await ask(bot, "/schedule run d")
    assert posts(bot)[1][2].text == "Nothing new."


async def test_a_due_job_runs_once_from_the_scheduler(bot: Quill) -> None:
    await seed(bot)
    await ask(bot, "/schedule add d daily 09:00 /digest")
    await bot.scheduler.run_jobs()
    assert bot.scheduler.leading
    events = Events(bot)
    bot.scheduler.aps.modify_job("d", next_run_time=datetime.now(UTC))
    bot.scheduler.aps.wakeup()
    await wait_for(lambda: events(EVENT_JOB_EXECUTED, "d"))
    job = await bot.scheduler.get("d")
    assert job.next_run is not None and job.next_run > datetime.now(UTC)  # the next run is tomorrow
    # Its one run is over and the next is tomorrow: no second one can come today.
    assert len(posts(bot)) == 1 and [e for e in events.seen if e[0] == EVENT_JOB_SUBMITTED] == [
        (EVENT_JOB_SUBMITTED, "d")
    ]
    assert "3 messages" in posts(bot)[0][2].text


@pytest.mark.parametrize(("late", "runs"), [(timedelta(seconds=5), 1), (timedelta(hours=2), 0)])
async def test_missed_runs_follow_the_misfire_setting(
    tmp_path: Path, db_url: str, engine: LocalEngine, late: timedelta, runs: int
) -> None:
    """A run missed while the bot was down is made up within the grace time, skipped beyond it."""
    settings = make_settings(tmp_path, database_url=db_url, scheduler_misfire_grace_seconds=60)
    bot = await started(settings, engine)
    try:
        await seed(bot)
        await ask(bot, "/schedule add d daily 09:00 /digest")
        events = Events(bot)
        bot.scheduler.aps.modify_job("d", next_run_time=datetime.now(UTC) - late)
        await bot.scheduler.run_jobs()
        # Made up (run to its end, however loaded the machine) or skipped: either is an event.
        await wait_for(lambda: events(EVENT_JOB_EXECUTED, "d") or events(EVENT_JOB_MISSED, "d"))
        assert len(posts(bot)) == runs
    finally:
        await bot.close(close_engine=False)


async def test_pause_resume_and_remove(bot: Quill) -> None:
    await ask(bot, "/schedule add d daily 09:00 /digest")
    assert (await ask(bot, "/schedule pause d")).text == "Paused d."
    assert "d: /digest (daily 09:00) in team -> team; paused" in (await ask(bot, "/schedule list")).text
    assert (await bot.scheduler.get("d")).paused
    assert "next run" in (await ask(bot, "/schedule resume d")).text
    assert not (await bot.scheduler.get("d")).paused
    assert (await ask(bot, "/schedule remove d")).text == "Removed d."
    reply = await ask(bot, "/schedule run d")
    assert reply.failed and "No scheduled job named 'd'" in reply.text
    assert (await ask(bot, "/schedule pause nope")).failed
    assert (await ask(bot, "/schedule frobnicate")).text.startswith("Usage:")


async def test_a_paused_job_does_not_run(bot: Quill) -> None:
    await seed(bot)
    await ask(bot, "/schedule add d daily 09:00 /digest")
    await ask(bot, "/schedule add e daily 09:00 /kb-list")
    for job in ("d", "e"):  # both due now; d is then paused
        bot.scheduler.aps.modify_job(job, next_run_time=datetime.now(UTC) - timedelta(seconds=1))
    await ask(bot, "/schedule pause d")
    events = Events(bot)
    await bot.scheduler.run_jobs()
    await wait_for(lambda: events(EVENT_JOB_EXECUTED, "e"))  # the scheduler went through its due jobs
    ((_, _, post),) = posts(bot)
    assert "knowledge base" in post.text and not events(EVENT_JOB_SUBMITTED, "d")


@pytest.fixture
async def two_processes(tmp_path: Path, db_url: str, engine: LocalEngine) -> AsyncIterator[tuple[Quill, Quill]]:
    """Two bot processes on one database, their schedulers polling every 0.2 s."""
    settings = make_settings(tmp_path, database_url=db_url, scheduler_poll_seconds=0.2)
    one, two = await started(settings, engine), await started(settings, engine)
    yield one, two
    await one.close(close_engine=False)
    await two.close(close_engine=False)


async def lead(one: Quill, two: Quill) -> None:
    """Start both schedulers: the first takes the lock, the second follows."""
    await one.scheduler.run_jobs()
    await two.scheduler.run_jobs()
    assert (one.scheduler.leading, two.scheduler.leading) == (True, False)


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_two_processes_on_one_postgres_never_both_run_a_job(
    two_processes: tuple[Quill, Quill], monkeypatch: pytest.MonkeyPatch
) -> None:
    one, two = two_processes
    await seed(one)
    await ask(one, "/schedule add d daily 09:00 /digest")
    await lead(one, two)
    follower = Events(two)
    polls = count_calls(monkeypatch, two)
    one.scheduler.aps.modify_job("d", next_run_time=datetime.now(UTC))
    one.scheduler.aps.wakeup()
    await wait_for(lambda: len(posts(one)) == 1)
    after = polls[0]
    await wait_for(lambda: polls[0] >= after + 2)  # the follower polled, twice, since the run
    assert (len(posts(one)), len(posts(two)), follower.seen, two.scheduler.leading) == (1, 0, [], False)

    await one.close(close_engine=False)  # the leader dies; the follower takes over
    await wait_for(lambda: two.scheduler.leading)
    await ask(two, "/schedule add e daily 09:00 /digest")
    two.scheduler.aps.modify_job("e", next_run_time=datetime.now(UTC))
    two.scheduler.aps.wakeup()
    await wait_for(lambda: len(posts(two)) == 1)


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_a_leader_whose_lock_session_dies_stops_and_the_follower_takes_over(
    two_processes: tuple[Quill, Quill], monkeypatch: pytest.MonkeyPatch
) -> None:
    one, two = two_processes
    await lead(one, two)
    tries = count_calls(monkeypatch, one)
    # The database ends the leader's lock session (a restart, a network cut, an admin).
    with one.memory.engine.connect() as conn:
        where = conn.execute(sql("SELECT current_database() || '.' || current_schema()")).scalar_one()
        key = zlib.crc32(f"quill-scheduler:{where}".encode())
        ended = conn.execute(
            sql("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype='advisory' AND objid=:k AND granted"),
            {"k": key},
        ).all()
    assert ended == [(True,)]
    await wait_for(lambda: not one.scheduler.leading)
    await wait_for(lambda: two.scheduler.leading)
    after = tries[0]
    await wait_for(lambda: tries[0] >= after + 2)  # the old leader retried, twice, after the take-over
    assert not one.scheduler.leading


async def test_the_console_posts_scheduled_replies_to_screen_and_a_markdown_file(bot: Quill) -> None:
    out = io.StringIO()
    ConsoleTransport(bot, channel="team", out=out)  # gives the scheduler its poster
    await seed(bot)
    await ask(bot, "/schedule to:#digests add d daily 09:00 /digest")
    await ask(bot, "/schedule run d")
    await ask(bot, "/schedule run d")
    assert "[to #digests] Digest since" in out.getvalue()
    kept = (bot.settings.data_dir / "posts" / "_digests.md").read_text()
    assert kept.count("## Digest since") == 2
    assert "3 messages from 2 people" in kept and "Nothing new." in kept
    # The first digest's chart lies beside the Markdown file, which shows it; the empty one has none.
    (chart,) = (bot.settings.data_dir / "posts").glob("_digests-*.png")
    assert chart.read_bytes().startswith(b"\x89PNG") and f"![chart]({chart.name})" in kept
