"""Settings: every one, the core's and each plugin's, is documented in .env.example, in a block
that a comment opens, and .env.example documents nothing that is not a setting."""

from __future__ import annotations

import re

from bot.app import declare_settings
from bot.config import REPO_ROOT, Settings
from bot.hooks import Hooks
from bot.plugins import make_plugin_manager


def declared_names() -> set[str]:
    """The environment variable of every setting: the core's and the built-in plugins'."""
    names = {f"QUILL_{name.upper()}" for name in Settings.model_fields}
    registry = declare_settings(Hooks(make_plugin_manager(entry_points=False), lambda: 1.0))
    for entry in registry.declared.values():
        if entry.scope == "global":
            names |= {f"{entry.env_prefix}{name.upper()}" for name in entry.model.model_fields}
    return names


def test_every_setting_is_documented_in_env_example() -> None:
    lines = (REPO_ROOT / ".env.example").read_text().splitlines()
    documented = {}
    for i, line in enumerate(lines):
        if match := re.match(r"#? ?(QUILL_[A-Z0-9_]+)=", line):
            documented[match.group(1)] = i
    names = declared_names()
    missing = sorted(names - documented.keys())
    assert missing == [], f"settings missing from .env.example: {missing}"
    for name, i in documented.items():
        block = []  # the lines above it, up to the first blank line
        for line in reversed(lines[:i]):
            if not line.strip():
                break
            block.append(line)
        assert any(line.startswith("# ") for line in block), f"{name} has no comment above it"
        assert name in names, f"{name} is not a setting"


def test_plugin_settings_are_namespaced_and_described_for_forms() -> None:
    """What a settings page renders: each class's plugin, scope and JSON schema, every field
    with a description; scoped keys carry the plugin's name."""
    registry = declare_settings(Hooks(make_plugin_manager(entry_points=False), lambda: 1.0))
    plugins = {(d.plugin, d.scope) for d in registry.declared.values()}
    assert {("qa", "global"), ("moderate", "guild"), ("translate", "channel"), ("privacy", "guild")} <= plugins
    for entry in registry.declared.values():
        described = entry.describe()
        fields = described["schema"]["properties"]
        assert fields and all(f.get("description") for f in fields.values()), entry.model.__name__
        if entry.scope != "global":
            assert all(entry.key(name).startswith(f"{entry.plugin}.") for name in fields)
