"""Who may use the panel: one-time log-in links (as Jupyter prints one) and Discord OAuth2.

A link's token is random (256 bits), kept only as its SHA-256 in this process, works once and
expires after QUILL_WEB_TOKEN_MINUTES. Discord log-in asks for `identify guilds` and makes the
visitor admin of the servers where they have Manage Server (or Administrator, or own it), or of
all of them when their id is in QUILL_ADMIN_IDS.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MANAGE_GUILD = 0x20
ADMINISTRATOR = 0x8
MAX_GUILDS = 100  # kept in the signed session cookie (about 4 KB at most)


class LoginTokens:
    """One-time log-in tokens of this process."""

    def __init__(self, minutes: int, clock: Any = time.monotonic) -> None:
        self.seconds = minutes * 60
        self.clock = clock
        self._live: dict[str, float] = {}  # sha256 of the token -> expiry

    def issue(self) -> str:
        token = secrets.token_urlsafe(32)
        self._drop_expired()
        self._live[_digest(token)] = self.clock() + self.seconds
        return token

    def redeem(self, token: str) -> bool:
        """True once for a token issued and not expired; it is spent either way."""
        self._drop_expired()
        digest = _digest(token)
        for known in list(self._live):
            if hmac.compare_digest(known, digest):
                return self._live.pop(known) > self.clock()
        return False

    def _drop_expired(self) -> None:
        now = self.clock()
        for known, expiry in list(self._live.items()):
            if expiry <= now:
                del self._live[known]


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


@dataclass(frozen=True)
class Visitor:
    """A logged-in admin: everything (`every` — a log-in link, or QUILL_ADMIN_IDS), or the
    Discord servers listed."""

    id: str
    name: str
    every: bool
    guilds: Mapping[str, str]  # guild id -> name

    def manages(self, transport: str, guild_id: str) -> bool:
        """Whether they may manage this server; nobody manages Discord DMs here, private as they are."""
        if transport == "discord" and not guild_id:
            return False
        return self.every or (transport == "discord" and guild_id in self.guilds)

    def to_session(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "every": self.every, "guilds": dict(self.guilds)}

    @classmethod
    def from_session(cls, data: Any) -> Visitor | None:
        if not isinstance(data, dict):
            return None
        try:
            return cls(str(data["id"]), str(data["name"]), bool(data["every"]), dict(data["guilds"]))
        except (KeyError, TypeError, ValueError):
            return None


def discord_visitor(user: Mapping[str, Any], guilds: Iterable[Mapping[str, Any]], admin_ids: Iterable[str]) -> Visitor:
    """The visitor Discord's `/users/@me` and `/users/@me/guilds` answers describe: admin of the
    servers they own or hold Manage Server or Administrator in; of all with their id in QUILL_ADMIN_IDS."""
    user_id = str(user["id"])
    managed = {}
    for guild in guilds:
        try:
            permissions = int(guild.get("permissions", 0))
        except (TypeError, ValueError):
            permissions = 0
        if guild.get("owner") or permissions & (MANAGE_GUILD | ADMINISTRATOR):
            managed[str(guild["id"])] = str(guild.get("name", ""))[:100]
    name = str(user.get("global_name") or user.get("username") or user_id)
    chosen = dict(sorted(managed.items())[:MAX_GUILDS])
    return Visitor(user_id, name, user_id in set(admin_ids), chosen)
