"""fine-tune gate: every figure of a run (losses, held-out and general NLL, groups, decision)

Revision ID: 0005_finetune_gate
Revises: 0004_multilingual_search
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_finetune_gate"
down_revision: str | None = "0004_multilingual_search"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("finetune_run") as batch_op:
        batch_op.add_column(sa.Column("figures", sa.Text(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("finetune_run") as batch_op:
        batch_op.drop_column("figures")
