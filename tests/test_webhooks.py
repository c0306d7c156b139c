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
from models.jobs import WebhookDelivery
from tasks.celery_app import create_celery
from tasks.jobs import Runtime
from tasks.webhooks import (
    DELIVER,
    ReceiverBreaker,
    finished_event_id,
    lost_finishes,
    sign,
)
from tests.support.factories import make_job


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
    finished = utcnow() - timedelta(seconds=finished_ago)
    return make_job(
        db,
        status="succeeded",
        stage="done",
        webhook_url=webhook,
        **{f"{stamp}_at": finished for stamp in ("created", "queued", "started", "finished", "updated")},
    )


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


class _Redirecting:
    """A real receiver on 127.0.0.1 whose /hook answers 302 to /elsewhere; counts both paths."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.hits: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                owner.hits.append(self.path)
                self.send_response(302 if self.path == "/hook" else 200)
                self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_redirect_is_a_failed_attempt_and_is_not_followed(settings: Settings) -> None:
    from tasks.webhooks import send

    receiver = _Redirecting()
    runtime = Runtime(settings)
    try:
        ok, status, error, _ = send(runtime, receiver.url, "e" * 32, "{}")
        assert (ok, status, error) == (False, 302, None)
        assert receiver.hits == ["/hook"]
    finally:
        receiver.stop()
        runtime.db.dispose()


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/hook", "http://localhost:9/hook", "http://169.254.169.254/"]
)
def test_a_webhook_to_a_private_address_is_refused_without_a_connection(settings: Settings, url: str) -> None:
    from tasks.webhooks import send

    runtime = Runtime(settings.with_overrides(allow_private_urls=False))
    try:
        ok, status, error, elapsed = send(runtime, url, "e" * 32, "{}")
        assert not ok and status is None and error.startswith("refused")
        assert elapsed < 1.0
    finally:
        runtime.db.dispose()


def test_retry_delays_double_from_the_base_with_jitter_and_cap_at_an_hour() -> None:
    import random

    from tasks.webhooks import MAX_ATTEMPTS, retry_delay

    rng = random.Random(7)
    delays = [retry_delay(n, base=10.0, rng=rng) for n in range(1, MAX_ATTEMPTS)]
    assert 8 <= delays[0] <= 12  # the first retry comes well within a minute
    for n, delay in enumerate(delays, start=1):
        nominal = min(3600.0, 10.0 * 2 ** (n - 1))
        assert 0.8 * nominal <= delay <= 1.2 * nominal
    assert sum(delays) > 5 * 3600  # retried over hours (about six and a half), not minutes
