"""Webhook delivery rules that need no worker: event ids, per-client signing secrets and their
rotation, the circuit breaker, refusals, and what the delivery messages carry. Deliveries run the
real task body against real local receivers; messages are published to the run's real RabbitMQ
vhost (no worker consumes it) and read back off the queue, as Flower would show them."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from celery import Celery
from kombu import Connection
from sqlalchemy import select, update
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from app import create_app
from config import Settings, SettingsError
from models.db import Database, utcnow
from models.jobs import Job, JobEvent, WebhookDelivery, WebhookEvent, WebhookSecret
from models.migrate import upgrade
from models.state import JobStatus
from models.webhook_secrets import WebhookSecrets, derived_secret, signing_key
from tasks.celery_app import DELIVER, create_celery
from tasks.events import dispatch, dispatch_left_over, unattempted_events, webhook_event_id
from tasks.runtime import Runtime
from tasks.webhooks import (
    FINISHED,
    ReceiverBreaker,
    deliver_webhook,
    due_deliveries,
    finished_event_id,
    redeliver,
    schedule_event,
    send,
    sign,
)
from tests.support.factories import make_job
from tests.support.servers import Received, WebhookReceiver

MASTER = "whsec_" + base64.b64encode(bytes(range(32))).decode()
ROOT = Path(__file__).resolve().parents[2]


def new_client() -> str:
    """A client of its own per test: secrets and rotations persist in the run's database."""
    return "c-" + uuid.uuid4().hex[:12]


def headers_of(hit: Received) -> dict[str, str]:
    return {k.lower(): v for k, v in hit.headers.items()}


def verifies(secret: str, hit: Received) -> bool:
    try:
        Webhook(secret).verify(hit.body, headers_of(hit))
    except WebhookVerificationError:
        return False
    return True


@pytest.fixture
def master_settings(settings: Settings) -> Settings:
    return settings.with_overrides(webhook_secret=MASTER)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    rec = WebhookReceiver().start()
    yield rec
    rec.stop()


@pytest.fixture
def worker_app(master_settings: Settings) -> Celery:
    """A cpu worker's Celery app on the master settings. Created last, it is the current app, so
    a direct call of a task runs the task's body here with these settings."""
    return create_celery(master_settings)


def finished_job(db: Database, client: str, url: str) -> Job:
    job_id = make_job(
        db, client_id=client, status="succeeded", stage="done", webhook_url=url, finished_at=utcnow()
    )
    with db.session() as session:
        job = session.get(Job, job_id)
    assert job is not None
    return job


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


def _drain_deliver_messages(app: Celery, broker_url: str) -> list[dict]:
    """Every delivery message on the cpu queue, each with its raw bytes and headers (where
    Flower reads ``argsrepr``/``kwargsrepr``), acked so the next call sees only new ones."""
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
                raw = message.body.decode() if isinstance(message.body, bytes) else str(message.body)
                found.append(
                    {
                        "job_id": args[0],
                        "args": args,
                        "kwargs": kwargs,
                        "raw": raw + json.dumps(message.headers),
                    }
                )
            message.ack()
        queue.close()
    return found


def _finished_through_the_lifecycle(runtime: Runtime, webhook: str | None = "http://127.0.0.1:9/hook") -> str:
    """A job claimed and finished by the store of a runtime without an app: nothing kicks the
    dispatcher, as when the worker died right after the finish's commit."""
    job_id = make_job(runtime.db, webhook_url=webhook)
    claim = runtime.store.claim(job_id, redelivered=False)
    assert runtime.store.finish(claim, JobStatus.SUCCEEDED, result={"ok": True})
    return job_id


def _age_events(db: Database, job_id: str, seconds: float) -> None:
    with db.session() as session:
        session.execute(
            update(JobEvent)
            .where(JobEvent.job_id == job_id)
            .values(created_at=utcnow() - timedelta(seconds=seconds))
        )


