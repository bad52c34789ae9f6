"""Scheduled jobs: APScheduler in the bot's event loop, jobs kept in the bot's own database.

A job runs a router command (`/digest`, ...) as if typed in a place and hands the reply to the
transport's poster, which posts it to a target channel. Jobs live in APScheduler's
`apscheduler_jobs` table, so schedules survive restarts.

APScheduler's guide forbids two schedulers running jobs from one job store (jobs run twice or
are missed). Every process opens its scheduler *paused* (it can still add, list and remove
jobs); only the leader runs them. On PostgreSQL the leader is the process holding a session
advisory lock (`pg_try_advisory_lock`): the others retry every `QUILL_SCHEDULER_POLL_SECONDS`
and take over when it dies (its session, and so its lock, ends with it). On SQLite one bot
process is assumed; run a second one with `QUILL_SCHEDULER_ENABLED=false`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import re
import threading
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.job import Job
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.util import iscoroutinefunction_partial
from sqlalchemy import Connection, Engine, text

from bot.api import Place, Reply, Request
from bot.config import Settings
from bot.types import QuillError, Text

log = logging.getLogger(__name__)

JOBS_TABLE = "apscheduler_jobs"
SCHEDULER_AUTHOR_ID = "scheduler"
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TWO_DIGITS = re.compile("[0-9]{1,2}")  # ASCII: str.isdigit() also takes '²', which int() refuses


class ScheduleError(QuillError, ValueError):
    """A schedule that cannot be understood or found; the message is fit to show a user."""


class Poster(Protocol):
    """Posts a finished scheduled reply to `target` (a channel of `place`'s transport).

    Each transport gives the scheduler one: the console prints and appends to a Markdown file,
    Discord sends to the channel (an embed when the reply has a title)."""

    def __call__(self, place: Place, target: str, reply: Reply) -> Awaitable[None]: ...


@dataclass(frozen=True)
class JobInfo:
    """What `/schedule list` shows of a job."""

    id: str
    command: str
    when: str
    target: str
    place: Place
    next_run: datetime | None  # None: paused

    @property
    def paused(self) -> bool:
        return self.next_run is None


def parse_when(spec: str, default_tz: str) -> CronTrigger:
    """`daily HH:MM [TZ]`, `weekly DAY HH:MM [TZ]` or `cron M H DOM MON DOW [TZ]` as a trigger."""
    words = spec.split()
    usage = Text(
        "Say when as `daily HH:MM [Time/Zone]`, `weekly mon HH:MM [Time/Zone]` or "
        "`cron MIN HOUR DAY MONTH WEEKDAY [Time/Zone]` (e.g. `cron 0 9 * * mon-fri Europe/Paris`)."
    )
    if not words:
        raise ScheduleError(Text("No schedule given. {usage}", usage=usage))
    kind, rest = words[0].lower(), words[1:]
    fixed = {"daily": 1, "weekly": 2, "cron": 5}.get(kind)
    if fixed is None:
        raise ScheduleError(Text("Unknown schedule kind {kind}. {usage}", kind=repr(words[0]), usage=usage))
    if len(rest) not in (fixed, fixed + 1):
        raise ScheduleError(
            Text(
                "`{kind}` takes {count} value(s) and an optional time zone. {usage}",
                kind=kind,
                count=fixed,
                usage=usage,
            )
        )
    fields, tz_name = rest[:fixed], rest[fixed] if len(rest) > fixed else default_tz
    try:
        tz = ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a folder such as 'Europe'
        raise ScheduleError(
            Text("Unknown time zone {zone}; use an IANA name like Europe/Paris.", zone=repr(tz_name))
        ) from None
    if kind == "cron":
        try:
            return CronTrigger.from_crontab(" ".join(fields), timezone=tz)
        except ValueError as exc:
            raise ScheduleError(
                Text(
                    "Bad cron expression {expression}: {problem}. {usage}",
                    expression=repr(" ".join(fields)),
                    problem=str(exc),
                    usage=usage,
                )
            ) from None
    day = None
    if kind == "weekly":
        day = fields[0].lower()[:3]
        if day not in WEEKDAYS:
            raise ScheduleError(
                Text("Unknown weekday {day}; use one of {days}.", day=repr(fields[0]), days=", ".join(WEEKDAYS))
            )
    hour, sep, minute = fields[-1].partition(":")
    if not (
        sep and _TWO_DIGITS.fullmatch(hour) and _TWO_DIGITS.fullmatch(minute) and int(hour) < 24 and int(minute) < 60
    ):
        raise ScheduleError(Text("Bad time {time}; use 24-hour HH:MM, e.g. 09:30.", time=repr(fields[-1])))
    return CronTrigger(day_of_week=day, hour=int(hour), minute=int(minute), timezone=tz)


async def run_command_job(**spec: Any) -> None:
    """The function every stored job names. It is never called as such: each scheduler's
    executor runs the job through its own `Scheduler.execute`, which knows the router and the
    posters (a stored job can only name a module-level function)."""
    raise RuntimeError("scheduled jobs run through bot.scheduler.Scheduler")


class _OwnedExecutor(AsyncIOExecutor):
    """Runs each job with its owning Scheduler's `execute`, keeping APScheduler's misfire and
    event handling."""

    def __init__(self, owner: Scheduler) -> None:
        super().__init__()
        self.owner = owner

    def _do_submit_job(self, job: Job, run_times: list[datetime]) -> None:
        if job.func is not run_command_job:  # a maintenance job runs its own function
            super()._do_submit_job(job, run_times)
            return
        bound = copy.copy(job)  # a copy: the stored job keeps naming run_command_job
        bound.func = self.owner.execute
        bound._jobstore_alias = job._jobstore_alias
        super()._do_submit_job(bound, run_times)


COMMANDS = "default"  # the admins' jobs (/schedule), stored in the database
MAINTENANCE = "maintenance"


class Scheduler:
    """The bot's job scheduler: stores jobs always, runs them only while it leads."""

    def __init__(
        self,
        settings: Settings,
        db: Engine,
        run: Callable[[str, Request], Awaitable[Reply]],
    ) -> None:
        """`run(command, request)` runs a router command on its text form (Router.run_text)."""
        self.settings = settings
        self.db = db
        self.run = run
        self.posters: dict[str, Poster] = {}
        self.leading = False
        self._lock_conn: Connection | None = None
        # The lock's connection is used from worker threads; a check still running when the
        # watch is cancelled must finish before the connection is closed.
        self._lock_guard = threading.Lock()
        self._watch: asyncio.Task[None] | None = None
        self.aps = AsyncIOScheduler(
            jobstores={
                COMMANDS: SQLAlchemyJobStore(engine=db, tablename=JOBS_TABLE),
                # The core's own jobs (retention), added at every start: nothing to persist.
                MAINTENANCE: MemoryJobStore(),
            },
            executors={"default": _OwnedExecutor(self)},
            job_defaults={
                "coalesce": settings.scheduler_coalesce,
                "misfire_grace_time": settings.scheduler_misfire_grace_seconds,
                "max_instances": 1,
            },
            timezone=ZoneInfo(settings.scheduler_timezone),
        )

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Start paused: jobs can be added, listed and removed, none runs. Needs a running loop."""
        if not self.aps.running:
            self.aps.start(paused=True)

    async def run_jobs(self) -> None:
        """Run jobs from now on, as soon as this process leads (at once on SQLite)."""
        self.open()
        if not self.settings.scheduler_enabled or self._watch is not None:
            return
        await self._try_lead()
        self._watch = asyncio.create_task(self._keep_watch(), name="quill-scheduler-watch")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self.aps.running:
            self.aps.shutdown(wait=False)
        self.leading = False
        await asyncio.to_thread(self._release_lock)

    def _release_lock(self) -> None:
        with self._lock_guard:
            if self._lock_conn is not None:
                self._lock_conn.close()  # detached from the pool: ends the session and the lock with it
                self._lock_conn = None

    async def _keep_watch(self) -> None:
        """Followers retry the lock; the leader wakes up to see jobs other processes added."""
        while True:
            await asyncio.sleep(self.settings.scheduler_poll_seconds)
            try:
                if self.leading:
                    await asyncio.to_thread(self._check_lock)
                    self.aps.wakeup()
                else:
                    await self._try_lead()
            except Exception:
                log.exception("scheduler: leadership check failed; retrying")

    async def _try_lead(self) -> None:
        if await asyncio.to_thread(self._acquire_lock):
            self.leading = True
            self.aps.resume()
            log.info("scheduler: this process runs the scheduled jobs")

    def _acquire_lock(self) -> bool:
        if self.db.dialect.name != "postgresql":
            return True
        with self._lock_guard:
            if self._lock_conn is None:
                conn = self.db.connect()
                # The lock lives as long as the database session: a connection the pool kept
                # (and gave to someone else) would keep holding it after close.
                conn.detach()
                self._lock_conn = conn
            conn = self._lock_conn
            where = conn.execute(text("SELECT current_database() || '.' || current_schema()")).scalar_one()
            key = zlib.crc32(f"quill-scheduler:{where}".encode())  # one leader per database schema
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar_one())
            conn.commit()
            return got

    def _check_lock(self) -> None:
        """A leader whose lock session broke stops running jobs (another may have taken over)."""
        with self._lock_guard:
            if self._lock_conn is None:
                return
            try:
                self._lock_conn.execute(text("SELECT 1"))
                self._lock_conn.commit()
                return
            except Exception:
                log.warning("scheduler: lost the database session holding the lock; pausing")
                with contextlib.suppress(Exception):
                    self._lock_conn.close()
                self._lock_conn = None
        self.aps.pause()
        self.leading = False

    # -- jobs ------------------------------------------------------------------------------

    def add_maintenance(self, job_id: str, when: str, work: Callable[[], Awaitable[object]]) -> None:
        """A job of the core's own (e.g. retention), run like the others only where this process
        leads, so two processes never both run it; kept in memory, added again at each start.
        `work` is a coroutine function (or a partial of one): APScheduler awaits only those."""
        if not iscoroutinefunction_partial(work):
            raise TypeError(f"maintenance job {job_id} needs a coroutine function")
        trigger = parse_when(when, self.settings.scheduler_timezone)
        self.aps.add_job(work, trigger, id=job_id, name=job_id, jobstore=MAINTENANCE, replace_existing=True)

    def preview(self, when: str, count: int = 5) -> list[datetime]:
        """The next `count` run times of a schedule (ScheduleError if it cannot be understood),
        for a form to show before the job is added."""
        trigger = parse_when(when, self.settings.scheduler_timezone)
        times: list[datetime] = []
        moment = datetime.now(trigger.timezone)
        while len(times) < count:
            following = trigger.get_next_fire_time(times[-1] if times else None, moment)
            if following is None:
                break
            times.append(following)
            moment = following + timedelta(seconds=1)
        return times

    async def add(self, job_id: str, when: str, place: Place, command: str, target: str) -> JobInfo:
        """Schedule `command` (e.g. "/digest") to run in `place`, its reply posted to `target`.
        Re-adding an id replaces that job."""
        if not job_id or len(job_id) > 100 or not job_id.replace("-", "").replace("_", "").isalnum():
            raise ScheduleError(Text("A job name uses letters, digits, - and _ (at most 100)."))
        name, _, args = command.strip().removeprefix("/").partition(" ")
        if not name:
            raise ScheduleError(Text("Say which command the job runs, e.g. /digest."))
        trigger = parse_when(when, self.settings.scheduler_timezone)
        spec = {
            "command": name.lower(),
            "text": args.strip(),
            "when": when.strip(),
            "target": target,
            "transport": place.transport,
            "guild_id": place.guild_id,
            "channel_id": place.channel_id,
        }
        await asyncio.to_thread(
            self.aps.add_job,
            run_command_job,
            trigger,
            id=job_id,
            name=job_id,
            kwargs=spec,
            replace_existing=True,
        )
        return await self.get(job_id)

    async def get(self, job_id: str) -> JobInfo:
        job = await asyncio.to_thread(self.aps.get_job, job_id, COMMANDS)
        if job is None:
            raise ScheduleError(Text("No scheduled job named {name}. /schedule list shows them.", name=repr(job_id)))
        return _info(job)

    async def jobs(self) -> list[JobInfo]:
        return [_info(job) for job in await asyncio.to_thread(self.aps.get_jobs, COMMANDS)]

    async def pause(self, job_id: str) -> JobInfo:
        await self._modify(self.aps.pause_job, job_id)
        return await self.get(job_id)

    async def resume(self, job_id: str) -> JobInfo:
        await self._modify(self.aps.resume_job, job_id)
        return await self.get(job_id)

    async def remove(self, job_id: str) -> None:
        await self._modify(self.aps.remove_job, job_id)

    async def run_now(self, job_id: str) -> Reply:
        """Run a job here and now (paused or not, leader or not), outside its schedule."""
        job = await asyncio.to_thread(self.aps.get_job, job_id, COMMANDS)
        if job is None:
            raise ScheduleError(Text("No scheduled job named {name}. /schedule list shows them.", name=repr(job_id)))
        return await self.execute(**job.kwargs)

    async def _modify(self, action: Callable[[str, str], object], job_id: str) -> None:
        try:
            await asyncio.to_thread(action, job_id, COMMANDS)
        except JobLookupError:
            raise ScheduleError(
                Text("No scheduled job named {name}. /schedule list shows them.", name=repr(job_id))
            ) from None

    async def execute(self, **spec: Any) -> Reply:
        """Run a job's command in its place and post the finished reply to its target.

        An empty reply (a digest of a quiet period set to say nothing) is not posted."""
        place = Place(spec["transport"], spec["guild_id"], spec["channel_id"])
        request = Request(
            transport=place.transport,
            guild_id=place.guild_id,
            channel_id=place.channel_id,
            author_id=SCHEDULER_AUTHOR_ID,
            author_name=SCHEDULER_AUTHOR_ID,
            text=spec["text"],
            is_admin=True,  # an admin scheduled it
        )
        reply = await finished(await self.run(spec["command"], request))
        poster = self.posters.get(place.transport)
        if not reply.text:
            log.info("scheduled /%s in %s: nothing to post", spec["command"], place)
        elif poster is None:
            log.error("scheduled /%s: no poster for %r; reply dropped", spec["command"], place.transport)
        else:
            await poster(place, spec["target"], reply)
        return reply


def _info(job: Job) -> JobInfo:
    spec = job.kwargs
    return JobInfo(
        id=job.id,
        command=f"/{spec['command']} {spec['text']}".strip(),
        when=spec["when"],
        target=spec["target"],
        place=Place(spec["transport"], spec["guild_id"], spec["channel_id"]),
        next_run=job.next_run_time,
    )


async def finished(reply: Reply) -> Reply:
    """The reply with its stream read to the end: posters get whole texts."""
    if reply.stream is None:
        return reply
    text = "".join([piece async for piece in reply.stream])
    return dataclasses.replace(reply, text=text.strip(), stream=None)
