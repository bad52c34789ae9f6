"""MCP servers' tools offered to the model (QUILL_MCP_SERVERS), through the official `mcp` SDK.

Each server's tools are listed once at start-up. Each call opens its own connection (a stdio
server is started for it, then stopped), so a server that crashes or hangs costs that one call a
short error, never the bot or a later call. quill cannot know what a foreign tool does, so every
MCP tool counts as changing something (the asker confirms each call) unless the admin who
configured the server lists it as read-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

from bot.config import McpServer
from bot.tools import Tool
from bot.types import QuillError, Reply, Request

log = logging.getLogger(__name__)

# Longest tool description taken from a server: it goes into the prompt, and a server is foreign text.
DESCRIPTION_CHARS = 300
_NAME = re.compile(r"[^A-Za-z0-9_-]+")


class McpError(QuillError):
    """An MCP server could not be reached or refused a call; the message is fit to show."""


@contextlib.asynccontextmanager
async def connect(server: McpServer, timeout: float) -> AsyncIterator[Any]:
    """A connected `mcp.Client` for `server`, closed (a stdio server stopped) on leaving."""
    import httpx2
    from mcp import Client, StdioServerParameters
    from mcp.client.streamable_http import streamable_http_client

    target: Any
    if server.command:
        target = StdioServerParameters(command=server.command[0], args=server.command[1:], env=server.env or None)
        async with Client(target, read_timeout_seconds=timeout) as client:
            yield client
        return
    async with (
        httpx2.AsyncClient(headers=server.headers, timeout=timeout) as http,
        Client(streamable_http_client(server.url, http_client=http), read_timeout_seconds=timeout) as client,
    ):
        yield client


def result_text(result: Any) -> str:
    """A call's result as text for the model: its text blocks, others named by their type."""
    parts = []
    for block in result.content:
        text = getattr(block, "text", None)
        parts.append(text if isinstance(text, str) else f"[{getattr(block, 'type', 'content')}]")
    if not parts and result.structured_content is not None:
        parts.append(str(result.structured_content))
    return "\n".join(parts)


def mcp_tool(name: str, server: McpServer, listed: Any, timeout: float) -> Tool:
    """One listed tool of server `name` as a quill tool, named `<server>_<tool>`."""

    async def call(request: Request, arguments: dict[str, Any]) -> Reply:
        try:
            async with connect(server, timeout) as client:
                result = await client.call_tool(listed.name, arguments)
        except Exception as exc:  # a crash, a refused connection, a protocol error
            raise McpError(f"MCP server {name} failed: {_reason(exc)}") from exc
        text = result_text(result)
        return Reply(text or "(no output)", failed=bool(result.is_error))

    return Tool(
        name=_NAME.sub("_", f"{name}_{listed.name}")[:64],
        description=" ".join((listed.description or listed.name).split())[:DESCRIPTION_CHARS],
        parameters=listed.input_schema or {"type": "object", "properties": {}},
        run=call,
        changes=not server.reads_only(listed.name),
        admin=server.admin,
    )


async def list_tools(servers: dict[str, McpServer], timeout: float) -> list[Tool]:
    """Every configured server's tools; a server that cannot be listed is logged and left out."""
    found: list[Tool] = []
    for name, server in servers.items():
        try:
            async with asyncio.timeout(timeout):
                async with connect(server, timeout) as client:
                    listed = (await client.list_tools()).tools
        except Exception as exc:
            log.error("MCP server %s: cannot list its tools (%s); its tools are not offered", name, _reason(exc))
            continue
        tools = [mcp_tool(name, server, tool, timeout) for tool in listed]
        log.info("MCP server %s: %s", name, ", ".join(f"{t.name}{'' if t.changes else ' (read-only)'}" for t in tools))
        found += tools
    return found


def _reason(exc: BaseException) -> str:
    """The innermost message of an error (anyio wraps them in exception groups)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return (str(exc) or type(exc).__name__)[:200]
