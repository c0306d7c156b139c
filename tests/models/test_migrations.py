"""The Alembic migrations and the models describe the same schema, on Postgres and on SQLite."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from config import Settings
from models.db import Base, Database
from models.migrate import upgrade


def schema_diff(db: Database) -> list:
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def test_postgres_migrated_to_head_matches_the_models(db: Database) -> None:
    assert schema_diff(db) == []


def test_sqlite_migrated_to_head_matches_the_models(tmp_path) -> None:
    db = Database(Settings(database_url=f"sqlite:///{tmp_path / 'm.db'}"))
    upgrade(db)
    upgrade(db)  # idempotent: a second run is a no-op
    assert schema_diff(db) == []
