"""A database restart under load, on a Postgres cluster of this module's own: the API answers
``503`` + ``Retry-After`` while it is down, and every job accepted before it ends, once, with one
attempt, soon after it is back. A run that ended meanwhile waits to write its end
(``tasks.outputs.record_outcome``); a worker whose task met the outage otherwise keeps its
message, waits, and gives it back (``tasks.runtime.JobTask``) instead of acknowledging a failure,
which left jobs ``queued`` until the 300 s re-publish sweep."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from config import Settings
from models.db import Database
from models.migrate import upgrade
from tests.conftest import KEYS
from tests.support.outages import all_final, sleepers_running
from tests.support.platform import Platform
from tests.support.platform_fixtures import platform_settings, running_platform
from tests.support.private_postgres import PrivatePostgres, private_postgres

KEY = KEYS[0][1]
JOBS = 10
OUTAGE = 4.0  # seconds the database is down
SLEEP = 0.4  # seconds each job holds the one GPU slot


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivatePostgres]:
    with private_postgres() as pg:
        yield pg


@pytest.fixture(scope="module")
def platform(
    base_settings: Settings,
    worker_amqp_url: str,
    cluster: PrivatePostgres,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Platform]:
    conn = psycopg2.connect(cluster.url)
    conn.autocommit = True
    conn.cursor().execute("CREATE DATABASE aiorch")
    conn.close()
    tmp = tmp_path_factory.mktemp("outage")
    url = cluster.url.rsplit("/", 1)[0] + "/aiorch"
    settings = platform_settings(base_settings, tmp, broker_url=worker_amqp_url, database_url=url)
    db = Database(settings)
    upgrade(db)
    db.dispose()
    with running_platform(settings, tmp) as plat:
        yield plat


def test_every_job_accepted_before_a_database_restart_ends_once_soon_after(
    platform: Platform, cluster: PrivatePostgres, tmp_path: Path
) -> None:
    ids = sleepers_running(platform, KEY, JOBS, SLEEP)

    cluster.stop()
    stopped = time.monotonic()
    try:
        down = platform.submit(KEY, "debug_sleep", {"seconds": SLEEP})
        assert down.status_code == 503, down.text
        assert down.json()["error"]["code"] == "database_unavailable" and down.headers["Retry-After"]
        time.sleep(max(0.0, OUTAGE - (time.monotonic() - stopped)))
    finally:
        cluster.start()
    # Every accepted job ends within the outage plus 30 s (the work itself is JOBS * SLEEP s).
    jobs = all_final(platform, KEY, ids, within=30 + JOBS * SLEEP)
    assert {job["status"] for job in jobs.values()} == {"succeeded"}, jobs
    # Each ran once, the one holding the slot when the database stopped too: its run ended during
    # the outage and its final write waited for the database (no attempt counted for it).
    assert {job["attempts"] for job in jobs.values()} == {1}, jobs
    assert "Traceback" not in platform.log("gpu")
