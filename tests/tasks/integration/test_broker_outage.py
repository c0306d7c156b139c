"""A broker restart under load, on a RabbitMQ node of this module's own: jobs are still accepted
while it is down (they wait for their turn in the database), the workers reconnect by themselves,
and every job accepted ends exactly once (durable queues, persistent messages, late acks: a message in flight
when the connection dropped is delivered again and its run fenced by the claim)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from config import Settings
from tests.conftest import KEYS
from tests.support.outages import all_final, finished_events, sleepers_running
from tests.support.platform import Platform
from tests.support.platform_fixtures import platform_settings, running_platform
from tests.support.private_rabbitmq import PrivateRabbit, private_rabbitmq

KEY = KEYS[0][1]
JOBS = 12
OUTAGE = 3.0  # seconds the broker is down
SLEEP = 0.3  # seconds each job holds the one GPU slot


@pytest.fixture(scope="module")
def node() -> Iterator[PrivateRabbit]:
    with private_rabbitmq() as rabbit:
        yield rabbit


@pytest.fixture(scope="module")
def platform(
    base_settings: Settings, node: PrivateRabbit, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp("broker-outage")
    with running_platform(platform_settings(base_settings, tmp, broker_url=node.url), tmp) as plat:
        yield plat


def test_every_job_accepted_before_a_broker_restart_ends_exactly_once(
    platform: Platform, node: PrivateRabbit
) -> None:
    ids = sleepers_running(platform, KEY, JOBS, SLEEP)

    node.stop()
    stopped = time.monotonic()
    try:
        # Its queue's slot is taken: the job waits for its turn in the database, so it is accepted
        # with the broker down (a submit that must publish at once gets 503: test_faults).
        down = platform.submit(KEY, "debug_sleep", {"seconds": SLEEP})
        assert down.status_code == 202, down.text
        ids.append(down.json()["job_id"])
        time.sleep(max(0.0, OUTAGE - (time.monotonic() - stopped)))
    finally:
        node.start()
    jobs = all_final(platform, KEY, ids, within=45 + JOBS * SLEEP)
    assert {job["status"] for job in jobs.values()} == {"succeeded"}, jobs
    # Each ended once: one job.finished event each, whatever was delivered twice.
    assert finished_events(platform.settings.database_url, ids) == dict.fromkeys(ids, 1)
    # And the platform takes new jobs again.
    again = platform.submit(KEY, "debug_sleep", {"seconds": 0})
    assert again.status_code == 202, again.text
