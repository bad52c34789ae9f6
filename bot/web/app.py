"""The admin panel as an ASGI app (Starlette, Jinja2 server-rendered pages).

Every route but log-in and static files goes through `Panel._guard`: a visitor not logged in is
sent to log in (a POST is refused with 401), a server they do not manage is 403, and a POST
without the session's CSRF token is 403. Every response carries a Content-Security-Policy that
allows nothing but this origin's own files (no inline script, no CDN) and templates escape all
values. Database work runs off the event loop (`off_loop` repositories), so the bot sharing the
loop never waits for a page.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, PrefixLoader, select_autoescape
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bot.hooks import deadline
from bot.i18n import LanguageChannel as _LanguageChannel
from bot.i18n import (
    _,
    available,
    format_datetime,
    format_number,
    locale_scope,
    ngettext,
    normalize,
)
from bot.memory import off_loop, redacted
from bot.plugin_config import Declared
from bot.types import Place, QuillError
from bot.web.auth import LoginTokens, Visitor, discord_visitor
from bot.web.charts import Series, line_chart
from bot.web.forms import changes_from, form_fields, global_values
from bot.web.pages import Download, Page, Redirect, Upload, WebPage, WebRequest

if TYPE_CHECKING:
    from bot.app import Quill

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),  # a log-in token in a URL never leaves in a Referer
    (b"cache-control", b"no-store"),
]
# Uploaded knowledge-base files: plain text kinds only, read as UTF-8 in memory, never saved.
UPLOAD_SUFFIXES = (".md", ".markdown", ".txt", ".rst")
MAX_UPLOADS = 50
_SPACE = re.compile(r"([a-z][a-z0-9_]{0,31})-(?:([A-Za-z0-9_]{1,32})|@([A-Za-z0-9_.:-]{1,64}))")
_NAME = re.compile(r"[a-z0-9_-]{1,64}")
DISCORD_API = "https://discord.com/api"
CHART_DAYS = 30
FIGURES_SECONDS = 30.0


def space_key(place: Place) -> str:
    """A server's key in URLs: `discord-<guild>`, or `console-@<channel>` outside guilds."""
    return f"{place.transport}-{place.guild_id}" if place.guild_id else f"{place.transport}-@{place.channel_id}"


def parse_space(key: str) -> Place | None:
    match = _SPACE.fullmatch(key)
    if match is None:
        return None
    transport, guild, channel = match.groups()
    return Place(transport, guild or "", "" if guild else channel)


