"""The one way the core calls plugin hooks: each plugin on its own, guarded and timed.

pluggy's own relay (`pm.hook.name(...)`) calls every implementation in one go, so the first
one that raises hides the rest and the caller cannot tell who did what. Here each plugin's
implementation runs alone, under QUILL_PLUGIN_TIMEOUT (renewed while it reports progress), its
failure is logged under its name, and the caller gets every plugin's result or error back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import pluggy

log = logging.getLogger(__name__)

# Set around each guarded call: renews its time-out (see PluginContext.progress).
RENEW_DEADLINE: ContextVar[Callable[[], None] | None] = ContextVar("quill_renew_deadline", default=None)


@dataclass(frozen=True)
class HookResult:
    """What one plugin's implementation of a hook gave: its value, or the error it raised."""

    plugin: str
    value: Any = None
    error: BaseException | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


def plugin_label(name: str) -> str:
    """The short name a plugin goes by in messages and setting keys (`plugins.qa` -> `qa`)."""
    return name.rsplit(".", 1)[-1]


@contextlib.asynccontextmanager
async def deadline(seconds: float) -> AsyncIterator[None]:
    """A time-out of `seconds` that the code inside renews by calling RENEW_DEADLINE's value;
    each renewal also renews the deadlines around it (a digest's, while one section moves)."""
    outer = RENEW_DEADLINE.get()
    async with asyncio.timeout(seconds) as scope:
        loop = asyncio.get_running_loop()

        def renew() -> None:
            scope.reschedule(loop.time() + seconds)
            if outer is not None:
                outer()

        token = RENEW_DEADLINE.set(renew)
        try:
            yield
        finally:
            RENEW_DEADLINE.reset(token)


@functools.cache
def _parameters(function: Callable[..., Any]) -> frozenset[str]:
    """The argument names a hook implementation takes, read once: `on_message` runs per message."""
    return frozenset(inspect.signature(function).parameters)


class Hooks:
    """Calls hooks plugin by plugin. `context` is passed to every implementation that takes it."""

    def __init__(self, pm: pluggy.PluginManager, timeout: Callable[[], float]) -> None:
        self.pm = pm
        self._timeout = timeout
        self.context: Any = None  # the PluginContext, set once it exists

    def implementations(self, name: str) -> list[tuple[str, Callable[..., Any]]]:
        """(plugin's short name, function) of every implementation of hook `name`, in pluggy's order."""
        return [(plugin_label(impl.plugin_name), impl.function) for impl in getattr(self.pm.hook, name).get_hookimpls()]

    def _arguments(self, function: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        wanted = _parameters(function)
        given = {"context": self.context, **kwargs}
        return {name: value for name, value in given.items() if name in wanted}

    def collect(self, name: str, **kwargs: Any) -> list[HookResult]:
        """Call a synchronous start-up hook (`register_commands`, `register_settings`): no time-out,
        but one plugin that raises is logged and the others still run."""
        return [self.collect_one(plugin, function, **kwargs) for plugin, function in self.implementations(name)]

    def collect_one(self, plugin: str, function: Callable[..., Any], **kwargs: Any) -> HookResult:
        try:
            return HookResult(plugin, function(**self._arguments(function, kwargs)))
        except Exception as exc:
            log.exception("plugin %s: %s failed", plugin, getattr(function, "__name__", "hook"))
            return HookResult(plugin, error=exc)

    async def call(self, name: str, **kwargs: Any) -> list[HookResult]:
        """Call hook `name` on every plugin in turn, each under the plugin time-out; a sync
        implementation's value and an async one's awaited value are gathered alike."""
        return [await self.call_one(plugin, function, name, kwargs) for plugin, function in self.implementations(name)]

    async def call_one(
        self, plugin: str, function: Callable[..., Any], name: str, kwargs: dict[str, Any]
    ) -> HookResult:
        try:
            async with deadline(self._timeout()):
                value = function(**self._arguments(function, kwargs))
                if inspect.isawaitable(value):
                    value = await value
        except Exception as exc:
            if isinstance(exc, TimeoutError):
                log.error("plugin %s: %s timed out", plugin, name)
            else:
                log.exception("plugin %s: %s failed", plugin, name)
            return HookResult(plugin, error=exc)
        return HookResult(plugin, value)