def test_the_sweep_dispatches_a_logged_event_whose_kick_was_lost_once(settings: Settings) -> None:
    runtime = Runtime(settings)
    app = create_celery(settings)
    try:
        _drain_deliver_messages(app, settings.broker_url)
        lost = _finished_through_the_lifecycle(runtime)
        fresh = _finished_through_the_lifecycle(runtime)  # its kick may still be in the queue
        silent = _finished_through_the_lifecycle(runtime, webhook=None)
        for job_id in (lost, silent):
            _age_events(runtime.db, job_id, 600)
        assert dispatch_left_over(runtime, app, older_than=30) >= 1
        assert dispatch_left_over(runtime, app, older_than=30) == 0  # taken once
        sent = {m["job_id"]: m for m in _drain_deliver_messages(app, settings.broker_url)}
        assert lost in sent and not {fresh, silent} & set(sent)
        assert sent[lost]["kwargs"] == {"event_id": finished_event_id(lost), "attempt": 1}
        with runtime.db.session() as session:
            stored = session.get(WebhookEvent, finished_event_id(lost))
        assert stored is not None
        body = json.loads(stored.body)
        assert (body["event"], body["job_id"], body["status"], body["progress"]) == (
            FINISHED,
            lost,
            "succeeded",
            100,
        )
        # The late kick of the fresh job finds its event; a second one finds nothing.
        assert dispatch(runtime, app, fresh) == 1 and dispatch(runtime, app, fresh) == 0
    finally:
        runtime.db.dispose()


def test_the_sweep_sends_the_first_attempt_of_a_stored_event_that_never_had_one(settings: Settings) -> None:
    runtime = Runtime(settings)
    app = create_celery(settings)
    try:
        _drain_deliver_messages(app, settings.broker_url)
        stored = {}
        for name in ("lost", "attempted", "fresh"):
            job_id = make_job(
                runtime.db, status="succeeded", stage="done", webhook_url="http://127.0.0.1:9/h"
            )
            event_id = webhook_event_id(job_id, 3, "job.progress")
            created = utcnow() - timedelta(seconds=5 if name == "fresh" else 600)
            with runtime.db.session() as session:
                session.add(
                    WebhookEvent(
                        event_id=event_id, job_id=job_id, event="job.progress", body="{}", created_at=created
                    )
                )
                if name == "attempted":
                    session.add(
                        WebhookDelivery(
                            job_id=job_id,
                            event_id=event_id,
                            event="job.progress",
                            attempt=1,
                            url="x",
                            ok=True,
                        )
                    )
            stored[name] = (job_id, event_id)
        assert unattempted_events(runtime, app) >= 1
        sent = {m["job_id"]: m["kwargs"] for m in _drain_deliver_messages(app, settings.broker_url)}
        lost_job, lost_event = stored["lost"]
        assert sent[lost_job] == {"event_id": lost_event, "attempt": 1}
        assert stored["attempted"][0] not in sent and stored["fresh"][0] not in sent
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
    receiver = _Redirecting()
    runtime = Runtime(settings)
    try:
        attempt = send(runtime, receiver.url, "e" * 32, "{}", [MASTER])
        assert (attempt.ok, attempt.status_code, attempt.error, attempt.refused) == (False, 302, None, False)
        assert receiver.hits == ["/hook"]
    finally:
        receiver.stop()
        runtime.db.dispose()


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/hook", "http://localhost:9/hook", "http://169.254.169.254/"]
)
def test_a_webhook_to_a_private_address_is_refused_without_a_connection(settings: Settings, url: str) -> None:
    runtime = Runtime(settings.with_overrides(allow_private_urls=False, allow_private_networks=()))
    try:
        attempt = send(runtime, url, "e" * 32, "{}", [MASTER])
        assert not attempt.ok and attempt.status_code is None and attempt.refused
        assert attempt.error is not None and attempt.error.startswith("refused")
        assert attempt.elapsed < 1.0
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


# -- per-client secrets ------------------------------------------------------------------------------