class SecurityHeaders:
    """Adds the CSP and its companions to every response, errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


@dataclass(frozen=True)
class Ctx:
    """What a guarded route gets: the request, the visitor and the server asked about (if any)."""

    request: Request
    visitor: Visitor
    place: Place | None
    form: dict[str, str]
    files: tuple[Upload, ...]
    refused: tuple[tuple[str, str], ...]


Route_ = Callable[[Ctx], Awaitable[Response]]


class Panel:
    """The panel for one running core (`quill run`/`chat`, live engine figures) or for the
    database alone (`quill web`, `live=False`)."""

    def __init__(self, quill: Quill, *, live: bool, port: int | None = None, discord_api: str = DISCORD_API) -> None:
        self.quill = quill
        self.port = port or quill.settings.web_port or 8765
        self.settings = quill.settings
        self.context = quill.context
        self.live = live
        self.discord_api = discord_api.rstrip("/")
        self.tokens = LoginTokens(self.settings.web_token_minutes)
        self.registry = quill.registry
        self.registry.entry(_LanguageChannel)  # the core's own per-channel setting, in the forms
        self.pages: dict[tuple[str, str], WebPage] = {}
        folders: dict[str, FileSystemLoader] = {}
        for plugin, hook in quill.hooks.implementations("register_web_pages"):
            quill.hooks.collect_one(plugin, hook, register=self._registrar(plugin, folders))
        self.env = Environment(
            loader=ChoiceLoader([FileSystemLoader(HERE / "templates"), PrefixLoader(folders)]),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.globals.update(
            _=_, ngettext=ngettext, format_number=format_number, line_chart=line_chart, Series=Series
        )
        self.env.filters["when"] = lambda moment: format_datetime(moment, "short") if moment else "-"
        self.static = {p.name: p.read_bytes() for p in (HERE / "static").iterdir() if p.is_file()}
        self.secret = secrets.token_urlsafe(32)  # sessions end with the process
        self.oauth = self._oauth()
        self._figures: dict[tuple[Any, ...], tuple[float, Any]] = {}
        self._refreshing: dict[tuple[Any, ...], asyncio.Task[None]] = {}

    def _registrar(self, plugin: str, folders: dict[str, FileSystemLoader]) -> Callable[[WebPage], None]:
        def register(page: WebPage) -> None:
            if not _NAME.fullmatch(page.name) or (plugin, page.name) in self.pages:
                log.error("plugin %s: web page %r is refused (name taken or not [a-z0-9_-])", plugin, page.name)
                return
            self.pages[(plugin, page.name)] = page
            if page.templates is not None:
                folders[plugin] = FileSystemLoader(page.templates)

        return register

    # -- the app -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self.settings.web_url:
            return self.settings.web_url.rstrip("/")
        return f"http://{self.settings.web_host}:{self.port}"

    def login_link(self) -> str:
        """A new one-time log-in link, logged for whoever reads the console."""
        link = f"{self.base_url}/login?token={self.tokens.issue()}"
        log.warning("admin panel log-in link (works once, for %d minutes): %s", self.settings.web_token_minutes, link)
        return link

    def app(self) -> Starlette:
        guarded: list[tuple[str, Route_, bool]] = [
            ("/", self.overview, False),
            ("/s/{space}/settings", self.settings_page, True),
            ("/s/{space}/conversations", self.conversations, True),
            ("/s/{space}/{plugin}/{page}", self.plugin_page, True),
        ]
        routes = [
            Route("/login", self.login, methods=["GET"]),
            Route("/login/link", self.new_link, methods=["POST"]),
            Route("/login/discord", self.discord_start, methods=["GET"]),
            Route("/login/discord/callback", self.discord_callback, methods=["GET"]),
            Route("/logout", self._guard(self.logout), methods=["POST"]),
            Route("/static/{name}", self.static_file, methods=["GET"]),
            *(
                Route(path, self._guard(handler), methods=["GET", "POST"] if post else ["GET"])
                for path, handler, post in guarded
            ),
        ]
        https = self.base_url.startswith("https://")
        middleware = [
            Middleware(SecurityHeaders),
            Middleware(
                SessionMiddleware,
                secret_key=self.secret,
                session_cookie="quill_panel",
                max_age=self.settings.web_session_hours * 3600,
                same_site="lax",
                https_only=https,
            ),
        ]
        return Starlette(routes=routes, middleware=middleware, exception_handlers={404: self._not_found})

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return PlainTextResponse("Not found", status_code=404)

    # -- guard -----------------------------------------------------------------------------

    def _guard(self, handler: Route_) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            with locale_scope(_locale_of(request)):
                visitor = Visitor.from_session(request.session.get("visitor"))
                if visitor is None:
                    if request.method != "GET":
                        return PlainTextResponse(_("Log in first."), status_code=401)
                    return RedirectResponse("/login", status_code=303)
                place = None
                if "space" in request.path_params:
                    place = parse_space(request.path_params["space"])
                    if place is None:
                        return PlainTextResponse(_("Not found"), status_code=404)
                    if not visitor.manages(place.transport, place.guild_id):
                        log.warning("panel: %s refused for %s", visitor.id, request.url.path)
                        return self._render(request, "refused.html", {}, status=403)
                form: dict[str, str] = {}
                files: tuple[Upload, ...] = ()
                refused: tuple[tuple[str, str], ...] = ()
                if request.method == "POST":
                    try:
                        form, files, refused = await self._read_form(request)
                    except (ValueError, RuntimeError, KeyError) as exc:  # multipart over its bounds
                        return PlainTextResponse(_("The form was refused: {reason}", reason=str(exc)), status_code=400)
                    if not hmac.compare_digest(form.get("csrf", ""), _csrf(request)):
                        return PlainTextResponse(_("The form has expired; reload the page."), status_code=403)
                return await handler(Ctx(request, visitor, place, form, files, refused))

        return guarded

    async def _read_form(
        self, request: Request
    ) -> tuple[dict[str, str], tuple[Upload, ...], tuple[tuple[str, str], ...]]:
        """The form's fields, and its files read as text in memory: kind by name, UTF-8, within
        QUILL_MAX_DOCUMENT_CHARS, each refusal with its reason (the file name is shown, never used
        as a path)."""
        limit = self.settings.max_document_chars
        data = await request.form(max_files=MAX_UPLOADS, max_fields=200, max_part_size=limit * 4 + 1024)
        form: dict[str, str] = {}
        files, refused = [], []
        for key, value in data.multi_items():
            if not isinstance(value, UploadFile):
                form.setdefault(key, value)
                continue
            name = PurePosixPath((value.filename or "").replace("\\", "/")).name[:100]
            if not name:
                continue
            if not name.lower().endswith(UPLOAD_SUFFIXES):
                refused.append((name, _("not a text file ({kinds})", kinds=" ".join(UPLOAD_SUFFIXES))))
                continue
            raw = await value.read(limit * 4 + 1)
            try:
                body = raw.decode("utf-8")
            except UnicodeDecodeError:
                refused.append((name, _("not UTF-8 text")))
                continue
            if len(body) > limit:
                refused.append((name, _("over QUILL_MAX_DOCUMENT_CHARS ({limit})", limit=limit)))
            elif not body.strip():
                refused.append((name, _("empty")))
            else:
                files.append(Upload(name, body))
        return form, tuple(files), tuple(refused)

    # -- rendering -------------------------------------------------------------------------

    def _render(self, request: Request, template: str, values: dict[str, Any], status: int = 200) -> HTMLResponse:
        visitor = Visitor.from_session(request.session.get("visitor"))
        space = request.path_params.get("space")
        place = parse_space(space) if space else None
        menu = (
            [
                (f"/s/{space}/{plugin}/{page.name}", _(page.title))
                for (plugin, _name), page in self.pages.items()
                if page.menu and (visitor is not None and (visitor.every or not page.everywhere))
            ]
            if place
            else []
        )
        flashes = request.session.pop("flash", [])
        html = self.env.get_template(template).render(
            visitor=visitor,
            space=space,
            place=place,
            space_name=self._space_name(visitor, place) if place else "",
            menu=menu,
            flashes=flashes,
            csrf=_csrf(request),
            path=request.url.path,
            locale=_locale_of(request),
            **values,
        )
        return HTMLResponse(html, status_code=status)

    def _space_name(self, visitor: Visitor | None, place: Place) -> str:
        if place.guild_id:
            name = visitor.guilds.get(place.guild_id, "") if visitor else ""
            return f"{name} ({place.guild_id})" if name else _("server {id}", id=place.guild_id)
        return f"{place.transport}: {place.channel_id}"

    @staticmethod
    def _flash(request: Request, message: str, error: bool = False) -> None:
        request.session["flash"] = [*request.session.get("flash", []), {"text": message, "error": error}]

    # -- log-in ----------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        with locale_scope(_locale_of(request)):
            token = request.query_params.get("token")
            if token is not None:
                if not self.tokens.redeem(token):
                    return self._render(
                        request, "login.html", {"expired": True, "discord": self.oauth is not None}, 403
                    )
                request.session.clear()
                request.session["visitor"] = Visitor("console", _("console admin"), True, {}).to_session()
                log.info("panel: logged in with a one-time link")
                return RedirectResponse("/", status_code=303)
            return self._render(request, "login.html", {"expired": False, "discord": self.oauth is not None})

    async def new_link(self, request: Request) -> Response:
        """Print a new log-in link in the console (where only someone at the machine reads it)."""
        with locale_scope(_locale_of(request)):
            form = await request.form(max_files=0, max_fields=5)
            if not hmac.compare_digest(str(form.get("csrf", "")), _csrf(request)):
                return PlainTextResponse(_("The form has expired; reload the page."), status_code=403)
            self.login_link()
            self._flash(request, _("A new log-in link is in the bot's log (or the terminal of `quill web`)."))
            return RedirectResponse("/login", status_code=303)

    async def logout(self, ctx: Ctx) -> Response:
        ctx.request.session.clear()
        return RedirectResponse("/login", status_code=303)

    def _oauth(self) -> Any:
        secret = self.settings.discord_client_secret
        if not self.settings.discord_client_id or secret is None or not secret.get_secret_value():
            return None
        from authlib.integrations.starlette_client import OAuth

        oauth = OAuth()
        oauth.register(
            "discord",
            client_id=self.settings.discord_client_id,
            client_secret=secret.get_secret_value(),
            authorize_url=f"{self.discord_api}/oauth2/authorize",
            access_token_url=f"{self.discord_api}/oauth2/token",
            api_base_url=f"{self.discord_api}/",
            client_kwargs={"scope": "identify guilds", "token_endpoint_auth_method": "client_secret_post"},
        )
        return oauth.discord

    async def discord_start(self, request: Request) -> Response:
        if self.oauth is None:
            return PlainTextResponse("Not found", status_code=404)
        return await self.oauth.authorize_redirect(request, f"{self.base_url}/login/discord/callback")

    async def discord_callback(self, request: Request) -> Response:
        with locale_scope(_locale_of(request)):
            if self.oauth is None:
                return PlainTextResponse("Not found", status_code=404)
            try:
                token = await self.oauth.authorize_access_token(request)
                user = (await self.oauth.get("users/@me", token=token)).json()
                guilds = (await self.oauth.get("users/@me/guilds", token=token)).json()
            except Exception as exc:  # a refused or stale state, Discord down: say so, log the detail
                log.warning("panel: Discord log-in failed: %s", exc)
                return self._render(request, "login.html", {"expired": True, "discord": True}, 403)
            visitor = discord_visitor(user, guilds, self.settings.admin_ids)
            request.session.clear()
            if not visitor.every and not visitor.guilds:
                return self._render(request, "refused.html", {"no_servers": True}, 403)
            request.session["visitor"] = visitor.to_session()
            log.info("panel: %s logged in with Discord (%d servers)", visitor.id, len(visitor.guilds))
            return RedirectResponse("/", status_code=303)

    async def static_file(self, request: Request) -> Response:
        """The vendored files, looked up by exact name in memory: no path from the URL is opened."""
        body = self.static.get(request.path_params["name"])
        if body is None:
            return PlainTextResponse("Not found", status_code=404)
        kind = {"css": "text/css", "js": "text/javascript", "png": "image/png", "svg": "image/svg+xml"}
        return Response(body, media_type=kind.get(request.path_params["name"].rsplit(".", 1)[-1], "text/plain"))

    # -- overview --------------------------------------------------------------------------

    async def overview(self, ctx: Ctx) -> Response:
        figures = await self._cached(("figures",), lambda: _db_figures(self.quill))
        places = [p for p in figures["places"] if ctx.visitor.manages(p.transport, p.guild_id)]
        for guild in ctx.visitor.guilds:
            if Place("discord", guild, "") not in places:
                places.append(Place("discord", guild, ""))
        if ctx.visitor.every and not any(p.transport == "console" for p in places):
            places.append(Place("console", "", "console"))
        servers = [(space_key(p), self._space_name(ctx.visitor, p)) for p in places]
        engine = self.context.engine
        live = self.context.metrics.live(engine) if self.live else None
        samples = self.context.metrics.recent() if self.live else []
        start = samples[0].finished if samples else 0.0
        latency = line_chart(
            [
                Series(_("reply time (s)"), [((s.finished - start) / 60, s.seconds) for s in samples]),
                Series(_("time to first token (s)"), [((s.finished - start) / 60, s.ttft) for s in samples]),
            ],
            title=_("Reply latency over the last hour"),
            y_label=_("seconds"),
            x_ticks=[(0, _("{minutes} min ago", minutes=round((samples[-1].finished - start) / 60)))]
            if samples
            else [],
        )
        scheduler = self.quill.scheduler
        adapter = getattr(engine, "adapter", None)
        values = {
            "servers": servers,
            "live": live,
            "latency": latency,
            "model": self.settings.model_path.name
            if self.settings.engine_backend == "local"
            else self.settings.openai_model,
            "backend": self.settings.engine_backend
            + (f" ({self.settings.engine_mode})" if self.settings.engine_backend == "local" else ""),
            "adapter": adapter.name if adapter else None,
            "in_process": self.live,
            "database": redacted(self.settings.db_url).rsplit("/", 1)[-1]
            if self.settings.db_url.startswith("sqlite")
            else redacted(self.settings.db_url),
            "dialect": self.quill.memory.engine.dialect.name,
            "scheduler": {
                "enabled": self.settings.scheduler_enabled,
                "leading": scheduler.leading,
                "jobs": len(await scheduler.jobs()),
            },
            "counts": figures["counts"],
        }
        return self._render(ctx.request, "overview.html", values)

    async def _cached(self, key: tuple[Any, ...], compute: Callable[[], Awaitable[Any]]) -> Any:
        """Counts that read every stored message (per channel, per day, in all) are computed at
        most once per FIGURES_SECONDS: a panel refreshed every second would otherwise scan
        100,000 rows a second beside the bot. Past that, the page gets the figures it had while
        new ones are computed in the background, so only the first visit waits for them."""
        found = self._figures.get(key)
        if found is None:
            found = self._figures[key] = (time.monotonic() + FIGURES_SECONDS, await compute())
        elif found[0] < time.monotonic() and key not in self._refreshing:

            async def refresh() -> None:
                try:
                    self._figures[key] = (time.monotonic() + FIGURES_SECONDS, await compute())
                except Exception:
                    log.exception("panel: figures %s not refreshed", key[0])
                finally:
                    del self._refreshing[key]

            self._refreshing[key] = asyncio.create_task(refresh(), name="quill-web-figures")
        return found[1]

    # -- settings --------------------------------------------------------------------------

    def _scoped(self, scope: str) -> list[Declared]:
        return sorted((d for d in self.registry.declared.values() if d.scope == scope), key=lambda d: d.plugin)

    async def settings_page(self, ctx: Ctx) -> Response:
        assert ctx.place is not None
        request, place = ctx.request, ctx.place
        channels = await self._cached(("channels", place), lambda: _channels(self.quill, place))
        channel = request.query_params.get("channel") or (place.channel_id or (channels[0][0] if channels else ""))
        if place.channel_id:
            channel = place.channel_id
        here = Place(place.transport, place.guild_id, channel)
        if request.method == "POST":
            key = ctx.form.get("settings", "")
            entry = next((d for d in self.registry.declared.values() if f"{d.plugin}.{d.scope}" == key), None)
            if entry is None or entry.scope == "global" or (entry.scope == "channel" and not channel):
                return PlainTextResponse(_("Unknown settings."), status_code=400)
            current = await self.context.scoped(entry.model, here)
            try:
                await self.context.update(entry.model, here, **changes_from(entry, current, ctx.form))
            except (QuillError, KeyError) as exc:  # SettingError names the value refused
                self._flash(request, _("Not saved: {problem}", problem=str(exc)), error=True)
            else:
                self._flash(request, _("Saved the {plugin} settings.", plugin=entry.plugin))
            target = f"/s/{request.path_params['space']}/settings" + (f"?channel={quote(channel)}" if channel else "")
            return RedirectResponse(target, status_code=303)
        forms = []
        for scope in ("guild", "channel"):
            if scope == "channel" and not channel:
                continue
            for entry in self._scoped(scope):
                current = await self.context.scoped(entry.model, here)
                fields = form_fields(entry, current)
                if fields:
                    forms.append({"key": f"{entry.plugin}.{entry.scope}", "entry": entry, "fields": fields})
        globals_ = [
            (f"{d.plugin} ({d.model.__name__})", global_values(d, self.registry.get(d.model)))
            for d in self._scoped("global")
        ]
        values = {"forms": forms, "channels": channels, "channel": channel, "globals": globals_}
        return self._render(request, "settings.html", values)

    # -- conversations ---------------------------------------------------------------------

    async def conversations(self, ctx: Ctx) -> Response:
        assert ctx.place is not None
        request, place = ctx.request, ctx.place
        channels = await self._cached(("channels", place), lambda: _channels(self.quill, place))
        channel = place.channel_id or request.query_params.get("channel", "")
        if channel and channel not in {c for c, _n in channels}:
            channel = ""
        space = request.path_params["space"]
        if request.method == "POST":
            if ctx.form.get("action") == "erase" and channel:
                count = await self.quill.memory.forget_place(place.transport, place.guild_id, channel)
                self._figures.clear()
                log.info("panel: %s erased channel %s of %s (%d messages)", ctx.visitor.id, channel, space, count)
                self._flash(
                    request,
                    ngettext(
                        "Erased {count} message of this channel.", "Erased {count} messages of this channel.", count
                    ),
                )
            return RedirectResponse(f"/s/{space}/conversations?channel={quote(channel)}", status_code=303)
        query = request.query_params.get("q", "").strip()[:200]
        messages = await _recent(self.quill, Place(place.transport, place.guild_id, channel)) if channel else []
        found = []
        if query:
            hits = await self.context.search.search(
                query, place.transport, place.guild_id, channel or place.channel_id, 50
            )
            found = [h for h in hits if h.kind == "message"]
        per_day = await self._cached(("per_day", place), lambda: _per_day(self.quill, place))
        chart = _per_day_chart(per_day)
        values = {
            "channels": channels,
            "channel": channel,
            "messages": messages,
            "query": query,
            "found": found,
            "chart": chart,
        }
        return self._render(request, "conversations.html", values)

    # -- plugin pages ----------------------------------------------------------------------

    async def plugin_page(self, ctx: Ctx) -> Response:
        assert ctx.place is not None
        request = ctx.request
        key = (request.path_params["plugin"], request.path_params["page"])
        page = self.pages.get(key)
        if page is None or (request.method == "POST" and not page.post):
            return PlainTextResponse(_("Not found"), status_code=404)
        if page.everywhere and not ctx.visitor.every:
            return self._render(request, "refused.html", {}, status=403)
        web_request = WebRequest(
            place=ctx.place,
            space=request.path_params["space"],
            plugin=key[0],
            page=key[1],
            method=request.method,
            user=ctx.visitor.id,
            every=ctx.visitor.every,
            query=dict(request.query_params),
            form=ctx.form,
            files=ctx.files,
            refused=ctx.refused,
        )
        try:
            async with deadline(self.settings.plugin_timeout):
                result = await page.handler(self.context, web_request)
        except QuillError as exc:
            self._flash(request, str(exc), error=True)
            return RedirectResponse(web_request.url(), status_code=303)
        except Exception:
            log.exception("panel page %s/%s failed", *key)
            return self._render(request, "failed.html", {}, status=500)
        if isinstance(result, Redirect):
            if result.message:
                self._flash(request, result.message, result.error)
            if not result.to.startswith("/s/"):
                return PlainTextResponse(_("Not found"), status_code=404)
            return RedirectResponse(result.to, status_code=303)
        if isinstance(result, Page):
            return self._render(request, f"{key[0]}/{result.template}", {"request_": web_request, **result.values})
        if not isinstance(result, Download):
            log.error("panel page %s/%s returned %r, not a Page, Redirect or Download", *key, type(result))
            return self._render(request, "failed.html", {}, status=500)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", result.filename)[:100]
        headers = {"content-disposition": f'attachment; filename="{safe}"'}
        return Response(result.body, media_type=result.media_type, headers=headers)


def _csrf(request: Request) -> str:
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return token


def _locale_of(request: Request) -> str:
    """The visitor's language: ?lang= (kept in the session), else the browser's first known one."""
    asked = request.query_params.get("lang")
    if asked and (known := normalize(asked)):
        request.session["lang"] = known
    if isinstance(request.session.get("lang"), str):
        return request.session["lang"]
    for part in request.headers.get("accept-language", "").split(","):
        tag = part.split(";")[0].strip()
        if tag and (known := normalize(tag)) and known in available():
            return known
    return "en"


# -- database figures (off the loop) ---------------------------------------------------------


@off_loop
def _db_figures(quill: Quill) -> dict[str, Any]:
    with quill.memory.engine.connect() as conn:
        counts = {
            name: conn.execute(text(f"SELECT COUNT(*) FROM {name}")).scalar_one()
            for name in ("message", "conversation", "knowledge_doc", "knowledge_chunk")
        }
        rows = conn.execute(
            text(
                "SELECT DISTINCT transport, guild_id, CASE WHEN guild_id = '' THEN channel_id ELSE '' END "
                "FROM conversation WHERE guild_id != '' OR transport != 'discord' "
                "UNION SELECT DISTINCT transport, guild_id, channel_id FROM knowledge_doc "
                "WHERE guild_id != '' OR transport != 'discord'"
            )
        ).all()
    return {"counts": counts, "places": sorted({Place(*row) for row in rows})}


@off_loop
def _channels(quill: Quill, place: Place) -> list[tuple[str, int]]:
    """(channel, stored messages) of a server, busiest first."""
    where = "v.transport = :t AND v.guild_id = :g" + ("" if place.guild_id else " AND v.channel_id = :c")
    query = text(
        f"SELECT v.channel_id, COUNT(m.id) FROM conversation v LEFT JOIN message m ON m.conversation_id = v.id "
        f"WHERE {where} GROUP BY v.channel_id ORDER BY COUNT(m.id) DESC, v.channel_id LIMIT 200"
    )
    with quill.memory.engine.connect() as conn:
        return [
            (c, n) for c, n in conn.execute(query, {"t": place.transport, "g": place.guild_id, "c": place.channel_id})
        ]


async def _recent(quill: Quill, place: Place) -> list[Any]:
    conversation = await quill.memory.conversation(*place)
    assert conversation.id is not None
    return list(reversed(await quill.memory.recent_messages(conversation.id, 50)))


@off_loop
def _per_day(quill: Quill, place: Place) -> dict[str, dict[str, int]]:
    """{channel: {YYYY-MM-DD: messages}} of the server's last CHART_DAYS days (the five busiest channels)."""
    since = datetime.now(UTC) - timedelta(days=CHART_DAYS)
    engine = quill.memory.engine
    day = (
        "CAST(CAST(m.created_at AS date) AS text)"
        if engine.dialect.name == "postgresql"
        else "substr(m.created_at, 1, 10)"
    )
    where = "v.transport = :t AND v.guild_id = :g" + ("" if place.guild_id else " AND v.channel_id = :c")
    query = text(
        f"SELECT v.channel_id, {day} AS day, COUNT(*) FROM conversation v JOIN message m ON m.conversation_id = v.id "
        f"WHERE {where} AND m.created_at >= :since GROUP BY v.channel_id, day"
    )
    found: dict[str, dict[str, int]] = {}
    with engine.connect() as conn:
        values = {"t": place.transport, "g": place.guild_id, "c": place.channel_id, "since": since}
        for channel, when, count in conn.execute(query, values):
            found.setdefault(channel, {})[str(when)[:10]] = count
    busiest = sorted(found, key=lambda c: -sum(found[c].values()))[:5]
    return {c: found[c] for c in busiest}


def _per_day_chart(per_day: dict[str, dict[str, int]]) -> Any:
    today = datetime.now(UTC).date()
    days = [today - timedelta(days=n) for n in range(CHART_DAYS - 1, -1, -1)]
    series = [
        Series(channel, [(i, counts.get(d.isoformat(), 0)) for i, d in enumerate(days)])
        for channel, counts in per_day.items()
    ]
    ticks = [(i, d.strftime("%m-%d")) for i, d in enumerate(days) if i % 7 == 0 or i == len(days) - 1]
    return line_chart(series, title=_("Messages per day per channel"), x_ticks=ticks, y_label=_("messages"))
