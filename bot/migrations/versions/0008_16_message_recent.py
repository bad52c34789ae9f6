"""a conversation's messages newest first from an index: history, summaries and the panel

Revision ID: 0008_16_message_recent
Revises: 0007_plugin_settings
Create Date: 2026-12-03

`history()` and `recent_messages()` read a conversation's newest messages; with only the
conversation_id index SQLite sorted every message of the channel first (113 ms for 5,000 of them,
bench/web.py), and the panel's messages-per-day chart read each row. This index serves both in order.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008_16_message_recent"
down_revision: str | None = "0007_plugin_settings"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_message_conversation_created", "message", ["conversation_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_message_conversation_created", table_name="message")