def _secret_in_a_new_process(settings: Settings, client: str) -> str:
    """What a freshly started process (a restart, another worker) computes for ``client``."""
    code = (
        "import sys; from config import Settings; from models.db import Database; "
        "from models.webhook_secrets import WebhookSecrets; s = Settings.from_env(); "
        "print(WebhookSecrets(Database(s), s).current(sys.argv[1]))"
    )
    env = {
        **os.environ,
        "AIORCH_DATABASE_URL": settings.database_url,
        "AIORCH_VAR_DIR": str(settings.var_dir),
    }
    if settings.webhook_secret:
        env["AIORCH_WEBHOOK_SECRET"] = settings.webhook_secret
    out = subprocess.run(
        [sys.executable, "-c", code, client], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_a_clients_first_secret_is_derived_from_the_master_alike_in_every_process_and_needs_no_row(
    master_settings: Settings, db: Database
) -> None:
    client = new_client()
    secret = WebhookSecrets(db, master_settings).current(client)
    assert secret == _secret_in_a_new_process(master_settings, client)
    assert secret.startswith("whsec_") and len(signing_key(secret)) == 32
    with db.session() as session:
        assert session.get(WebhookSecret, client) is None
    # The derivation is part of the contract with every receiver already configured: pinned.
    # HMAC-SHA256(master key, "aiorch-webhook:alice"), master key = bytes 0..31.
    assert derived_secret(MASTER, "alice") == "whsec_xbevc35AM2dliLfXAN/sBfDx4hO7eIxktnLk+ybgV1Q="


def test_clients_get_different_secrets_none_of_which_is_or_contains_the_master(
    master_settings: Settings, db: Database
) -> None:
    secrets = WebhookSecrets(db, master_settings)
    alice, bob = secrets.current(new_client()), secrets.current(new_client())
    other_master = derived_secret("whsec_" + base64.b64encode(b"x" * 32).decode(), "alice")
    assert len({alice, bob, MASTER, derived_secret(MASTER, "alice"), other_master}) == 5
    for secret in (alice, bob):
        assert signing_key(MASTER) not in signing_key(secret) and MASTER[6:] not in secret


def test_without_a_master_each_client_gets_one_random_secret_stored_on_first_use(
    settings: Settings, db: Database
) -> None:
    assert settings.webhook_secret is None
    client = new_client()
    answers: list[str] = []

    def first_use() -> None:
        answers.append(WebhookSecrets(db, settings).current(client))

    threads = [threading.Thread(target=first_use) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(answers)) == 1  # racing first uses agree on one stored secret
    assert _secret_in_a_new_process(settings, client) == answers[0]
    assert WebhookSecrets(db, settings).current(new_client()) != answers[0]


def test_the_secret_endpoints_answer_the_callers_secret_and_never_the_master(
    master_settings: Settings,
) -> None:
    alice, bob = new_client(), new_client()
    keys = {alice: {"X-API-Key": "key-" + alice}, bob: {"Authorization": f"Bearer key-{bob}"}}
    app = create_app(master_settings.with_overrides(api_keys=((alice, "key-" + alice), (bob, "key-" + bob))))
    client = app.test_client()
    try:
        answers = {name: client.get("/v1/webhooks/secret", headers=h) for name, h in keys.items()}
        for name, response in answers.items():
            assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
            assert response.get_json() == {"secret": derived_secret(MASTER, name)}
            assert MASTER[6:] not in response.get_data(as_text=True)
        assert answers[alice].get_json() != answers[bob].get_json()
        rotated = client.post("/v1/webhooks/secret/rotate", headers=keys[alice])
        assert rotated.status_code == 200 and MASTER[6:] not in rotated.get_data(as_text=True)
        new = rotated.get_json()["secret"]
        assert new not in (derived_secret(MASTER, alice), MASTER) and len(signing_key(new)) == 32
        assert client.get("/v1/webhooks/secret", headers=keys[alice]).get_json() == {"secret": new}
        assert client.get("/v1/webhooks/secret", headers=keys[bob]).get_json() == answers[bob].get_json()
        for method, path in (("get", "/v1/webhooks/secret"), ("post", "/v1/webhooks/secret/rotate")):
            refused = getattr(client, method)(path)
            assert refused.status_code == 401 and refused.get_json()["error"]["code"] == "unauthorized"
    finally:
        app.extensions["aiorch"].db.dispose()


def test_after_a_rotation_deliveries_verify_with_either_secret_in_the_grace_period_and_the_new_one_after(
    master_settings: Settings, db: Database, receiver: WebhookReceiver, worker_app: Celery
) -> None:
    client = new_client()
    secrets = WebhookSecrets(db, master_settings)
    old = secrets.current(client)
    new = secrets.rotate(client)
    assert secrets.current(client) == new and secrets.signing_secrets(client) == [new, old]
    job = finished_job(db, client, receiver.url)
    schedule_event(db, worker_app, job, now=True)
    [during] = receiver.wait_for(1)
    assert len(headers_of(during)["webhook-signature"].split(" ")) == 2
    assert verifies(new, during) and verifies(old, during)

    with db.session() as session:
        rotated_at = session.get(WebhookSecret, client).rotated_at
    grace = timedelta(seconds=master_settings.webhook_secret_grace)
    assert secrets.signing_secrets(client, rotated_at + grace - timedelta(seconds=1)) == [new, old]
    assert secrets.signing_secrets(client, rotated_at + grace) == [new]
    # The same event sent again by a worker whose grace period is over.
    create_celery(master_settings.with_overrides(webhook_secret_grace=0))
    deliver_webhook(job.id, finished_event_id(job.id), attempt=2)
    after = receiver.wait_for(2)[-1]
    assert len(headers_of(after)["webhook-signature"].split(" ")) == 1
    assert verifies(new, after) and not verifies(old, after)


def test_one_clients_secret_does_not_verify_a_delivery_for_another_clients_job(
    master_settings: Settings, db: Database, receiver: WebhookReceiver, worker_app: Celery
) -> None:
    # The forging finding: bob points his own job's webhook at alice's receiver. Alice's receiver,
    # verifying with her secret, must not accept it.
    alice, bob = new_client(), new_client()
    secrets = WebhookSecrets(db, master_settings)
    for client in (alice, bob):
        schedule_event(db, worker_app, finished_job(db, client, receiver.url), now=True)
    hers, his = receiver.wait_for(2)
    assert hers.json()["job_id"] != his.json()["job_id"]
    assert verifies(secrets.current(alice), hers) and not verifies(secrets.current(alice), his)
    assert verifies(secrets.current(bob), his) and not verifies(secrets.current(bob), hers)
    assert not verifies(MASTER, hers) and not verifies(MASTER, his)


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_racing_rotations_all_succeed_and_each_old_secret_stays_valid_for_the_grace_period(
    backend: str, master_settings: Settings, tmp_path: Path
) -> None:
    settings = master_settings
    if backend == "sqlite":
        settings = master_settings.with_overrides(database_url=f"sqlite:///{tmp_path / 's.db'}")
    db = Database(settings)
    try:
        upgrade(db)
        client = new_client()
        first = WebhookSecrets(db, settings).current(client)
        rotated: list[str] = []

        def rotate() -> None:
            rotated.append(WebhookSecrets(db, settings).rotate(client))

        threads = [threading.Thread(target=rotate) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(set(rotated)) == 8
        with db.session() as session:
            row = session.get(WebhookSecret, client)
        assert row is not None and row.secret in rotated and row.previous_secret in {first, *rotated}
    finally:
        db.dispose()


# -- ids, not bodies -----------------------------------------------------------------------------------


def test_every_delivery_message_carries_ids_only_never_the_body_or_the_url(
    master_settings: Settings, db: Database, worker_app: Celery
) -> None:
    failing = WebhookReceiver(plan=lambda n: 500).start()
    try:
        _drain_deliver_messages(worker_app, master_settings.broker_url)
        job = finished_job(db, new_client(), failing.url)
        schedule_event(db, worker_app, job)  # queued: the first attempt's message
        event_id = finished_event_id(job.id)
        deliver_webhook(job.id, event_id)  # attempt 1 here: fails, publishes attempt 2
        redeliver(db, worker_app, job)  # the API's redeliver
        with db.session() as session:  # a retry parked for the sweep
            session.add(
                WebhookDelivery(
                    job_id=job.id,
                    event_id=event_id,
                    event=FINISHED,
                    attempt=6,
                    url=failing.url,
                    ok=False,
                    next_retry_at=utcnow() - timedelta(seconds=1),
                )
            )
        assert due_deliveries(Runtime(master_settings), worker_app) >= 1
        messages = [
            m
            for m in _drain_deliver_messages(worker_app, master_settings.broker_url)
            if m["job_id"] == job.id
        ]
        assert sorted(m["kwargs"]["attempt"] for m in messages) == [1, 2, 2, 7]
        with db.session() as session:
            body = session.get(WebhookEvent, event_id).body
        for message in messages:
            assert message["args"] == [job.id]
            assert set(message["kwargs"]) <= {"event_id", "attempt", "manual", "deferrals"}
            assert message["kwargs"]["event_id"] == event_id
            for secret in (failing.url, f"127.0.0.1:{failing.port}", '"event":', body):
                assert secret not in message["raw"]
        assert json.loads(body)["job_id"] == job.id and failing.received[0].body == body.encode()
    finally:
        failing.stop()


def test_a_resent_finish_sends_the_body_stored_first_byte_for_byte(
    master_settings: Settings, db: Database, receiver: WebhookReceiver, worker_app: Celery
) -> None:
    job = finished_job(db, new_client(), receiver.url)
    schedule_event(db, worker_app, job, now=True)
    with db.session() as session:
        session.get(Job, job.id).meta = {"changed": "after the first send"}
        job = session.get(Job, job.id)
    schedule_event(db, worker_app, job)  # a re-sent finish stores nothing new ...
    redeliver(db, worker_app, job)
    deliver_webhook(job.id, finished_event_id(job.id), attempt=2, manual=True)  # ... and sends the first body
    first, again = receiver.wait_for(2)
    assert first.body == again.body and first.headers["webhook-id"] == again.headers["webhook-id"]


def test_a_refused_receiver_address_is_recorded_once_and_never_retried(
    master_settings: Settings, db: Database
) -> None:
    guarded = master_settings.with_overrides(allow_private_urls=False, allow_private_networks=())
    app = create_celery(guarded)
    _drain_deliver_messages(app, guarded.broker_url)
    job = finished_job(db, new_client(), "http://127.0.0.1:9/hook")
    schedule_event(db, app, job, now=True)
    with db.session() as session:
        rows = list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job.id)))
    assert [(r.attempt, r.ok, r.next_retry_at) for r in rows] == [(1, False, None)]
    assert (
        rows[0].error is not None
        and rows[0].error.startswith("refused: ")
        and rows[0].error.count("refused") == 1
    )
    assert [m for m in _drain_deliver_messages(app, guarded.broker_url) if m["job_id"] == job.id] == []


