"""Priority on both brokers (issue 14): with the only worker of a queue busy, a priority 9 job sent
after several priority 0 jobs of the same client runs before them; the priority 0 ones run in the
order they were sent. On RabbitMQ (queues with x-max-priority) and on the embedded default
(SQLite + the filesystem transport, tasks/fs_transport.py), through the real API and workers."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from config import Settings
from tests.conftest import KEYS
from tests.support.platform import FINAL, Platform
from tests.support.platform_fixtures import embedded_settings, platform_settings, running_platform

KEY = KEYS[0][1]
BLOCK_SECONDS = 4.0  # long enough to send the other jobs while it runs, on a busy 2-core machine


@pytest.fixture(scope="module", params=["rabbitmq", "embedded"])
def broker_platform(
    request: pytest.FixtureRequest,
    base_settings: Settings,
    worker_amqp_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp(f"priority-{request.param}")
    if request.param == "rabbitmq":
        settings = platform_settings(base_settings, tmp, broker_url=worker_amqp_url)
    else:
        settings = embedded_settings(base_settings, tmp)
    with running_platform(settings, tmp) as plat:
        yield plat


def wait_for(plat: Platform, job_id: str, statuses: set[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = plat.job(KEY, job_id)
        if job["status"] in statuses or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def sleep_job(plat: Platform, seconds: float, priority: int) -> str:
    created = plat.submit(KEY, "debug_sleep", {"seconds": seconds}, priority=priority)
    assert created.status_code == 202, created.text
    assert created.json()["priority"] == priority
    return str(created.json()["job_id"])


def test_a_priority_9_job_sent_after_priority_0_jobs_of_the_same_client_runs_before_them(
    broker_platform: Platform,
) -> None:
    plat = broker_platform
    # debug_sleep runs on gpu.diffusion, whose only worker runs one job at a time.
    blocker = sleep_job(plat, BLOCK_SECONDS, 0)
    assert wait_for(plat, blocker, {"running"} | FINAL, 60)["status"] == "running"
    low = [sleep_job(plat, 0.05, 0) for _ in range(4)]
    high = sleep_job(plat, 0.05, 9)
    # Everything was sent while the worker was busy, or the test would prove nothing.
    assert plat.job(KEY, blocker)["status"] == "running"

    jobs = {job_id: wait_for(plat, job_id, FINAL, 60) for job_id in [blocker, *low, high]}
    assert {job["status"] for job in jobs.values()} == {"succeeded"}, jobs
    started = {job_id: job["started_at_ms"] for job_id, job in jobs.items()}
    assert started[high] < min(started[job_id] for job_id in low)
    assert sorted(low, key=started.__getitem__) == low  # first in, first out within a priority
