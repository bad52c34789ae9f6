"""Settings that plugins declare for themselves, global and per guild or channel.

A plugin declares, in its `register_settings` hook:
- `PluginSettings` subclasses: global settings read from the environment and `.env`, each field
  `QUILL_<PLUGIN>_<FIELD>` (a class may set its own `env_prefix`);
- `GuildSettings` / `ChannelSettings` subclasses: defaults of what admins change per guild or
  per channel, stored in `scope_setting` under keys namespaced by the plugin (`moderate.terms`);
- `UserSettings` / `MemberSettings` subclasses: what each person sets for themselves, everywhere
  or in one guild (Red's `register_user` / `register_member`), stored in `user_setting`, a
  person's data like their messages (erased by /forget me, listed by /export me).

Each is a pydantic model, so a value is validated where it is declared, and its JSON schema
(types, descriptions, choices, bounds) is what a settings form is rendered from. Red-DiscordBot's
`Config.get_conf(...).register_guild(**defaults)` is the model: here the defaults are the
model's, and unset values fall back to them, so a changed default reaches every guild that
never set its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from bot.types import QuillError

log = logging.getLogger(__name__)

Scope = Literal["global", "guild", "channel", "member", "user"]


class PluginSettings(BaseSettings):
    """A plugin's global settings (subclass it; the environment overrides the defaults)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")
    scope: ClassVar[Scope] = "global"


class ScopedSettings(BaseModel):
    """Settings stored per guild or per channel; a field marked `json_schema_extra={"internal":
    True}` is the plugin's own bookkeeping (a digest's last run), not shown in forms."""

    model_config = ConfigDict(validate_assignment=True, extra="ignore")
    scope: ClassVar[Scope]
    # Set by the core's own settings (a transport's), which no plugin registers: the namespace
    # they are stored under, registered on first use.
    namespace: ClassVar[str | None] = None
    # Whether only admins may change these (forms and commands); most per-guild settings are.
    admin: ClassVar[bool] = True


class GuildSettings(ScopedSettings):
    scope: ClassVar[Scope] = "guild"


class ChannelSettings(ScopedSettings):
    scope: ClassVar[Scope] = "channel"


class UserSettings(ScopedSettings):
    """One person's own settings, the same in every guild and DM (a language)."""

    scope: ClassVar[Scope] = "user"
    admin: ClassVar[bool] = False


class MemberSettings(ScopedSettings):
    """One person's own settings in one guild."""

    scope: ClassVar[Scope] = "member"
    admin: ClassVar[bool] = False


S = TypeVar("S", bound=BaseModel)


class SettingError(QuillError):
    """A setting value its declaration refuses; the message names the setting."""


@dataclass(frozen=True)
class Declared:
    """One settings class as a plugin registered it."""

    plugin: str  # the short plugin name: the namespace of its keys and of its environment
    model: type[BaseModel]

    @property
    def scope(self) -> Scope:
        return self.model.scope  # type: ignore[attr-defined,no-any-return]

    @property
    def env_prefix(self) -> str:
        given = self.model.model_config.get("env_prefix") or ""
        return str(given) or f"QUILL_{self.plugin.upper()}_"

    def key(self, field: str) -> str:
        """The stored key of a scoped field: `<plugin>.<field>`."""
        return f"{self.plugin}.{field}"

    def describe(self) -> dict[str, Any]:
        """What a settings form needs: where the values live and the model's JSON schema."""
        schema = self.model.model_json_schema()
        return {
            "plugin": self.plugin,
            "scope": self.scope,
            "admin": getattr(self.model, "admin", True),
            "env_prefix": self.env_prefix if self.scope == "global" else None,
            "schema": schema,
        }


class SettingsRegistry:
    """Every declared settings class, the global ones loaded once from the environment."""

    def __init__(self) -> None:
        self.declared: dict[type[BaseModel], Declared] = {}
        self.values: dict[type[BaseModel], BaseModel] = {}

    def add(self, plugin: str, model: type[BaseModel]) -> None:
        """Register `model` for `plugin`; a global one is read from the environment now, so a bad
        value stops start-up with pydantic's message naming the variable."""
        if not isinstance(getattr(model, "scope", None), str):
            raise TypeError(
                f"plugin {plugin}: {model.__name__} is not a PluginSettings, GuildSettings, ChannelSettings, "
                "UserSettings or MemberSettings"
            )
        if model in self.declared:
            raise ValueError(f"plugin {plugin}: {model.__name__} is already registered")
        entry = Declared(plugin, model)
        clash = [d for d in self.declared.values() if d.plugin == plugin and d.scope == entry.scope != "global"]
        if clash:
            raise ValueError(
                f"plugin {plugin}: one {entry.scope} settings class per plugin ({clash[0].model.__name__})"
            )
        if entry.scope == "global":
            try:
                self.values[model] = model(_env_prefix=entry.env_prefix)  # type: ignore[call-arg]
            except ValidationError as exc:
                problems = "; ".join(
                    f"{entry.env_prefix}{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
                )
                raise SettingError(f"invalid setting {problems}") from None
        self.declared[model] = entry

    def get(self, model: type[S]) -> S:
        """The global settings instance of `model` (mutable, for tests and a future settings page)."""
        if model not in self.values:
            raise KeyError(f"{model.__name__} is not a registered global settings class")
        return self.values[model]  # type: ignore[return-value]

    def entry(self, model: type[BaseModel]) -> Declared:
        if model not in self.declared and (namespace := getattr(model, "namespace", None)):
            self.add(namespace, model)
        if model not in self.declared:
            raise KeyError(f"{model.__name__} is not a registered settings class")
        return self.declared[model]

    def of_plugin(self, plugin: str) -> list[Declared]:
        return [d for d in self.declared.values() if d.plugin == plugin]

    def build(self, model: type[S], stored: dict[str, Any]) -> S:
        """The scoped settings from stored `<plugin>.<field>` values over the defaults. A stored
        value that no longer validates (a field's type changed) is logged and left at its
        default, never served."""
        entry = self.entry(model)
        values: dict[str, Any] = {}
        for name in model.model_fields:
            key = entry.key(name)
            if key in stored:
                values[name] = stored[key]
        try:
            return model.model_validate(values)
        except ValidationError as exc:
            bad = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
            log.warning("stored %s settings %s are invalid and ignored: %s", entry.plugin, sorted(bad), exc)
            return model.model_validate({k: v for k, v in values.items() if k not in bad})
