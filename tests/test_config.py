"""Settings: every one is documented in .env.example, in a block that a comment opens."""

from __future__ import annotations

import re

from bot.config import REPO_ROOT, Settings


def test_every_setting_is_documented_in_env_example() -> None:
    lines = (REPO_ROOT / ".env.example").read_text().splitlines()
    documented = {}
    for i, line in enumerate(lines):
        if match := re.match(r"#? ?(QUILL_[A-Z0-9_]+)=", line):
            documented[match.group(1)] = i
    missing = [name for name in Settings.model_fields if f"QUILL_{name.upper()}" not in documented]
    assert missing == [], f"settings missing from .env.example: {missing}"
    for name, i in documented.items():
        block = []  # the lines above it, up to the first blank line
        for line in reversed(lines[:i]):
            if not line.strip():
                break
            block.append(line)
        assert any(line.startswith("# ") for line in block), f"{name} has no comment above it"
        assert name[len("QUILL_") :].lower() in Settings.model_fields, f"{name} is not a setting"
