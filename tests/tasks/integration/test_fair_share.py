"""Fair share through the real API and workers, on Postgres + RabbitMQ and on the embedded default:
who runs next when clients' backlogs meet on one queue, priority within a client, the queue
position a client reads, and a dispatcher killed between its COMMIT and its publish.

The queue is ``gpu.diffusion`` (``debug_sleep``), served by one worker process: one slot, plus the
one job sent ahead. Assertions are about order, never about timing."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from config import Settings
from tasks.celery_app import create_celery
from tasks.runtime import Runtime
from tasks.sweeps import sweep
from tests.conftest import KEYS
from tests.support.platform import Platform
from tests.support.platform_fixtures import embedded_settings, platform_settings, running_platform

ALICE, BOB = KEYS[0][1], KEYS[1][1]
CAROL = "carol-key-0123456789"
SLEEP = 0.25


@pytest.fixture(scope="module", params=["postgres", "embedded"])
def platform(
    request: pytest.FixtureRequest,
    base_settings: Settings,
    worker_amqp_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp(f"fair-{request.param}")
    keys = (*base_settings.api_keys, ("carol", CAROL))
    if request.param == "postgres":
        settings = platform_settings(base_settings, tmp, broker_url=worker_amqp_url, api_keys=keys)
    else:
        settings = embedded_settings(base_settings, tmp, api_keys=keys)
    with running_platform(settings, tmp) as plat:
        yield plat


def batch(platform: Platform, key: str, n: int, seconds: float = SLEEP) -> list[str]:
    body = {"jobs": [{"task": "debug_sleep", "payload": {"seconds": seconds}} for _ in range(n)]}
    url, headers = f"{platform.base_url}/v1/jobs/batch", {"X-API-Key": key}
    response = requests.post(url, headers=headers, json=body, timeout=30)
    assert response.status_code == 200, response.text
    return [entry["job_id"] for entry in response.json()["jobs"]]


def one(platform: Platform, key: str, **extra: Any) -> str:
    response = platform.submit(key, "debug_sleep", {"seconds": SLEEP}, **extra)
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def finished(platform: Platform, jobs: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """Every job (id -> key) to its end, in the order they started."""
    done = [(job_id, platform.wait(key, job_id, timeout=120)) for job_id, key in jobs.items()]
    assert all(job["status"] == "succeeded" and job["attempts"] == 1 for _, job in done), done
    return sorted(done, key=lambda pair: pair[1]["started_at_ms"])


def test_a_single_job_does_not_wait_behind_another_clients_backlog(platform: Platform) -> None:
    backlog = batch(platform, ALICE, 12)
    time.sleep(SLEEP)  # alice's first job is running, her second sent ahead
    mine = one(platform, BOB)
    order = [job_id for job_id, _ in finished(platform, {**dict.fromkeys(backlog, ALICE), mine: BOB})]
    # Before bob's job: at most the jobs that held the slot or were sent ahead when it came, and
    # one more that may have been taking its turn at that moment. Not alice's backlog.
    assert order.index(mine) <= 3, order.index(mine)


def test_three_clients_backlogs_take_turns(platform: Platform) -> None:
    jobs = {job_id: ALICE for job_id in batch(platform, ALICE, 6)}
    jobs.update({job_id: BOB for job_id in batch(platform, BOB, 6)})
    jobs.update({job_id: CAROL for job_id in batch(platform, CAROL, 6)})
    started = [jobs[job_id] for job_id, _ in finished(platform, jobs)]
    # Submitted one client after the other, they still run in turns: while every client has jobs
    # left, none is ever more than two started jobs ahead of another (alice's first two were sent
    # before the others came).
    total = {key: started.count(key) for key in (ALICE, BOB, CAROL)}
    counts = dict.fromkeys(total, 0)
    for key in started:
        counts[key] += 1
        if all(counts[k] < total[k] for k in counts):
            assert max(counts.values()) - min(counts.values()) <= 2, (started, counts)


def test_a_priority_job_goes_before_its_clients_waiting_jobs(platform: Platform) -> None:
    backlog = batch(platform, ALICE, 6)
    urgent = one(platform, ALICE, priority=9)
    order = [job_id for job_id, _ in finished(platform, {**dict.fromkeys(backlog, ALICE), urgent: ALICE})]
    assert order.index(urgent) <= 2, order  # after what held the slot or was sent ahead only


def test_queue_positions_are_the_order_jobs_start_in(platform: Platform) -> None:
    # Long enough that nothing starts while the positions are read.
    jobs = {job_id: ALICE for job_id in batch(platform, ALICE, 4, seconds=1.0)}
    jobs.update({job_id: BOB for job_id in batch(platform, BOB, 3, seconds=1.0)})
    read = {job_id: platform.job(key, job_id) for job_id, key in jobs.items()}
    waiting = {job_id: job for job_id, job in read.items() if job["status"] == "queued"}
    assert len(waiting) >= 4
    assert all(isinstance(job["queue_position"], int) for job in waiting.values())
    # The ETA counts the queue: a job further back is due later.
    by_place = sorted(waiting, key=lambda job_id: waiting[job_id]["queue_position"])
    etas = [waiting[job_id]["eta_utc"] for job_id in by_place]
    assert etas == sorted(etas) and len(set(etas)) == len(etas)
    order = [job_id for job_id, _ in finished(platform, jobs) if job_id in waiting]
    assert order == by_place
    assert platform.job(ALICE, order[0])["queue_position"] is None  # not queued any more


def test_a_dispatcher_killed_between_commit_and_publish_loses_no_job(
    base_settings: Settings, worker_amqp_url: str, tmp_path: Path
) -> None:
    """The worker that fills the slots dies right after marking jobs sent: the jobs are not in
    the broker, the sweep sends them again, and each runs exactly once."""
    settings = platform_settings(
        base_settings,
        tmp_path,
        broker_url=worker_amqp_url,
        debug_crash_before_dispatch="fill_slots",
        republish_after=1.0,
    )
    with running_platform(settings, tmp_path) as plat:
        jobs = dict.fromkeys(batch(plat, ALICE, 4), ALICE)
        # A run's end fills the slot and kills its process; the sweep (here, by hand, with the
        # same settings less the crash) sends again what was marked sent and never published.
        healthy = settings.with_overrides(debug_crash_before_dispatch="")
        runtime = Runtime(healthy)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            states = [plat.job(ALICE, job_id)["status"] for job_id in jobs]
            if all(s == "succeeded" for s in states):
                break
            time.sleep(1.2)
            sweep(runtime, create_celery(healthy))
        done = [plat.job(ALICE, job_id) for job_id in jobs]
        assert all(job["status"] == "succeeded" and job["attempts"] == 1 for job in done), done
        assert "signal 9" in (plat.logs / "gpu.log").read_text().lower()  # it did die, mid-dispatch
        runtime.db.dispose()


def sse_blocks(response: requests.Response) -> Iterator[dict[str, str]]:
    """The stream's events as their raw fields (an event without ``id`` has none here)."""
    buffer = b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            lines = [line for line in block.decode().splitlines() if not line.startswith(":")]
            fields = dict(line.split(": ", 1) for line in lines)
            if fields:
                yield fields


def test_a_stream_of_a_waiting_job_says_its_place_as_it_moves_up(platform: Platform) -> None:
    ids = batch(platform, ALICE, 4, seconds=0.6)
    last = ids[-1]
    url, headers = f"{platform.base_url}/v1/jobs/{last}/events", {"X-API-Key": ALICE}
    response = requests.get(url, headers=headers, stream=True, timeout=(5, 60))
    blocks = list(sse_blocks(response))
    first, rest = blocks[0], blocks[1:]
    assert "id" in first and json.loads(first["data"])["queue_position"] >= 1  # first, where it stands
    places = [json.loads(b["data"])["queue_position"] for b in rest if "id" not in b]
    assert places and places == sorted(places, reverse=True) and len(set(places)) == len(places), places
    logged = [json.loads(b["data"]) for b in rest if "id" in b]
    assert [job["status"] for job in logged][-1] == "succeeded"
    assert all(job["queue_position"] is None for job in logged if job["status"] != "queued")
    assert [int(b["id"]) for b in blocks if "id" in b] == sorted(int(b["id"]) for b in blocks if "id" in b)
