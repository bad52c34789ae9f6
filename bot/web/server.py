"""Serving the panel: inside the bot's event loop (QUILL_WEB_PORT with `quill run`/`chat`), or
alone over the database (`quill web`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from bot.engine import ChatMessage, ChatResult, EngineError, GenerationOptions
from bot.web.app import Panel

if TYPE_CHECKING:
    from bot.app import Quill
    from bot.config import Settings

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn as a task of the bot's loop: Ctrl-C and SIGTERM stay the bot's to handle."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serving(quill: Quill, *, live: bool = True, port: int | None = None) -> AsyncIterator[Panel | None]:
    """Serve the panel while the block runs (when QUILL_WEB_PORT or `port` says so); a log-in
    link is printed to the log at start."""
    port = port or quill.settings.web_port
    if not port:
        yield None
        return
    panel = Panel(quill, live=live, port=port)
    config = uvicorn.Config(
        panel.app(),
        host=quill.settings.web_host,
        port=port,
        log_level="warning",
        lifespan="off",
        proxy_headers=bool(quill.settings.web_url),
        server_header=False,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(), name="quill-web")
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if task.done():  # the port is taken, say: uvicorn logged why; the bot goes on without a panel
        log.error("admin panel did not start on %s:%s", quill.settings.web_host, port)
    else:
        log.info("admin panel on %s", panel.base_url)
        panel.login_link()
    try:
        yield panel
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, SystemExit):
            await task


class OfflineEngine:
    """The engine of `quill web`: no model is loaded there, so each request says so plainly
    (a schedule's "run now" that needs the model, say), and the panel's other pages work."""

    features: frozenset[str] = frozenset()

    def __init__(self, settings: Settings) -> None:
        self.n_ctx = settings.n_ctx

    def _refuse(self) -> EngineError:
        return EngineError("No model is loaded in `quill web`; run the bot (`quill run` or `quill chat`) for that.")

    async def stream(self, messages: Sequence[ChatMessage], options: GenerationOptions) -> AsyncIterator[str]:
        raise self._refuse()
        yield ""  # an async generator, as the protocol's stream is

    async def chat(self, messages: Sequence[ChatMessage], options: GenerationOptions) -> ChatResult:
        raise self._refuse()

    async def chat_structured(self, messages: Sequence[ChatMessage], model: Any, options: GenerationOptions) -> Any:
        raise self._refuse()

    async def count_tokens(self, text: str) -> int:
        raise self._refuse()

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        raise self._refuse()

    async def set_adapter(self, path: Path | None) -> None:
        raise self._refuse()

    async def close(self) -> None:
        return None
