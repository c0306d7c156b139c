"""Shared fixtures: a private Postgres database and RabbitMQ vhost per run, migrated to head.

Every run creates ``aiorch_t_<random>`` on the machine's Postgres and a vhost of the same name on
its RabbitMQ, and drops both at the end, so parallel runs never see each other's jobs.

The tests are laid out like the packages they test (``tests/app/``, ``tests/client/`` for
``aiorch/``, ``tests/models/``, ``tests/tasks/``, ``tests/inference/``, ``tests/config/``): unit test
modules directly in each folder, tests against the real API and workers in its ``integration/``
subfolder. Those share one ``platform`` fixture (``tests/support/platform_fixtures.py``, loaded
below as a plugin) and are all marked ``integration`` here, by where they live.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from config import Settings
from models.db import Database
from models.migrate import upgrade

pytest_plugins = ["tests.support.platform_fixtures"]

PG_ADMIN = "dbname=postgres user=postgres host=127.0.0.1 port=5432"
RUN_ID = uuid.uuid4().hex[:10]
KEYS = (("alice", "alice-key-0123456789"), ("bob", "bob-key-0123456789"))


def _pg_admin(sql: str) -> None:
    conn = psycopg2.connect(PG_ADMIN)
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql)
    finally:
        conn.close()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


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
        _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def _vhost(suffix: str) -> Iterator[str]:
    vhost = f"aiorch_t_{RUN_ID}_{suffix}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


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
