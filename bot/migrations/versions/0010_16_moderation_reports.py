"""moderation reports: each flagged message as reported, for the admin panel's Moderation page

Revision ID: 0010_16_moderation_reports
Revises: 0009_22_user_settings
Create Date: 2026-12-03

author_id is a personal column (bot/models.py PERSONAL), so /forget erases a person's reports
and /export lists them; retention deletes reports older than the guild's days.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_16_moderation_reports"
down_revision: str | None = "0009_22_user_settings"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "moderation_report",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("transport", sa.String(length=32), nullable=False),
        sa.Column("guild_id", sa.String(length=32), nullable=False),
        sa.Column("channel_id", sa.String(length=64), nullable=False),
        sa.Column("message_id", sa.String(length=64), nullable=False),
        sa.Column("author_id", sa.String(length=64), nullable=False),
        sa.Column("author_name", sa.String(length=128), nullable=False),
        sa.Column("excerpt", sa.Text(), nullable=False),
        sa.Column("reasons", sa.Text(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_moderation_report_place", "moderation_report", ["transport", "guild_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_moderation_report_place", table_name="moderation_report")
    op.drop_table("moderation_report")
