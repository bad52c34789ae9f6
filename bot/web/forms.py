"""Settings forms generated from what each plugin declares (`Declared.describe()`'s JSON schema),
so a third-party plugin's per-server settings appear in the panel with no panel code of its own."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, SecretStr

from bot.plugin_config import Declared


@dataclass(frozen=True)
class FormField:
    """One input: its kind picks the widget (bool, int, number, text, choice, list)."""

    name: str
    label: str
    kind: str
    value: str  # as the input shows it ("" for unset; lines for a list)
    optional: bool = False  # may be left unset (None): the default or the global setting applies
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    max_length: int | None = None
    checked: bool = False


def _kind(prop: dict[str, Any]) -> tuple[str, bool, dict[str, Any]]:
    """(widget kind, optional, the non-null schema) of one property."""
    options = prop.get("anyOf")
    optional = False
    if options:
        concrete = [o for o in options if o.get("type") != "null"]
        optional = len(concrete) < len(options)
        prop = {**prop, **concrete[0]} if len(concrete) == 1 else prop
    if "enum" in prop:
        return "choice", optional, prop
    kind = {"boolean": "bool", "integer": "int", "number": "number", "array": "list"}.get(prop.get("type", ""), "text")
    return kind, optional, prop


def _shown(value: Any, kind: str) -> str:
    if value is None:
        return ""
    if isinstance(value, SecretStr):
        return "**********"
    if kind == "list":
        return "\n".join(str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def form_fields(entry: Declared, current: BaseModel) -> list[FormField]:
    """The inputs of one scoped settings class, filled with `current`; the plugin's own
    bookkeeping (fields marked `internal`) is left out."""
    schema = entry.describe()["schema"]
    fields = []
    for name, prop in schema.get("properties", {}).items():
        if prop.get("internal"):
            continue
        kind, optional, concrete = _kind(prop)
        value = getattr(current, name)
        choices: tuple[str, ...] = tuple(str(c) for c in concrete.get("enum", ()))
        if kind == "bool" and optional:  # unset, on or off
            kind, choices = "choice", ("true", "false")
        fields.append(
            FormField(
                name=name,
                label=prop.get("description") or name,
                kind=kind,
                value=_shown(value, kind),
                optional=optional,
                choices=choices,
                minimum=concrete.get("minimum", concrete.get("exclusiveMinimum")),
                maximum=concrete.get("maximum", concrete.get("exclusiveMaximum")),
                max_length=concrete.get("maxLength"),
                checked=value is True,
            )
        )
    return fields


def changes_from(entry: Declared, current: BaseModel, form: Mapping[str, str]) -> dict[str, Any]:
    """The submitted values of a settings form, raw: the declaration validates them
    (`PluginContext.update`), so a refused one is named there and nothing is stored."""
    changes: dict[str, Any] = {}
    for field in form_fields(entry, current):
        raw = form.get(field.name)
        if field.kind == "bool":
            changes[field.name] = raw is not None
        elif raw is None:
            continue  # not in this form
        elif field.kind == "list":
            changes[field.name] = [line.strip() for line in raw.splitlines() if line.strip()]
        elif field.optional and raw.strip() == "":
            changes[field.name] = None
        else:
            changes[field.name] = raw.strip()
    return changes


def global_values(entry: Declared, values: BaseModel) -> list[tuple[str, str, str]]:
    """(environment variable, value, description) of a plugin's global settings, secrets masked."""
    props = entry.describe()["schema"].get("properties", {})
    return [
        (
            f"{entry.env_prefix}{name.upper()}",
            _shown(getattr(values, name), ""),
            props.get(name, {}).get("description", ""),
        )
        for name in type(values).model_fields
    ]
