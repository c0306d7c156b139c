"""Webhook delivery rules that need no worker: event ids, signing keys, the circuit breaker and the
sweep that re-sends a lost ``job.finished``. The sweep test runs on the run's real Postgres and
publishes to its real RabbitMQ vhost, then reads the published message back off the queue."""

from __future__ import annotations

import base64
import json
import os
from datetime import timedelta

import pytest
from kombu import Connection
from standardwebhooks import Webhook

from config import Settings, SettingsError
from models.db import utcnow
from models.jobs import Job, WebhookDelivery
from models.jobstore import new_id
from tasks.celery_app import create_celery
from tasks.jobs import Runtime
from tasks.webhooks import (
    DELIVER,
    ReceiverBreaker,
    finished_event_id,
    lost_finishes,
    sign,
)


def test_finished_event_id_is_32_hex_and_the_same_for_every_resend_of_one_job() -> None:
    first, again, other = (
        finished_event_id("a" * 32),
        finished_event_id("a" * 32),
        finished_event_id("b" * 32),
    )
    assert first == again != other
    assert len(first) == 32 and int(first, 16) >= 0


@pytest.mark.parametrize("prefix", ["whsec_", ""])
def test_signature_verifies_with_the_standard_webhooks_library_with_or_without_prefix(prefix: str) -> None:
    secret = prefix + base64.b64encode(os.urandom(32)).decode()
    body = b'{"event":"job.finished"}'
    headers = {"webhook-id": "e" * 32, "webhook-timestamp": str(int(utcnow().timestamp()))}
    headers["webhook-signature"] = sign(
        secret, headers["webhook-id"], int(headers["webhook-timestamp"]), body
    )
    assert Webhook(secret).verify(body, headers) == {"event": "job.finished"}


@pytest.mark.parametrize(
    "secret", ["not base64 at all!", "whsec_%%%%", "whsec_" + base64.b64encode(b"short").decode()]
)
def test_a_webhook_secret_no_verifier_could_use_is_refused_at_start_up(secret: str) -> None:
    with pytest.raises(SettingsError, match="AIORCH_WEBHOOK_SECRET"):
        Settings.from_env({"AIORCH_WEBHOOK_SECRET": secret})


def test_breaker_opens_after_repeated_network_failures_per_receiver_and_closes_on_any_answer() -> None:
    breaker = ReceiverBreaker(failures=2, open_seconds=30)
    dead, alive = "http://10.0.0.1:9000/hook", "http://10.0.0.1:9001/hook"
    breaker.record(dead, network_failure=True, now=100.0)
    assert breaker.open_for(dead, now=100.0) == 0  # one failure is not a pattern
    breaker.record(dead, network_failure=True, now=100.0)
    assert breaker.open_for(dead + "?other-path", now=110.0) == pytest.approx(20.0)
    assert breaker.open_for(alive, now=110.0) == 0  # another port is another receiver
    assert breaker.open_for(dead, now=131.0) == 0  # half-open: the next delivery is the probe
    breaker.record(dead, network_failure=False, now=131.0)  # a 500 still proves it is reachable
    breaker.record(dead, network_failure=True, now=132.0)
    assert breaker.open_for(dead, now=132.0) == 0


def _drain_deliver_messages(app, broker_url: str) -> list[dict]:
    found = []
    cpu = next(q for q in app.conf.task_queues if q.name == "cpu")  # declared as the platform does
    with Connection(broker_url) as conn:
        queue = conn.SimpleQueue(cpu)
        while True:
            try:
                message = queue.get(timeout=0.5)
            except queue.Empty:
                break
            if message.headers.get("task") == DELIVER:
                args, kwargs, _ = message.payload
                found.append({"job_id": args[0], **kwargs})
            message.ack()
        queue.close()
    return found


def _final_job(db, finished_ago: float, webhook: str | None = "http://127.0.0.1:9/hook") -> str:
    job_id = new_id()
    finished = utcnow() - timedelta(seconds=finished_ago)
    with db.session() as session:
        session.add(
            Job(
                id=job_id,
                client_id="alice",
                task="upscale",
                engine_task="upscale",
                queue="gpu.superres",
                status="succeeded",
                stage="done",
                payload={},
                webhook_url=webhook,
                created_at=finished,
                queued_at=finished,
                started_at=finished,
                finished_at=finished,
                updated_at=finished,
            )
        )
    return job_id


def test_sweep_resends_the_finish_of_a_final_job_that_never_had_a_delivery(settings: Settings) -> None:
    runtime = Runtime(settings)
    app = create_celery(settings)
    try:
        _drain_deliver_messages(app, settings.broker_url)
        lost = _final_job(runtime.db, finished_ago=600)
        fresh = _final_job(runtime.db, finished_ago=5)  # its finish may still be in the queue
        silent = _final_job(runtime.db, finished_ago=600, webhook=None)
        delivered = _final_job(runtime.db, finished_ago=600)
        with runtime.db.session() as session:
            session.add(
                WebhookDelivery(
                    job_id=delivered,
                    event_id=finished_event_id(delivered),
                    event="job.finished",
                    attempt=1,
                    url="http://127.0.0.1:9/hook",
                    ok=True,
                )
            )
        assert lost_finishes(runtime, app) >= 1
        sent = {m["job_id"]: m for m in _drain_deliver_messages(app, settings.broker_url)}
        assert lost in sent and not {fresh, silent, delivered} & set(sent)
        assert sent[lost]["event_id"] == finished_event_id(lost) and sent[lost]["attempt"] == 1
        assert json.loads(sent[lost]["body"])["job_id"] == lost
    finally:
        runtime.db.dispose()
