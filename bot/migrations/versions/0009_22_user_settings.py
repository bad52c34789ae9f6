"""per-user settings: a person's own settings (a language for quill's texts), everywhere or per guild

Revision ID: 0009_22_user_settings
Revises: 0008_16_message_recent
Create Date: 2026-12-03

A table of its own, not a column of scope_setting: its rows are personal data (user_id is a
personal column, so /forget me erases them and /export me lists them), and scope_setting's
primary key stays as it is.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_22_user_settings"
down_revision: str | None = "0008_16_message_recent"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "user_setting",
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("guild_id", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "guild_id", "key"),
    )


def downgrade() -> None:
    op.drop_table("user_setting")
