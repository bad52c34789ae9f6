"""The `quill` command: the Discord bot, console chat, one-shot questions and database upkeep."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bot.app import Quill
from bot.config import Settings
from bot.kb_import import collect, import_paths
from bot.memory import Memory, StorageError, write_revision
from bot.search import Search
from bot.transports.console import ConsoleTransport
from bot.transports.discord import run_discord
from bot.types import QuillError
from bot.web.server import OfflineEngine, serving

app = typer.Typer(help="quill: a self-hosted chat and writing assistant on a local model.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema upkeep.")
app.add_typer(db_app, name="db")
kb_app = typer.Typer(help="Knowledge base upkeep.")
app.add_typer(kb_app, name="kb")

T = TypeVar("T")
Channel = Annotated[str, typer.Option(help="Conversation name; each keeps its own memory.")]
Verbose = Annotated[
    bool, typer.Option("--verbose", "-v", help="Also print the log in the terminal (it goes to data/quill.log).")
]


class SecretFilter(logging.Filter):
    """Replaces secrets (the bot token, the API key) in every log record a handler emits,
    tracebacks included: a library may log a request, or an error quoting it."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = [secret for secret in secrets if secret]

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        if any(secret in message for secret in self.secrets):
            record.msg, record.args = self._redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._redact(record.exc_text)
        return True

    def _redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return text


def secrets_in(settings: Settings) -> list[str]:
    """The settings' secrets that must never reach a log."""
    values = (settings.discord_token, settings.openai_api_key, settings.discord_client_secret)
    return [value.get_secret_value().strip() for value in values if value is not None]


def setup_logging(settings: Settings, *, interactive: bool, verbose: bool = False) -> None:
    """Log to stderr; in the console (`quill chat`, `quill ask`) to `<data dir>/quill.log`
    instead, so no log line breaks into the conversation, unless `verbose` asks for both (or
    the file cannot be written). The settings' secrets are redacted from every line."""
    level = getattr(logging, settings.log_level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(level)
    handlers: list[logging.Handler] = []
    if interactive:
        try:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(settings.data_dir / "quill.log", encoding="utf-8"))
        except OSError as exc:
            typer.secho(f"quill: cannot write the log file ({exc}); logging to the terminal", err=True)
    if verbose or not handlers:
        handlers.append(logging.StreamHandler(sys.stderr))
    redact = SecretFilter(secrets_in(settings))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler.addFilter(redact)
        root.addHandler(handler)


