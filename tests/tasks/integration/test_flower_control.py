"""What an operator sees and does in Flower, with the real API, RabbitMQ, workers and Postgres.

The workers' task events are read here exactly as Flower reads them (Celery's event receiver on
the broker) into Flower's own state and search engine (``flower.events.EventsState``: the task
states, the per-worker counts its dashboard shows, the search box). Revokes are sent as Flower
sends them (``app.control.revoke(task_id, terminate=...)``)."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from flower.events import EventsState
from kombu import Connection

from config import Settings
from models.db import utcnow
from tasks.celery_app import PREPARE, RUN, create_celery, queue_topology
from tasks.runtime import Runtime
from tasks.sweeps import sweep
from tests.conftest import KEYS
from tests.support.platform import Platform
from tests.support.servers import ImageServer
from tests.support.worker_events import worker_events

ALICE = KEYS[0][1]


class FlowerView:
    """The task events the workers send, kept in order; ``state()`` replays them into Flower's
    own ``EventsState``."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def add(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(event)

    def state(self) -> EventsState:
        state = EventsState()
        with self.lock:
            for event in self.events:
                state.event(dict(event))
        return state

    def of_job(self, job_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [
                e
                for e in self.events
                if e["type"].startswith("task-")
                and str(e.get("uuid", "")).startswith(f"{job_id}.")
                and (kind is None or e["type"] == kind)
            ]

    def wait_for(self, job_id: str, kind: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.of_job(job_id, kind)
            if found:
                return found[-1]
            time.sleep(0.05)
        raise AssertionError(f"no {kind} event of job {job_id}: {self.of_job(job_id)}")


@contextlib.contextmanager
def flower_view(app: Celery) -> Iterator[FlowerView]:
    view = FlowerView()
    with worker_events(app, view.add):
        yield view


@pytest.fixture(scope="module")
def app(platform: Platform) -> Celery:
    return create_celery(platform.settings)


@pytest.fixture()
def flower(app: Celery) -> Iterator[FlowerView]:
    with flower_view(app) as view:
        yield view


def queued_task_id(settings: Settings, queue: str, job_id: str, timeout: float = 10.0) -> str:
    """The task id of the job's message waiting on ``queue``, read as RabbitMQ's management UI
    shows a queued message (got, then handed straight back to the queue)."""
    [declared] = [q for q in queue_topology() if q.name == queue]
    deadline = time.monotonic() + timeout
    with Connection(settings.broker_url) as connection:
        bound = declared(connection.default_channel)
        while time.monotonic() < deadline:
            seen = []
            try:
                while (message := bound.get(no_ack=False)) is not None:
                    seen.append(message)
                for message in seen:
                    if message.headers.get("argsrepr") == repr([job_id]):
                        return str(message.headers["id"])
            finally:
                for message in seen:
                    message.requeue()
            time.sleep(0.1)
    raise AssertionError(f"no message of {job_id} on {queue} within {timeout} s")


def test_a_failed_job_is_a_failed_task_with_its_error_code_and_found_by_its_job_id(
    platform: Platform, images: ImageServer, flower: FlowerView
) -> None:
    refused = platform.submit(ALICE, "upscale", {"image_url": images.url("text")}).json()["job_id"]
    crashed = platform.submit(ALICE, "debug_sleep", {"seconds": 0, "crash": "raise"}).json()["job_id"]
    fine = platform.submit(ALICE, "upscale", {"image_url": images.url("img/astronaut.png")}).json()["job_id"]
    assert platform.wait(ALICE, refused)["error"]["code"] == "input_not_image"
    assert platform.wait(ALICE, crashed)["error"]["code"] == "engine_error"
    assert platform.wait(ALICE, fine)["status"] == "succeeded"
    failed_prepare = flower.wait_for(refused, "task-failed")
    failed_run = flower.wait_for(crashed, "task-failed")
    flower.wait_for(fine, "task-succeeded")
    time.sleep(0.5)  # a stray redelivery or retry would show up here
    state = flower.state()

    # The prepare task that refused the input, and the run whose engine crashed: FAILURE, with the
    # job's error code where Flower shows the exception.
    prepare, run = state.tasks[failed_prepare["uuid"]], state.tasks[failed_run["uuid"]]
    assert (prepare.name, prepare.state) == (PREPARE, "FAILURE")
    assert (run.name, run.state) == (RUN, "FAILURE")
    assert re.match(r"""JobFailed\(['"]input_not_image: """, prepare.exception), prepare.exception
    assert re.match(r"""JobFailed\(['"]engine_error: """, run.exception), run.exception
    # Flower's dashboard counts them as failed; the prepare that handed its job on, and the run
    # that succeeded, as succeeded.
    failures = sum(counts["task-failed"] for counts in state.counter.values())
    assert failures == 2
    assert [e["type"] for e in flower.of_job(fine) if e["type"] in ("task-failed", "task-succeeded")] == [
        "task-succeeded",
        "task-succeeded",
    ]
    # Once each: acked like any failure, never retried or redelivered.
    assert len(flower.of_job(crashed, "task-received")) == 1
    assert platform.job(ALICE, crashed)["attempts"] == 1
    # Expected by Celery: one INFO line, no traceback of a crash.
    lines = (platform.logs / "gpu.log").read_text().splitlines()
    [line] = [json.loads(text) for text in lines if f"{crashed}.run." in text and "JobFailed" in text]
    assert (line["level"], "exc" in line) == ("info", False)
    assert re.search(r"""raised expected: JobFailed\(['"]engine_error: """, line["msg"]), line
    # Flower's search box finds a job's tasks by its id (the task id starts with it, args hold it).
    found = state.search_engine.search(state.tasks, fine).task_ids
    assert found and all(task_id.startswith(f"{fine}.") for task_id in found)
    assert {state.tasks[task_id].name for task_id in found} == {PREPARE, RUN}
    assert state.search_engine.search(state.tasks, f"state:FAILURE {crashed}").task_ids == [
        failed_run["uuid"]
    ]


def test_terminating_a_running_jobs_task_cancels_the_job_and_nothing_runs_it_again(
    platform: Platform, app: Celery, flower: FlowerView
) -> None:
    job_id = platform.submit(ALICE, "debug_sleep", {"seconds": 30}).json()["job_id"]
    platform.wait(ALICE, job_id, {"running"})
    started = flower.wait_for(job_id, "task-started")
    assert started["uuid"].startswith(f"{job_id}.run.")

    app.control.revoke(started["uuid"], terminate=True)  # Flower's Terminate button

    job = platform.wait(ALICE, job_id, timeout=10)
    assert job["status"] == "cancelled" and job["error"]["code"] == "revoked_by_operator", job
    assert job["duration"] < 15
    revoked = flower.wait_for(job_id, "task-revoked")
    assert revoked["uuid"] == started["uuid"] and revoked["terminated"] is True
    # The sweep (as beat runs it) neither re-publishes nor recovers it, and the broker does not
    # hand the message out again: the job stays cancelled, its task never received twice.
    rt = Runtime(platform.settings, app)
    try:
        sweep(rt, app)
        assert job_id not in [row[0] for row in rt.store.stuck_jobs(0, utcnow())]
    finally:
        rt.db.dispose()
    time.sleep(1.5)
    again = platform.job(ALICE, job_id)
    assert (again["status"], again["error"]["code"], again["attempts"]) == (
        "cancelled",
        "revoked_by_operator",
        1,
    )
    assert len(flower.of_job(job_id, "task-received")) == 1
    assert flower.state().tasks[started["uuid"]].state == "REVOKED"
    # The worker replaced its killed pool process and goes on with the next job.
    follow = platform.submit(ALICE, "debug_sleep", {"seconds": 0.1}).json()["job_id"]
    assert platform.wait(ALICE, follow, timeout=30)["status"] == "succeeded"


def test_revoking_a_queued_jobs_task_cancels_the_job_which_never_runs(
    platform: Platform, app: Celery, flower: FlowerView
) -> None:
    busy = platform.submit(ALICE, "debug_sleep", {"seconds": 3}).json()["job_id"]
    platform.wait(ALICE, busy, {"running"})
    # The one gpu worker slot is taken: this job's message waits on its queue.
    waiting = platform.submit(ALICE, "debug_sleep", {"seconds": 0.2}).json()["job_id"]
    task_id = queued_task_id(platform.settings, "gpu.diffusion", waiting)
    assert task_id.startswith(f"{waiting}.run.")

    app.control.revoke(task_id)  # Flower's Revoke button, or celery control revoke

    assert platform.wait(ALICE, busy, timeout=15)["status"] == "succeeded"
    job = platform.wait(ALICE, waiting, timeout=15)
    assert job["status"] == "cancelled" and job["error"]["code"] == "revoked_by_operator", job
    assert job["started_at"] is None and job["attempts"] == 0  # it never ran
    revoked = flower.wait_for(waiting, "task-revoked")
    assert revoked["uuid"] == task_id and revoked["terminated"] is False
    assert not flower.of_job(waiting, "task-started")
    assert flower.state().tasks[task_id].state == "REVOKED"


def test_revoking_a_running_jobs_task_without_terminate_stops_the_job_at_its_next_step(
    platform: Platform, app: Celery, flower: FlowerView
) -> None:
    job_id = platform.submit(ALICE, "debug_sleep", {"seconds": 30}).json()["job_id"]
    platform.wait(ALICE, job_id, {"running"})
    started = flower.wait_for(job_id, "task-started")

    app.control.revoke(started["uuid"])  # no terminate: the run stops itself

    job = platform.wait(ALICE, job_id, timeout=10)
    assert job["status"] == "cancelled" and job["error"]["code"] == "revoked_by_operator", job
    # The run saw its job end at the next step and returned (its finish was fenced off): the slot
    # is free again at once, long before the 30 s the job asked for.
    flower.wait_for(job_id, "task-succeeded", timeout=10)
    follow = platform.submit(ALICE, "debug_sleep", {"seconds": 0.1}).json()["job_id"]
    assert platform.wait(ALICE, follow, timeout=15)["status"] == "succeeded"
    assert platform.job(ALICE, job_id)["error"]["code"] == "revoked_by_operator"
