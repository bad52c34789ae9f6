"""What a plugin contributes to the admin panel through the `register_web_pages` hook.

A plugin never sees the web framework: its handler gets a `WebRequest` (the server it is about,
the query, the form fields with the CSRF token already checked, uploaded text files already
bounded by type and QUILL_MAX_DOCUMENT_CHARS) and returns a `Page` (one of its templates, which
extend the core's `base.html`) or a `Redirect`. Log-in, authorization for the server, CSRF,
escaping and security headers are the core's (bot/web/app.py), so a plugin page cannot forget them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from bot.types import Place


@dataclass(frozen=True)
class Upload:
    """A text file uploaded with a form: its name (as the browser gave it, never a path used)
    and its text."""

    name: str
    text: str


@dataclass(frozen=True)
class WebRequest:
    """One request to a plugin page, about one server (`place`: a guild, channel ""; or a
    console conversation)."""

    place: Place
    space: str  # the server's key in URLs
    plugin: str
    page: str
    method: str
    user: str
    # Whether the visitor administers every server (a log-in link, QUILL_ADMIN_IDS), not only this one.
    every: bool = False
    query: Mapping[str, str] = field(default_factory=dict)
    form: Mapping[str, str] = field(default_factory=dict)
    files: tuple[Upload, ...] = ()
    # Uploads refused (file name, reason): wrong type, not UTF-8, over QUILL_MAX_DOCUMENT_CHARS.
    refused: tuple[tuple[str, str], ...] = ()

    def url(self, page: str | None = None, **query: object) -> str:
        """The address of one of this plugin's pages (this one by default) in the same server."""
        path = f"/s/{self.space}/{self.plugin}/{page or self.page}"
        return path + ("?" + urlencode({k: v for k, v in query.items() if v is not None}) if query else "")


@dataclass(frozen=True)
class Page:
    """Render `template` (a file of the plugin's template folder) with `values`."""

    template: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Redirect:
    """Go to `to` (a URL from `WebRequest.url`) after a POST, showing `message` once there."""

    to: str
    message: str = ""
    error: bool = False


@dataclass(frozen=True)
class Download:
    """Send `body` as a file named `filename` (an export)."""

    filename: str
    body: bytes
    media_type: str = "application/json"


WebHandler = Callable[[Any, WebRequest], Awaitable[Page | Redirect | Download]]


@dataclass(frozen=True)
class WebPage:
    """A page a plugin adds to every server's part of the panel, at /s/<server>/<plugin>/<name>.

    `title` is marked with N_() and shown translated in the menu; `templates` is the folder of
    the plugin's Jinja templates (each extends "base.html"); `post` lets the page take forms;
    `everywhere`: only for admins of every server (a log-in link, QUILL_ADMIN_IDS), for what
    acts on the whole bot (its fine-tuned adapter), not on one server."""

    name: str
    title: str
    handler: WebHandler
    templates: Path | None = None
    post: bool = False
    menu: bool = True
    everywhere: bool = False
