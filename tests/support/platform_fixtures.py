"""The integration fixtures every ``integration/`` folder shares: the real API and real workers
over the run's Postgres and RabbitMQ.

``tests/conftest.py`` loads this module as a pytest plugin, so ``platform`` (module-scoped: one API
and one cpu and gpu worker per test module) and ``images`` (an image server) are fixtures of every
test; a module that needs its own platform (a routes file, other settings) overrides ``platform``
locally and builds it with ``platform_settings`` and ``running_platform`` or ``routed_platform``,
imported from here. Every test under an ``integration/`` folder is marked ``integration`` by
``tests/conftest.py``, so ``make test-fast`` (``-m "not integration"``) leaves them out.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from config import Settings
from models.db import Database
from models.migrate import upgrade
from tests.support.platform import Platform, free_port
from tests.support.servers import ImageServer
from tests.support.services import fresh_database, purge_queues


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, astronaut_png: Path) -> Iterator[ImageServer]:
    folder = tmp_path_factory.mktemp("served")
    shutil.copy(astronaut_png, folder / "astronaut.png")
    # Big enough that /slow/ takes several seconds to drip out.
    from PIL import Image

    Image.open(astronaut_png).convert("RGB").resize((400, 400)).save(folder / "big.png")
    server = ImageServer(folder).start()
    yield server
    server.stop()


def platform_settings(base: Settings, tmp: Path, **overrides: object) -> Settings:
    """Settings of one platform: its own port, folders and database (a module's left-overs never
    reach the next module's workers)."""
    port = free_port()
    if "database_url" not in overrides:
        overrides["database_url"] = fresh_database(base)
    return base.with_overrides(
        port=port,
        public_url=f"http://127.0.0.1:{port}",
        var_dir=tmp,
        storage_dir=tmp / "storage",
        **overrides,
    )


def embedded_settings(base: Settings, tmp: Path, **overrides: object) -> Settings:
    """``platform_settings`` for the embedded default: a migrated SQLite file in ``tmp`` and the
    filesystem transport."""
    settings = platform_settings(
        base, tmp, database_url=f"sqlite:///{tmp / 'aiorch.db'}", broker_url="filesystem://", **overrides
    )
    db = Database(settings)
    upgrade(db)
    db.dispose()
    return settings


@contextlib.contextmanager
def running_platform(settings: Settings, tmp: Path) -> Iterator[Platform]:
    """The API under gunicorn and the cpu and gpu workers on ``settings``, stopped on exit."""
    plat = Platform(settings, tmp / "logs")
    purge_queues(settings.broker_url)  # what an earlier module's workers left in the vhost
    try:
        plat.start_api()
        plat.start_workers()
        yield plat
    finally:
        plat.stop()


@contextlib.contextmanager
def routed_platform(base: Settings, broker_url: str, tmp: Path, routes: dict[str, Any]) -> Iterator[Platform]:
    """The API and workers with ``routes`` as their routes file, as an operator configures it."""
    path = tmp / "routes.json"
    path.write_text(json.dumps(routes))
    with running_platform(platform_settings(base, tmp, broker_url=broker_url, routes_file=path), tmp) as plat:
        yield plat


@pytest.fixture(scope="module")
def platform(
    base_settings: Settings, worker_amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp("platform")
    with running_platform(platform_settings(base_settings, tmp, broker_url=worker_amqp_url), tmp) as plat:
        yield plat
