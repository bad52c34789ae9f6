"""Assembles the core once per process: settings, the one engine, memory, plugins and router."""

from __future__ import annotations

import asyncio
import functools
import logging

from bot import finetune, privacy
from bot.api import PluginContext
from bot.config import Settings
from bot.engine import Engine, start_engine
from bot.memory import Memory
from bot.plugins import make_plugin_manager
from bot.prompts import PromptLoader
from bot.router import Router
from bot.scheduler import Scheduler

log = logging.getLogger(__name__)


class Quill:
    """The running bot, shared by every transport."""

    def __init__(self, settings: Settings, engine: Engine, memory: Memory) -> None:
        self.settings = settings
        self.engine = engine
        self.memory = memory
        self.plugins = make_plugin_manager()
        prompts = PromptLoader(settings.prompts_dir)
        self.context = PluginContext(engine, memory, settings, prompts, hooks=self.plugins.hook)
        self.router = Router(self.context, self.plugins)
        self.scheduler = Scheduler(settings, memory.engine, self.router.run_text)
        self.context.scheduler = self.scheduler
        self.context.digest_sections = self.router.digest_sections
        log.info("plugins: %s", ", ".join(sorted(n for n, _ in self.plugins.list_name_plugin())))

    @classmethod
    async def start(cls, settings: Settings, engine: Engine | None = None) -> Quill:
        """Open the database, then start the engine backend; each fails with one clear message."""
        memory = await asyncio.to_thread(Memory.open, settings.db_url)
        if engine is None:
            try:
                engine = await start_engine(settings)
            except BaseException:
                memory.close()
                raise
        quill = cls(settings, engine, memory)
        quill.scheduler.open()  # paused: jobs can be managed; transports call run_jobs()
        retention = functools.partial(privacy.apply_retention, quill.context)
        quill.scheduler.add_maintenance("quill-retention", settings.retention_when, retention)
        await finetune.restore_adapter(quill.context)
        return quill

    async def close(self, *, close_engine: bool = True) -> None:
        await self.scheduler.close()
        if close_engine:
            await self.engine.close()
        self.memory.close()
