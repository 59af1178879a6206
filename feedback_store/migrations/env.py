"""Alembic environment: runs on the connection handed over by feedback_store.db.upgrade."""

from __future__ import annotations

from alembic import context

from feedback_store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only through feedback_store.db.upgrade
    raise RuntimeError("run migrations with `feedback-chat db upgrade`")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    transactional_ddl=True,
)
context.run_migrations()