def load_settings() -> Settings:
    """Settings from the environment and .env; an invalid value prints which one and exits 1."""
    try:
        return Settings()
    except ValidationError as exc:
        for error in exc.errors():
            name = "QUILL_" + "_".join(str(part) for part in error["loc"]).upper()
            typer.secho(f"quill: invalid setting {name}: {error['msg']}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


def run_app(job: Callable[[Quill], Awaitable[T]], *, interactive: bool = True, verbose: bool = False) -> T:
    """Start the core, run `job`, close it; start-up faults print one line and exit 1."""
    settings = load_settings()
    setup_logging(settings, interactive=interactive, verbose=verbose)

    async def main() -> T:
        quill = await Quill.start(settings)
        try:
            async with serving(quill) as panel:  # the admin panel, when QUILL_WEB_PORT is set
                if panel is not None and interactive:  # the log goes to a file: say it here too
                    typer.secho(f"admin panel (log-in link, works once): {panel.login_link()}", err=True)
                return await job(quill)
        finally:
            await quill.close()

    try:
        return asyncio.run(main())
    except QuillError as exc:
        typer.secho(f"quill: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command()
def run() -> None:
    """Run the Discord bot (needs QUILL_DISCORD_TOKEN or DISCORD_TOKEN)."""
    token = load_settings().discord_token
    if token is None or not token.get_secret_value().strip():
        typer.secho(
            "quill: no Discord token. Set QUILL_DISCORD_TOKEN (or DISCORD_TOKEN) to run the Discord bot "
            "(README.md, section Discord); to chat in this terminal instead, run `quill chat`.",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(2)
    run_app(run_discord, interactive=False)


@app.command()
def chat(channel: Channel = "console", verbose: Verbose = False) -> None:
    """Chat in the terminal, with streamed replies and memory that survives restarts."""
    run_app(lambda quill: ConsoleTransport(quill, channel=channel).repl(), verbose=verbose)


@app.command()
def ask(
    text: Annotated[str, typer.Argument(help="The message, or a /command.")],
    channel: Channel = "console",
    verbose: Verbose = False,
) -> None:
    """Send one message (or /command), print the reply and exit: for scripts."""
    reply = run_app(lambda quill: ConsoleTransport(quill, channel=channel).ask(text), verbose=verbose)
    if reply.failed:
        raise typer.Exit(1)


@app.command()
def web(
    port: Annotated[int | None, typer.Option(help="Port (default QUILL_WEB_PORT, else 8765).")] = None,
) -> None:
    """Serve the admin panel alone over the database, without the model (documents, settings,
    schedules while the bot is down); it prints a one-time log-in link."""
    settings = load_settings()
    setup_logging(settings, interactive=False)
    chosen = port or settings.web_port or 8765

    async def main() -> None:
        quill = await Quill.start(settings, engine=OfflineEngine(settings))  # type: ignore[arg-type]
        try:
            async with serving(quill, live=False, port=chosen):
                await asyncio.Event().wait()  # until Ctrl-C
        finally:
            await quill.close()

    try:
        asyncio.run(main())
    except QuillError as exc:
        typer.secho(f"quill: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def open_memory(settings: Settings) -> Memory:
    """The database (migrated to the newest revision), or one line and exit 1 when unusable."""
    try:
        return Memory.open(settings.db_url)
    except StorageError as exc:
        typer.secho(f"quill: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Bring the database schema to the newest revision (start-up does this too)."""
    settings = load_settings()
    memory = open_memory(settings)
    memory.close()
    for revision in memory.applied:
        typer.echo(f"applied {revision}")
    done = f"{len(memory.applied)} revision(s) applied" if memory.applied else "nothing to apply"
    typer.echo(f"database schema is up to date ({done})")


@db_app.command("revision")
def db_revision(message: Annotated[str, typer.Option("-m", "--message", help="What changed.")]) -> None:
    """For developers: write a migration for what changed in bot/models.py (review it before committing)."""
    write_revision(message)


@kb_app.command("import")
def kb_import(
    paths: Annotated[list[Path], typer.Argument(help="Files and folders (.md .txt .rst .html .pdf).")],
    prune: Annotated[bool, typer.Option(help="Remove documents whose files are gone from these folders.")] = False,
    transport: Annotated[str, typer.Option(help="Whose knowledge base: console or discord.")] = "console",
    guild: Annotated[str, typer.Option(help="The Discord server (guild) id, for --transport discord.")] = "",
    channel: Annotated[
        str, typer.Option(help="The channel, outside a guild (the console's conversation).")
    ] = "console",
) -> None:
    """Import a docs folder into the knowledge base; run again to sync (unchanged files are skipped)."""
    settings = load_settings()
    memory = open_memory(settings)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    ) as bar:
        task = bar.add_task("reading", total=None)

        def step(name: str) -> None:
            bar.update(task, advance=1, description=name[-40:])

        files = collect([p.resolve() for p in paths], [])
        bar.update(task, total=len(files))
        try:
            report = asyncio.run(
                import_paths(Search(memory.engine), (transport, guild, channel), paths, prune=prune, progress=step)
            )
        except StorageError as exc:
            typer.secho(f"quill: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        finally:
            memory.close()
    typer.echo(
        f"knowledge base: {len(report.added)} added, {len(report.updated)} updated, "
        f"{len(report.unchanged)} unchanged, {len(report.removed)} removed"
    )
    for path, reason in report.failed:
        typer.secho(f"not imported: {path}: {reason}", fg=typer.colors.RED, err=True)
    if report.failed:
        raise typer.Exit(1)


def main() -> None:
    app()
