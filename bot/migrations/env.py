"""Alembic environment: migrates the connection that `bot.memory.alembic_config` hands over."""

from alembic import context
from sqlmodel import SQLModel

import bot.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from bot.memory import include_name

# Batch mode lets SQLite alter tables by copying them, which it cannot do in place.
context.configure(
    connection=context.config.attributes["connection"],
    target_metadata=SQLModel.metadata,
    render_as_batch=True,
    include_name=include_name,
)
with context.begin_transaction():
    context.run_migrations()
