"""Helpers shared by the admin panel's HTTP and browser tests: a panel over the real core, a
logged-in client, a fake Discord OAuth2 server (served for real on 127.0.0.1) and seed data."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import uvicorn
from sqlmodel import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from bot.app import Quill
from bot.models import FinetuneRun
from bot.web.app import Panel

CSRF = re.compile(r'name="csrf" value="([^"]+)"')
MANAGED, OTHER = "111111111111111111", "222222222222222222"


def client_for(panel: Panel) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=panel.app()), base_url="http://panel")


async def logged_in(client: httpx.AsyncClient, panel: Panel) -> None:
    """Log in with a fresh one-time link, as a console admin would."""
    link = panel.login_link()
    response = await client.get(urlsplit(link).path + "?" + urlsplit(link).query)
    assert response.status_code == 303 and response.headers["location"] == "/"


async def csrf_of(client: httpx.AsyncClient, path: str = "/") -> str:
    response = await client.get(path)
    assert response.status_code == 200, response.text[:500]
    found = CSRF.search(response.text)
    assert found is not None
    return found.group(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def served(app: Any, port: int) -> AsyncIterator[None]:
    """Serve an ASGI app with uvicorn on 127.0.0.1:`port` in this loop while the block runs."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(30):
        while not server.started:
            assert not task.done(), "the server did not start"
            await asyncio.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        await task


def fake_discord(client_id: str, secret: str, user: dict[str, Any], guilds: list[dict[str, Any]]) -> Starlette:
    """Discord's OAuth2 endpoints as the panel uses them: authorize (consent given at once),
    token (checks the code and the client secret), /users/@me and /users/@me/guilds (check the
    bearer token)."""
    code, access = "code-123", "access-456"

    async def authorize(request: Request) -> Response:
        q = request.query_params
        assert q["client_id"] == client_id and q["response_type"] == "code"
        assert set(q["scope"].split()) == {"identify", "guilds"}
        return RedirectResponse(f"{q['redirect_uri']}?{urlencode({'code': code, 'state': q['state']})}", 302)

    async def token(request: Request) -> Response:
        form = parse_qs((await request.body()).decode())
        if form.get("code") != [code] or form.get("client_secret") != [secret]:
            return JSONResponse({"error": "invalid_grant"}, 400)
        return JSONResponse(
            {"access_token": access, "token_type": "Bearer", "expires_in": 600, "scope": "identify guilds"}
        )

    def bearer(request: Request, body: Any) -> Response:
        if request.headers.get("authorization") != f"Bearer {access}":
            return JSONResponse({"message": "401: Unauthorized"}, 401)
        return JSONResponse(body)

    async def me(request: Request) -> Response:
        return bearer(request, user)

    async def my_guilds(request: Request) -> Response:
        return bearer(request, guilds)

    return Starlette(
        routes=[
            Route("/api/oauth2/authorize", authorize),
            Route("/api/oauth2/token", token, methods=["POST"]),
            Route("/api/users/@me", me),
            Route("/api/users/@me/guilds", my_guilds),
        ]
    )


async def seed(app: Quill) -> None:
    """Two Discord servers with a conversation each, and the console's."""
    for guild, channel in ((MANAGED, "general"), (OTHER, "secret-plans"), ("", "console")):
        transport = "discord" if guild else "console"
        conv = await app.memory.conversation(transport, guild, channel)
        assert conv.id is not None
        await app.memory.add_message(conv.id, role="user", content=f"hello from {channel}", author_id="u1")


def add_run(app: Quill, losses: list[float], note: str = "") -> int:
    """A finished fine-tune run with its figures, as /finetune train records one."""
    figures = {
        "losses": losses,
        "groups": {"exchanges": 20, "groups": 16, "train": 12, "heldout": 4},
        "heldout": {"base": 2.5, "adapter": 1.9, "examples": 4},
        "general": {"base": 2.0, "adapter": 2.04, "examples": 64, "change": 0.02},
        "decision": {"deploy": True, "reason": "held-out NLL fell -24.0%; general chat +2.0% (at most +5%)"},
    }
    run = FinetuneRun(
        status="deployed",
        base_model="model.gguf",
        dataset_path="/data/finetune/datasets/x",
        dataset_sha256="0" * 64,
        n_train=16,
        n_heldout=4,
        adapter_path="/nonexistent/run.gguf",
        nll_before=2.5,
        nll_after=1.9,
        note=note,
        figures=json.dumps(figures),
    )
    with Session(app.memory.engine, expire_on_commit=False) as session:
        session.add(run)
        session.commit()
    assert run.id is not None
    return run.id
