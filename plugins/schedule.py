"""Schedule: admins add, list, pause, resume, run and remove scheduled commands (digests, ...)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from bot.api import (
    N_,
    Command,
    Option,
    Page,
    Place,
    PluginContext,
    QuillError,
    Redirect,
    Reply,
    Request,
    ToolSpec,
    WebPage,
    WebRequest,
    _,
    error_text,
    format_datetime,
    hookimpl,
)

USAGE = N_(
    "/schedule add <name> <when> /<command> [args]  (option to:<channel>, default here)\n"
    "  when: daily HH:MM [Time/Zone] | weekly mon HH:MM [Time/Zone]\n"
    "        | cron MIN HOUR DAY MONTH WEEKDAY [Time/Zone]\n"
    "/schedule list | pause <name> | resume <name> | run <name> | remove <name>"
)
TEMPLATES = Path(__file__).parent / "templates" / "schedule"


async def schedule(ctx: PluginContext, request: Request) -> Reply:
    scheduler = ctx.scheduler
    if scheduler is None:
        return Reply(_("This process runs no scheduler."), failed=True)
    action, _sep, rest = request.text.partition(" ")
    action, rest = action.lower(), rest.strip()
    try:
        if action == "add":
            name, _sep, rest = rest.partition(" ")
            # The command starts at the first word beginning with "/" (time zones contain "/").
            when, slash, command = f" {rest}".partition(" /")
            if not slash:
                return Reply(_("Say which command to run, e.g. /digest.") + "\n" + _usage(), failed=True)
            place = request.place
            target = request.options.get("to") or request.channel_id
            job = await scheduler.add(name, when, place, "/" + command, target)
            summary = f"{job.command} ({job.when}) -> {job.target}"
            return Reply(
                _("Scheduled {job}: {summary}; next run {next}.", job=job.id, summary=summary, next=_when(job.next_run))
            )
        if action == "list":
            jobs = await scheduler.jobs()
            if not jobs:
                return Reply(_("No scheduled jobs."))
            lines = [
                f"{j.id}: {j.command} ({j.when}) "
                + _("in {channel}", channel=j.place.channel_id)
                + f" -> {j.target}; "
                + (_("paused") if j.paused else _("next {next}", next=_when(j.next_run)))
                for j in jobs
            ]
            return Reply("\n".join(lines), title=_("Scheduled jobs"))
        if action in ("pause", "resume", "remove", "run") and rest:
            if action == "pause":
                await scheduler.pause(rest)
                return Reply(_("Paused {job}.", job=rest))
            if action == "resume":
                job = await scheduler.resume(rest)
                return Reply(_("Resumed {job}; next run {next}.", job=rest, next=_when(job.next_run)))
            if action == "remove":
                await scheduler.remove(rest)
                return Reply(_("Removed {job}.", job=rest))
            reply = await scheduler.run_now(rest)
            return Reply(_("Ran {job}.", job=rest) if reply.text else _("Ran {job}; it had nothing to post.", job=rest))
    except QuillError as exc:  # a bad schedule or an unknown job: its message says which
        return Reply(error_text(exc), failed=True)
    return Reply(_usage(), failed=True)


def _when(moment: datetime | None) -> str:
    """A job's next run as the user's locale writes a date and time, with its zone."""
    return format_datetime(moment, "long") if moment else _("paused")


def _usage() -> str:
    return _("Usage:") + "\n" + _(USAGE)


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(
        Command(
            "schedule",
            N_("run commands on a schedule and post their replies (digests, ...)"),
            schedule,
            usage="add|list|pause|resume|run|remove ...",
            admin=True,
            options=(Option("to", N_("channel the job's replies are posted to (default: here)")),),
            tool=ToolSpec(
                changes=True,
                status=N_("scheduling…"),
                text="add <when> /<command>, for example: add daily 09:00 /digest",
            ),
        )
    )


# -- admin panel page -----------------------------------------------------------------------


async def schedules_page(ctx: PluginContext, request: WebRequest) -> Page | Redirect:
    """A server's scheduled jobs with their next run: pause, resume, run now, remove; and a form
    that adds one, showing the next five run times of its WHEN first."""
    scheduler = ctx.scheduler
    if scheduler is None:
        return Page("schedules.html", {"jobs": [], "none": True})
    place = request.place

    def ours(job_place: tuple[str, str, str]) -> bool:  # another server's job is never touched here
        return job_place[:2] == place[:2] and (bool(place.guild_id) or job_place[2] == place.channel_id)

    jobs = [j for j in await scheduler.jobs() if ours(j.place)]
    if request.method == "POST":
        action, job_id = request.form.get("action", ""), request.form.get("job", "")
        try:
            if action == "add":
                channel = place.channel_id or request.form.get("channel", "").strip()
                if not channel:
                    return Redirect(request.url(), _("Say in which channel the job runs."), error=True)
                if job_id in {j.id for j in await scheduler.jobs()} - {j.id for j in jobs}:
                    return Redirect(request.url(), _("That job name is taken on another server."), error=True)
                command = request.form.get("command", "").strip()
                if not command.startswith("/"):
                    return Redirect(request.url(), _("Say which command to run, e.g. /digest."), error=True)
                target = request.form.get("target", "").strip() or channel
                where = Place(place.transport, place.guild_id, channel)
                job = await scheduler.add(job_id, request.form.get("when", ""), where, command, target)
                return Redirect(
                    request.url(), _("Scheduled {job}; next run {next}.", job=job.id, next=_when(job.next_run))
                )
            if job_id not in {j.id for j in jobs}:
                return Redirect(request.url(), _("No scheduled job named {job} here.", job=job_id), error=True)
            if action == "pause":
                await scheduler.pause(job_id)
                return Redirect(request.url(), _("Paused {job}.", job=job_id))
            if action == "resume":
                job = await scheduler.resume(job_id)
                return Redirect(
                    request.url(), _("Resumed {job}; next run {next}.", job=job_id, next=_when(job.next_run))
                )
            if action == "remove":
                await scheduler.remove(job_id)
                return Redirect(request.url(), _("Removed {job}.", job=job_id))
            if action == "run":
                reply = await scheduler.run_now(job_id)
                if reply.failed:
                    return Redirect(request.url(), _("Ran {job}: {reply}", job=job_id, reply=reply.text), error=True)
                return Redirect(request.url(), _("Ran {job}.", job=job_id))
        except QuillError as exc:  # a bad schedule or name: its message says which
            return Redirect(request.url(), error_text(exc), error=True)
        return Redirect(request.url(), _usage(), error=True)
    when = request.query.get("when", "").strip()
    preview, problem = [], ""
    if when:
        try:
            preview = [_when(moment) for moment in scheduler.preview(when)]
        except QuillError as exc:
            problem = error_text(exc)
    values = {"jobs": jobs, "when": when, "preview": preview, "problem": problem, "none": False}
    return Page("schedules.html", values)


@hookimpl
def register_web_pages(register: Callable[[WebPage], None]) -> None:
    register(WebPage("schedules", N_("Schedules"), schedules_page, TEMPLATES, post=True))
