"""The plugin manager: built-in plugins from the `plugins/` package, others by entry point."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import pkgutil
from pathlib import Path

import pluggy

from bot import hookspecs
from bot.i18n import add_catalog_folder
from bot.prompts import add_prompt_folder

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "quill.plugins"
# Core features built as plugins, always loaded (like simonw/llm's default plugins), named here
# and imported only by the plugin manager.
CORE_PLUGINS = ("bot.builtin.privacy", "bot.builtin.finetune", "bot.builtin.language")
# The package of the plugins that ship with quill; each of its modules is loaded.
BUILTIN_PACKAGE = "plugins"


def make_plugin_manager(*, entry_points: bool = True) -> pluggy.PluginManager:
    """Register the core plugins, every module in `plugins/` and every `quill.plugins` entry point.

    A plugin that fails to import is logged and left out; the others still load.
    """
    pm = pluggy.PluginManager("quill")
    pm.add_hookspecs(hookspecs)
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    names = [*CORE_PLUGINS, *(i.name for i in pkgutil.iter_modules(folders, prefix=f"{BUILTIN_PACKAGE}."))]
    for name in names:
        _register(pm, name, lambda name=name: importlib.import_module(name))
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            _register(pm, ep.name, ep.load)
    return pm


def _register(pm: pluggy.PluginManager, name: str, load) -> None:
    try:
        plugin = load()
        pm.register(plugin, name)
    except Exception:
        log.exception("plugin %s failed to load and is disabled", name)
    else:
        # A plugin's own catalogs sit in `locale/` beside its module, its prompts in `prompts/`.
        if where := getattr(plugin, "__file__", None):
            add_catalog_folder(Path(where).parent / "locale")
            add_prompt_folder(Path(where).parent / "prompts")
        log.debug("plugin %s registered", name)
