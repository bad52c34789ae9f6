"""Schedule: admins add, list, pause, resume, run and remove scheduled commands (digests, ...)."""

from __future__ import annotations

from collections.abc import Callable

from bot.api import Command, Option, PluginContext, QuillError, Reply, Request, hookimpl

USAGE = (
    "/schedule add <name> <when> /<command> [args]  (option to:<channel>, default here)\n"
    "  when: daily HH:MM [Time/Zone] | weekly mon HH:MM [Time/Zone]\n"
    "        | cron MIN HOUR DAY MONTH WEEKDAY [Time/Zone]\n"
    "/schedule list | pause <name> | resume <name> | run <name> | remove <name>"
)


async def schedule(ctx: PluginContext, request: Request) -> Reply:
    scheduler = ctx.scheduler
    if scheduler is None:
        return Reply("This process runs no scheduler.", failed=True)
    action, _, rest = request.text.partition(" ")
    action, rest = action.lower(), rest.strip()
    try:
        if action == "add":
            name, _, rest = rest.partition(" ")
            # The command starts at the first word beginning with "/" (time zones contain "/").
            when, slash, command = f" {rest}".partition(" /")
            if not slash:
                return Reply(f"Say which command to run, e.g. /digest.\nUsage:\n{USAGE}", failed=True)
            place = request.place
            target = request.options.get("to") or request.channel_id
            job = await scheduler.add(name, when, place, "/" + command, target)
            summary = f"{job.command} ({job.when}) -> {job.target}"
            return Reply(f"Scheduled {job.id}: {summary}; next run {job.next_run}.")
        if action == "list":
            jobs = await scheduler.jobs()
            if not jobs:
                return Reply("No scheduled jobs.")
            lines = [
                f"{j.id}: {j.command} ({j.when}) in {j.place.channel_id} -> {j.target}; "
                + ("paused" if j.paused else f"next {j.next_run}")
                for j in jobs
            ]
            return Reply("\n".join(lines), title="Scheduled jobs")
        if action in ("pause", "resume", "remove", "run") and rest:
            if action == "pause":
                await scheduler.pause(rest)
                return Reply(f"Paused {rest}.")
            if action == "resume":
                job = await scheduler.resume(rest)
                return Reply(f"Resumed {rest}; next run {job.next_run}.")
            if action == "remove":
                await scheduler.remove(rest)
                return Reply(f"Removed {rest}.")
            reply = await scheduler.run_now(rest)
            return Reply(f"Ran {rest}" + ("." if reply.text else "; it had nothing to post."))
    except QuillError as exc:  # a bad schedule or an unknown job: its message says which
        return Reply(str(exc), failed=True)
    return Reply(f"Usage:\n{USAGE}", failed=True)


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(
        Command(
            "schedule",
            "run commands on a schedule and post their replies (digests, ...)",
            schedule,
            usage="add|list|pause|resume|run|remove ...",
            admin=True,
            options=(Option("to", "channel the job's replies are posted to (default: here)"),),
        )
    )
