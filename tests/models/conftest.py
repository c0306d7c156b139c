"""The model tests' shared fixture: each test that takes ``database`` runs on Postgres (the run's
database) and on a fresh, migrated SQLite file, the two databases the platform supports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from config import Settings
from models.db import Database
from models.migrate import upgrade


@pytest.fixture(params=["postgres", "sqlite"])
def database(request: pytest.FixtureRequest, settings: Settings, tmp_path: Path) -> Iterator[Database]:
    if request.param == "postgres":
        db = Database(settings)
    else:
        db = Database(Settings(database_url=f"sqlite:///{tmp_path / 'models.db'}"))
        upgrade(db)
    yield db
    db.dispose()
