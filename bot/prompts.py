"""Prompt templates: Jinja2 files in `prompts/`, loaded by name, in the request's language where
one is written for it (`prompts/zh-CN/qa_system.j2` beside `prompts/qa_system.j2`)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from bot.config import REPO_ROOT
from bot.i18n import DEFAULT_LOCALE, current_locale

BUILTIN_PROMPTS = REPO_ROOT / "prompts"
SUFFIX = ".j2"
# Folders of plugins' own prompts (`prompts/` beside a plugin's module), searched after quill's.
_plugin_folders: list[Path] = []


def add_prompt_folder(folder: Path) -> None:
    """Serve a plugin's own prompts (`folder/<name>.j2`, `folder/<locale>/<name>.j2`)."""
    if folder.is_dir() and folder not in _plugin_folders:
        _plugin_folders.append(folder)
        _environment.cache_clear()


class PromptLoader:
    """Renders `<name>.j2`. Folders are searched in order: a team's own (QUILL_PROMPTS_DIR), so it
    can override one prompt and keep the built-in rest, then quill's, then plugins'. In each
    folder the locale's subfolder (`zh-CN/`) comes before the folder itself, so a request in
    Chinese gets a Chinese prompt where one is written, and a team's override of a prompt
    applies in every language unless the team writes that language's too."""

    def __init__(self, directory: Path) -> None:
        same = directory.resolve() == BUILTIN_PROMPTS.resolve()
        self.folders = (BUILTIN_PROMPTS,) if same else (directory, BUILTIN_PROMPTS)

    def render(self, name: str, /, *, locale: str | None = None, **values: Any) -> str:
        """The prompt `name` for `locale` (the current request's by default), filled with `values`."""
        env = _environment((*self.folders, *_plugin_folders), locale or current_locale())
        try:
            template = env.get_template(name + SUFFIX)
        except jinja2.TemplateNotFound:
            raise LookupError(f"No prompt named {name!r} ({name}{SUFFIX} in {env.loader.searchpath})") from None
        return template.render(**values).strip()


@cache
def _environment(folders: tuple[Path, ...], locale: str) -> jinja2.Environment:
    """One Jinja2 environment per folder list and locale (it caches its compiled templates)."""
    search = []
    for folder in folders:
        if locale != DEFAULT_LOCALE:
            search.append(str(folder / locale))
        search.append(str(folder))
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(search),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
    )
