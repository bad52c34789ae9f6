"""fine-tune: approved answers and training runs

Revision ID: 0003_finetune
Revises: 0002_knowledge
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_finetune"
down_revision: str | None = "0002_knowledge"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "finetune_run",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("base_model", sa.String(length=500), nullable=False),
        sa.Column("dataset_path", sa.String(length=500), nullable=False),
        sa.Column("dataset_sha256", sa.String(length=64), nullable=False),
        sa.Column("n_train", sa.Integer(), nullable=False),
        sa.Column("n_heldout", sa.Integer(), nullable=False),
        sa.Column("adapter_path", sa.String(length=500), nullable=False),
        sa.Column("nll_before", sa.Float(), nullable=True),
        sa.Column("nll_after", sa.Float(), nullable=True),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("finetune_run") as batch_op:
        batch_op.create_index(batch_op.f("ix_finetune_run_status"), ["status"], unique=False)
    op.create_table(
        "approval",
        sa.Column("message_id", sa.Integer(), nullable=False),
        sa.Column("approved_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["message_id"], ["message.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("message_id"),
    )


def downgrade() -> None:
    op.drop_table("approval")
    with op.batch_alter_table("finetune_run") as batch_op:
        batch_op.drop_index(batch_op.f("ix_finetune_run_status"))
    op.drop_table("finetune_run")
