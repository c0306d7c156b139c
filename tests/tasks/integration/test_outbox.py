"""Crash safety of the event log: a worker SIGKILLed after a move's commit and before its event was
dispatched loses no webhook, and the webhook goes out exactly once per ``webhook-id``.

The platform runs with ``AIORCH_DEBUG_CRASH_BEFORE_DISPATCH=job.finished``: a worker process that
commits a ``job.finished`` move kills itself (SIGKILL, no cleanup) before kicking the dispatcher.
It has a database of its own, so the sweep it runs sees only this module's jobs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from config import Settings
from models.db import Database
from models.jobs import JobEvent, WebhookDelivery
from models.migrate import upgrade
from tasks.celery_app import DISPATCH, create_celery, publish
from tasks.runtime import Runtime
from tasks.sweeps import sweep
from tasks.webhooks import finished_event_id
from tests.conftest import KEYS, RUN_ID, _pg_admin
from tests.support.platform import Platform
from tests.support.platform_fixtures import platform_settings, running_platform
from tests.support.servers import WebhookReceiver

ALICE = KEYS[0][1]


@pytest.fixture(scope="module")
def crashing(
    base_settings: Settings, worker_amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    name = f"aiorch_t_{RUN_ID}_outbox"
    _pg_admin(f"CREATE DATABASE {name}")
    try:
        tmp = tmp_path_factory.mktemp("outbox")
        settings = platform_settings(
            base_settings,
            tmp,
            broker_url=worker_amqp_url,
            database_url=f"postgresql://postgres@127.0.0.1:5432/{name}",
            debug_crash_before_dispatch="job.finished",
        )
        db = Database(settings)
        upgrade(db)
        db.dispose()
        with running_platform(settings, tmp) as plat:
            yield plat
    finally:
        _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_a_worker_killed_between_the_finish_commit_and_the_dispatch_loses_no_webhook_and_sends_it_once(
    crashing: Platform,
) -> None:
    receiver = WebhookReceiver().start()
    db = Database(crashing.settings)
    try:
        job_id = crashing.submit(ALICE, "debug_sleep", {"seconds": 0.2}, webhook_url=receiver.url).json()[
            "job_id"
        ]
        job = crashing.wait(ALICE, job_id, timeout=40)
        assert job["status"] == "succeeded", job
        # The finish is committed and its event logged, pending: the kick never went out.
        time.sleep(1.5)
        assert receiver.received == []
        with db.session() as session:
            pending = list(
                session.scalars(
                    select(JobEvent.type).where(JobEvent.job_id == job_id, JobEvent.dispatched_at.is_(None))
                )
            )
        assert pending == ["job.finished"]
        # The kill really happened. The pool logs it when it reaps the child: at once, or at its
        # next maintenance tick (every 5 s) when the child's exit went unnoticed until then.
        deadline = time.monotonic() + 10
        while "signal 9" not in crashing.log("gpu") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "signal 9" in crashing.log("gpu")

        # The sweep dispatches what the dead worker left; the cpu worker delivers it.
        settings = crashing.settings.with_overrides(republish_after=0.5)
        report = sweep(Runtime(settings), create_celery(settings))
        assert report["events_dispatched"] == 1
        [hit] = receiver.wait_for(1, timeout=20)
        assert hit.headers["webhook-id"] == finished_event_id(job_id)
        assert hit.json()["job_id"] == job_id and hit.json()["status"] == "succeeded"

        # A late kick and another sweep find nothing left to send.
        publish(create_celery(crashing.settings), DISPATCH, job_id, "cpu")
        assert sweep(Runtime(settings), create_celery(settings))["events_dispatched"] == 0
        time.sleep(2.0)
        ids = [h.headers["webhook-id"] for h in receiver.received]
        assert ids == [finished_event_id(job_id)]
        with db.session() as session:
            attempts = list(
                session.scalars(select(WebhookDelivery.ok).where(WebhookDelivery.job_id == job_id))
            )
        assert attempts == [True]

        # The pool replaced its dead child: the worker goes on serving.
        follow = crashing.submit(ALICE, "debug_sleep", {"seconds": 0.1}).json()["job_id"]
        assert crashing.wait(ALICE, follow, timeout=40)["status"] == "succeeded"
    finally:
        receiver.stop()
        db.dispose()
