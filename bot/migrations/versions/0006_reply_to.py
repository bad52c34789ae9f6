"""reply chains: the transport id of the message each message replies to (Discord replies)

Revision ID: 0006_reply_to
Revises: 0005_finetune_gate
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_reply_to"
down_revision: str | None = "0005_finetune_gate"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("message") as batch_op:
        batch_op.add_column(sa.Column("reply_to", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("message") as batch_op:
        batch_op.drop_column("reply_to")