def test_a_delivery_message_published_before_events_were_stored_still_sends_its_own_body(
    db: Database, receiver: WebhookReceiver, worker_app: Celery
) -> None:
    job = finished_job(db, new_client(), receiver.url)
    legacy = json.dumps({"event": FINISHED, "job_id": job.id, "old": True})
    deliver_webhook(job.id, finished_event_id(job.id), event=FINISHED, body=legacy, attempt=2)
    [hit] = receiver.wait_for(1)
    assert hit.body == legacy.encode()


def test_a_retry_parked_and_a_job_finished_before_events_were_stored_resend_their_recorded_body(
    master_settings: Settings, db: Database, worker_app: Celery
) -> None:
    job = finished_job(db, new_client(), "http://127.0.0.1:9/hook")
    other = finished_job(db, new_client(), "http://127.0.0.1:9/hook")
    recorded = {job.id: '{"recorded":"parked"}', other.id: '{"recorded":"finished"}'}
    with db.session() as session:  # delivery rows as the previous release wrote them
        for job_id, body in recorded.items():
            session.add(
                WebhookDelivery(
                    job_id=job_id,
                    event_id=finished_event_id(job_id),
                    event=FINISHED,
                    attempt=3,
                    url="http://127.0.0.1:9/hook",
                    ok=False,
                    request_body=body,
                    next_retry_at=utcnow() - timedelta(seconds=1) if job_id == job.id else None,
                )
            )
    _drain_deliver_messages(worker_app, master_settings.broker_url)
    due_deliveries(Runtime(master_settings), worker_app)
    redeliver(db, worker_app, other)
    sent = {m["job_id"]: m["kwargs"] for m in _drain_deliver_messages(worker_app, master_settings.broker_url)}
    assert sent[job.id]["attempt"] == sent[other.id]["attempt"] == 4
    with db.session() as session:
        for job_id, body in recorded.items():
            assert session.get(WebhookEvent, finished_event_id(job_id)).body == body
