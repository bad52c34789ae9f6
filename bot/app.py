"""Assembles the core once per process: settings, the one engine, memory, plugins and router."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

from bot.api import PluginContext
from bot.config import Settings
from bot.embedder import E5Embedder, Embedder, EmbedderError, ServerEmbedder, local_embedder
from bot.engine import Engine, ModelLoadError, start_engine
from bot.engine.openai import OpenAIEngine
from bot.hooks import Hooks
from bot.mcp_tools import list_tools
from bot.memory import Memory
from bot.plugin_config import SettingsRegistry
from bot.plugins import make_plugin_manager
from bot.prompts import PromptLoader
from bot.router import Router
from bot.scheduler import Scheduler
from bot.search import Semantic
from bot.tools import Toolbox, command_tool

log = logging.getLogger(__name__)


class Quill:
    """The running bot, shared by every transport."""

    def __init__(self, settings: Settings, engine: Engine, memory: Memory, semantic: Semantic | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.memory = memory
        self.plugins = make_plugin_manager()
        self.hooks = Hooks(self.plugins, lambda: settings.plugin_timeout)
        self.registry = declare_settings(self.hooks)
        prompts = PromptLoader(settings.prompts_dir)
        self.context = PluginContext(engine, memory, settings, prompts, self.hooks, self.registry, semantic=semantic)
        self.hooks.context = self.context
        self._embedding: asyncio.Task[None] | None = None
        self.router = Router(self.context)
        self.context.toolbox = self.toolbox = Toolbox(self.context)
        for command in self.router.commands.values():
            if command.tool is not None:
                self.toolbox.add(command_tool(command, self.router.run_command))
        self.scheduler = Scheduler(settings, memory.engine, self.router.run_text)
        self.context.scheduler = self.scheduler
        log.info("plugins: %s", ", ".join(sorted(n for n, _ in self.plugins.list_name_plugin())))

    @classmethod
    async def start(cls, settings: Settings, engine: Engine | None = None) -> Quill:
        """Open the database, the embedder (when on), then the engine backend; each fails with one
        clear message."""
        memory = await asyncio.to_thread(Memory.open, settings.db_url)
        local = settings.embeddings is True
        try:
            semantic = await start_semantic(settings) if local else None
        except BaseException:
            memory.close()
            raise
        owned = engine is None
        try:
            if engine is None:
                engine = await start_engine(settings)
            if settings.embeddings == "server":  # needs the engine's server
                semantic = await start_semantic(settings, engine)
        except BaseException:
            memory.close()
            if semantic is not None:
                await asyncio.to_thread(semantic.embedder.close)
            if owned and engine is not None:
                await engine.close()
            raise
        quill = cls(settings, engine, memory, semantic)
        if semantic is not None:  # new rows, and all of them after a change of embedder
            quill._embedding = asyncio.create_task(quill.context.search.keep_embedded(), name="quill-embedding")
        if settings.tools and settings.mcp_servers:
            for tool in await list_tools(settings.mcp_servers, settings.tool_timeout):
                quill.toolbox.add(tool)
        quill.scheduler.open()  # paused: jobs can be managed; transports call run_jobs()
        quill.hooks.collect("register_jobs", register=quill.scheduler.add_maintenance)
        for result in await quill.hooks.call("startup"):
            if result.failed:
                log.error("plugin %s did not start; its features may not work", result.plugin)
        return quill

    async def close(self, *, close_engine: bool = True) -> None:
        if self._embedding is not None:
            self._embedding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._embedding
        if self.context.semantic is not None:
            await asyncio.to_thread(self.context.semantic.embedder.close)
        await self.scheduler.close()
        await self.toolbox.close()
        if close_engine:
            await self.engine.close()
        self.memory.close()


def declare_settings(hooks: Hooks) -> SettingsRegistry:
    """Every plugin's settings classes, the global ones read from the environment. A refused
    declaration or value stops start-up (SettingError): running with a setting ignored would do
    what nobody asked."""
    registry = SettingsRegistry()
    for plugin, hook in hooks.implementations("register_settings"):
        hook(register=functools.partial(registry.add, plugin))
    return registry


async def start_semantic(settings: Settings, engine: Engine | None = None) -> Semantic:
    """The embedder (its GGUF built into the data folder on first use, or the server's, given
    its `engine`) and the fusion settings."""
    embedder: Embedder | E5Embedder | ServerEmbedder
    try:
        if engine is not None:
            if not isinstance(engine, OpenAIEngine):
                raise EmbedderError("QUILL_EMBEDDINGS=server needs QUILL_ENGINE_BACKEND=openai")
            embedder = ServerEmbedder(engine)
        else:
            embedder = await asyncio.to_thread(local_embedder, settings)
        await embedder.start()
    except (EmbedderError, OSError, ImportError) as exc:  # ImportError: the semantic extra is missing
        raise ModelLoadError(f"semantic search (QUILL_EMBEDDINGS) is on, but {exc}") from exc
    log.info("embedder: %s (%d dimensions)", embedder.model_id, embedder.dim)
    return Semantic.of(
        embedder, settings.qa_min_relevance, settings.embedding_weights, settings.embedding_min_similarity
    )
