"""Fault tests: dead workers, poison jobs, a dead broker at submit, and lost messages."""

from __future__ import annotations

import time

import requests
from sqlalchemy import select

from app import create_app
from config import Settings
from models.db import Database, utcnow
from models.jobs import Job
from models.jobstore import new_id
from tasks.celery_app import create_celery
from tasks.runtime import Runtime
from tasks.sweeps import sweep
from tests.conftest import KEYS
from tests.support.factories import make_job
from tests.support.platform import Platform
from tests.support.servers import ImageServer
from tests.support.services import fresh_database

ALICE = KEYS[0][1]


def test_sigkilled_worker_job_is_redelivered_and_succeeds_once_with_two_attempts(platform: Platform) -> None:
    job_id = platform.submit(ALICE, "debug_sleep", {"seconds": 3}).json()["job_id"]
    platform.wait(ALICE, job_id, {"running"})
    platform.kill("gpu")  # SIGKILL to the worker and its pool: the broker connection drops
    assert platform.job(ALICE, job_id)["status"] == "running"
    platform.start_worker("gpu", "gpu.diffusion,gpu.superres,gpu.faceswap,gpu.vision", 1)
    job = platform.wait(ALICE, job_id, timeout=40)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    assert job["result"]["attempt"] == 2  # the result was written by the second run, once


def test_a_job_that_kills_its_worker_every_time_fails_after_the_attempt_limit(platform: Platform) -> None:
    job_id = platform.submit(ALICE, "debug_sleep", {"seconds": 0.1, "crash": "always"}).json()["job_id"]
    job = platform.wait(ALICE, job_id, timeout=60)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "worker_lost"
    assert job["attempts"] == platform.settings.max_attempts
    # The worker pool replaced its dead child and goes on serving.
    follow = platform.submit(ALICE, "debug_sleep", {"seconds": 0.1}).json()["job_id"]
    assert platform.wait(ALICE, follow)["status"] == "succeeded"


def test_a_crash_on_the_first_attempt_only_succeeds_on_the_second(platform: Platform) -> None:
    job_id = platform.submit(ALICE, "debug_sleep", {"seconds": 0.1, "crash": "first"}).json()["job_id"]
    job = platform.wait(ALICE, job_id, timeout=40)
    assert job["status"] == "succeeded" and job["attempts"] == 2


def test_broker_unreachable_at_submit_is_503_with_retry_after_and_no_job_is_kept(
    settings: Settings, astronaut_png
) -> None:
    # A database of its own, where nobody waits, and room for the job: it is published at once (a
    # job that waits for its turn is not sent at submit, so a broker that is down refuses nothing
    # then; it is sent when its turn comes).
    settings = settings.with_overrides(database_url=fresh_database(settings))
    dead = settings.with_overrides(broker_url="amqp://guest:guest@127.0.0.1:1//", dispatch_ahead=100_000)
    app = create_app(dead, create_celery(dead))
    client = app.test_client()
    key = {"X-API-Key": ALICE}
    marker = new_id()
    response = client.post(
        "/v1/jobs",
        headers=key,
        json={
            "task": "upscale",
            "payload": {"image_url": "http://example.com/a.png"},
            "metadata": {"m": marker},
        },
    )
    assert response.status_code == 503
    assert response.headers["Retry-After"].isdigit()
    assert response.get_json()["error"]["code"] == "broker_unavailable"
    db = Database(settings)
    with db.session() as session:
        kept = [
            j
            for j in session.scalars(select(Job).where(Job.client_id == "alice"))
            if j.meta.get("m") == marker
        ]
    assert kept == []  # the client was told 503, so nothing half-accepted lingers


def test_sweep_republishes_an_accepted_job_whose_message_was_lost(
    platform: Platform, images: ImageServer
) -> None:
    settings = platform.settings.with_overrides(republish_after=0.5)
    runtime = Runtime(settings)
    # As if the API had died between COMMIT and publish (the job was marked sent: it had a slot).
    payload = {"image_url": images.url("img/astronaut.png")}
    job_id = make_job(runtime.db, stage="prepare", payload=payload, dispatched_at=utcnow())
    time.sleep(0.6)
    report = sweep(runtime, create_celery(settings))
    assert report["republished"] >= 1
    job = platform.wait(ALICE, job_id)
    assert job["status"] == "succeeded"


def test_a_stuck_job_of_a_task_no_longer_installed_fails_and_the_sweep_goes_on(
    platform: Platform, images: ImageServer
) -> None:
    settings = platform.settings.with_overrides(republish_after=0.5)
    runtime = Runtime(settings)
    sent = utcnow()
    gone = make_job(
        runtime.db, stage="prepare", task="retired_task", engine_task="retired_task", dispatched_at=sent
    )
    payload = {"image_url": images.url("img/astronaut.png")}
    lost = make_job(runtime.db, stage="prepare", payload=payload, dispatched_at=sent)
    time.sleep(0.6)
    report = sweep(runtime, create_celery(settings))
    assert report["republished"] >= 1
    failed = platform.job(ALICE, gone)
    assert failed["status"] == "failed" and failed["error"]["code"] == "task_not_installed"
    assert failed["error"]["details"] == {"field": "task"}
    assert platform.wait(ALICE, lost)["status"] == "succeeded"


def test_expired_queued_jobs_end_expired(platform: Platform) -> None:
    settings = platform.settings.with_overrides(job_ttl=1.0)
    runtime = Runtime(settings)
    old = utcnow()
    job_id = make_job(runtime.db, stage="prepare", dispatched_at=old)
    time.sleep(1.1)
    sweep(runtime, create_celery(settings))
    job = platform.job(ALICE, job_id)
    assert job["status"] == "expired" and job["error"]["code"] == "expired"
    assert (
        requests.post(
            f"{platform.base_url}/v1/jobs/{job_id}/cancel", headers={"X-API-Key": ALICE}, timeout=5
        ).status_code
        == 409
    )
