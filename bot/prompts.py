"""Prompt templates: Jinja2 files in `prompts/`, loaded by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from bot.config import REPO_ROOT

BUILTIN_PROMPTS = REPO_ROOT / "prompts"
SUFFIX = ".j2"


class PromptLoader:
    """Renders `prompts/<name>.j2`. A team's own folder (QUILL_PROMPTS_DIR) is searched first,
    so it can override one prompt and keep the built-in rest."""

    def __init__(self, directory: Path) -> None:
        folders = [directory] if directory.resolve() == BUILTIN_PROMPTS.resolve() else [directory, BUILTIN_PROMPTS]
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader([str(f) for f in folders]),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=False,
        )

    def render(self, name: str, **values: Any) -> str:
        try:
            template = self._env.get_template(name + SUFFIX)
        except jinja2.TemplateNotFound:
            raise LookupError(f"No prompt named {name!r} ({name}{SUFFIX} in {self._env.loader.searchpath})") from None
        return template.render(**values).strip()
