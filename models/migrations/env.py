"""Alembic environment: the URL comes from the caller (``models.migrate``), never the environment."""

from alembic import context

from models import jobs  # noqa: F401  (registers the tables on Base.metadata)
from models.db import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is None:
        raise RuntimeError("run migrations through models.migrate, which passes a connection")
    context.configure(
        connection=connectable,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode rebuilds tables instead.
        render_as_batch=connectable.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
