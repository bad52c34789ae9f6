"""plugin-owned settings: per-guild and per-channel keys namespaced by the plugin that declares them

Revision ID: 0007_plugin_settings
Revises: 0006_reply_to
Create Date: 2026-12-01

Keys become `<plugin>.<field>` (bot/plugin_config.py). Renamed: retention_days ->
privacy.retention_days, auto_translate -> translate.auto, help_channels ->
discord.help_channels; moderation's one JSON object becomes one row per field (moderate.terms,
moderate.channel, moderate.classify, moderate.delete). digest.last_run and finetune.enabled
already had that form. Values are carried over as they are; nothing is dropped but a null.
"""

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_plugin_settings"
down_revision: str | None = "0006_reply_to"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RENAMED = {
    "retention_days": "privacy.retention_days",
    "auto_translate": "translate.auto",
    "help_channels": "discord.help_channels",
}
MODERATION = "moderation"
MODERATION_FIELDS = ("terms", "channel", "classify", "delete")

_rows = sa.table(
    "scope_setting",
    sa.column("guild_id", sa.String),
    sa.column("channel_id", sa.String),
    sa.column("key", sa.String),
    sa.column("value", sa.Text),
    sa.column("updated_at", sa.DateTime),
)


def _rename(connection: sa.Connection, old: str, new: str) -> None:
    connection.execute(sa.update(_rows).where(_rows.c.key == old).values(key=new))


def upgrade() -> None:
    connection = op.get_bind()
    for old, new in RENAMED.items():
        _rename(connection, old, new)
    # A null (auto-translation turned off) is the default now: no row.
    connection.execute(sa.delete(_rows).where(_rows.c.key == "translate.auto", _rows.c.value == "null"))
    found = connection.execute(sa.select(_rows).where(_rows.c.key == MODERATION)).mappings().all()
    for row in found:
        stored = json.loads(row["value"]) if row["value"] else {}
        for name in MODERATION_FIELDS:
            if isinstance(stored, dict) and stored.get(name) is not None:
                connection.execute(
                    sa.insert(_rows).values(
                        guild_id=row["guild_id"],
                        channel_id=row["channel_id"],
                        key=f"moderate.{name}",
                        value=json.dumps(stored[name]),
                        updated_at=row["updated_at"],
                    )
                )
    connection.execute(sa.delete(_rows).where(_rows.c.key == MODERATION))


def downgrade() -> None:
    connection = op.get_bind()
    for old, new in RENAMED.items():
        _rename(connection, new, old)
    keys = [f"moderate.{name}" for name in MODERATION_FIELDS]
    found = connection.execute(sa.select(_rows).where(_rows.c.key.in_(keys))).mappings().all()
    by_scope: dict[tuple[str, str], dict[str, object]] = {}
    stamps = {}
    for row in found:
        scope = (row["guild_id"], row["channel_id"])
        by_scope.setdefault(scope, {})[row["key"].removeprefix("moderate.")] = json.loads(row["value"])
        stamps[scope] = row["updated_at"]
    connection.execute(sa.delete(_rows).where(_rows.c.key.in_(keys)))
    for (guild_id, channel_id), values in by_scope.items():
        connection.execute(
            sa.insert(_rows).values(
                guild_id=guild_id,
                channel_id=channel_id,
                key=MODERATION,
                value=json.dumps(values),
                updated_at=stamps[(guild_id, channel_id)],
            )
        )
