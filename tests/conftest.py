"""Shared fixtures: a private Postgres database and RabbitMQ vhost per run, migrated to head.

Every run creates ``aiorch_t_<random>`` on the machine's Postgres and a vhost of the same name on
its RabbitMQ, and drops both at the end, so parallel runs never see each other's jobs.

The tests are laid out like the packages they test (``tests/app/``, ``tests/client/`` for
``aiorch/``, ``tests/models/``, ``tests/tasks/``, ``tests/inference/``, ``tests/config/``): unit test
modules directly in each folder, tests against the real API and workers in its ``integration/``
subfolder. Those share one ``platform`` fixture (``tests/support/platform_fixtures.py``, loaded
below as a plugin) and are all marked ``integration`` here, by where they live. The shared-storage
tests share ``s3`` and ``bucket`` (``tests/support/s3.py``, a plugin too).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from config import Settings
from models.db import Database
from models.migrate import upgrade
from tests.support.services import PG_ADMIN, RUN_ID, drop_created, pg_admin, vhost

pytest_plugins = ["tests.support.platform_fixtures", "tests.support.s3"]

KEYS = (("alice", "alice-key-0123456789"), ("bob", "bob-key-0123456789"))
# Re-exported: test modules import them from here.
_pg_admin = pg_admin
__all__ = ["KEYS", "PG_ADMIN", "RUN_ID", "_pg_admin", "_vhost"]


TESTS = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under an ``integration/`` folder runs against real worker processes: mark it
    ``integration`` so ``-m "not integration"`` (``make test-fast``) leaves it out."""
    for item in items:
        try:
            folders = item.path.resolve().relative_to(TESTS).parts[:-1]
        except ValueError:  # collected from outside tests/ (a path given on the command line)
            continue
        if "integration" in folders:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _restore_umask() -> Iterator[None]:
    """The ``aiorch`` CLI sets umask 077 in its own process; a test that runs it in-process
    (click's CliRunner) must not leave it set for the tests after it, whose file-mode checks
    would then pass without the code under test doing anything."""
    mask = os.umask(0o022)
    os.umask(mask)
    yield
    os.umask(mask)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"aiorch_t_{RUN_ID}"
    _pg_admin(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        drop_created()  # the platforms' own databases (tests/support/services.py)
        _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


_vhost = vhost  # re-exported for test modules


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """The vhost of unit tests: messages they publish pile up unconsumed, harmlessly."""
    with _vhost("unit") as url:
        yield url


@pytest.fixture(scope="session")
def worker_amqp_url() -> Iterator[str]:
    """The vhost the integration suite's real workers consume from."""
    with _vhost("int") as url:
        yield url


@pytest.fixture(scope="session")
def base_settings(pg_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    var = tmp_path_factory.mktemp("var")
    settings = Settings(
        var_dir=var,
        port=8000,
        database_url=pg_url,
        broker_url=amqp_url,
        api_keys=KEYS,
        storage_dir=var / "storage",
        public_url="http://127.0.0.1:8000",
        models_dir=var / "models",
        # The production guard, with loopback let through its allow-list: the test servers
        # listen on 127.0.0.1 and are reached through the same checked, pinned path.
        allow_private_urls=False,
        allow_private_networks=("127.0.0.0/8", "::1/128"),
        debug_tasks=True,
        log_json=False,
    )
    db = Database(settings)
    upgrade(db)
    db.dispose()
    return settings


@pytest.fixture
def settings(base_settings: Settings) -> Settings:
    return base_settings


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings)
    yield database
    database.dispose()


@pytest.fixture(scope="session")
def astronaut_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("images") / "astronaut.png"
    Image.fromarray(data.astronaut()).resize((96, 96)).save(path)
    return path
