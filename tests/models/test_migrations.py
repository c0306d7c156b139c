"""The Alembic migrations and the models describe the same schema, on Postgres and on SQLite."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from config import Settings
from models.db import Base, Database
from models.migrate import upgrade

# Alembic compares an index with a descending column on Postgres, not on SQLite: there it is
# checked column by column instead (``test_sqlite_...``).
DESCENDING = {
    "ix_jobs_waiting": [("queue", 0), ("client_id", 0), ("priority", 1), ("created_at", 0), ("id", 0)]
}


def schema_diff(db: Database, skip: frozenset[str] = frozenset()) -> list:
    def include(obj: Any, name: str | None, kind: str, reflected: bool, compare_to: Any) -> bool:
        return not (kind == "index" and name in skip)

    with db.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "include_object": include}
        )
        return compare_metadata(context, Base.metadata)


def test_postgres_migrated_to_head_matches_the_models(db: Database) -> None:
    assert schema_diff(db) == []


def test_sqlite_migrated_to_head_matches_the_models(tmp_path) -> None:
    db = Database(Settings(database_url=f"sqlite:///{tmp_path / 'm.db'}"))
    upgrade(db)
    upgrade(db)  # idempotent: a second run is a no-op
    assert schema_diff(db, skip=frozenset(DESCENDING)) == []
    with db.engine.connect() as connection:
        for name, columns in DESCENDING.items():
            info = connection.execute(text(f"PRAGMA index_xinfo('{name}')")).all()
            assert [(row.name, row.desc) for row in info if row.key] == columns
