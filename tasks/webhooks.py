"""Webhook delivery on the cpu queue: the seed 000 body, Standard Webhooks signatures, retries.

Webhooks are fed by the jobs' event log through one dispatcher (``tasks.events``), which hands
each pending event to ``deliver_webhook``; no other code path sends a job's webhook (but a manual
``redeliver``).

Each event's body is composed once, when the event is dispatched, and stored (``WebhookEvent``):
every attempt, retry and redelivery sends those exact bytes, and the delivery task's arguments
are ids only (job, event, attempt). No tenant's body, with its result URLs, ever travels through
the broker or shows in Flower; the receiver's URL is read from the job at each attempt.

Every delivery is signed with the secrets of the job's client (``models.webhook_secrets``): its
current secret, and for the grace period after a rotation its previous one too, as a second
signature in the same header (``v1,<new> v1,<old>``), which Standard Webhooks verifiers accept
when either matches. No client holds a key that signs another client's events.

A delivery attempt has a short timeout and runs on the cpu queue, so a slow or dead receiver
never holds a GPU slot. Failures retry with exponential backoff and jitter for hours: short waits
ride on a Celery countdown, longer ones are parked in the database (``next_retry_at``) and sent by
the periodic sweep, because RabbitMQ drops a consumer that holds an unacked message for too long.
A receiver address the SSRF guard refuses is final: recorded once, never retried (the address
will not become public by waiting).

A receiver that keeps timing out would otherwise eat the cpu slots other clients' webhooks need,
one timeout each. So every worker process keeps a small circuit breaker per receiver (scheme, host
and port): after ``BREAKER_FAILURES`` network failures in a row the circuit opens for
``BREAKER_OPEN_SECONDS``, and deliveries to that receiver are put back with a countdown without
being sent (and without using up an attempt); the first one after that is the probe.

``job.finished`` has one event id per job, derived from the job id, and every other event one
derived from its place in the log, so a dispatch repeated after a crash, a sweep that re-sends a
lost one and a manual redelivery all carry the same ``webhook-id`` (and the same stored body) and
a receiver can drop duplicates.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import urllib3
from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import exists, select

from config import Settings
from models import counters
from models.db import Database, insert_or_ignore, utcnow
from models.jobs import Job, WebhookDelivery, WebhookEvent
from models.jobstore import new_id
from models.public import iso, job_object
from models.webhook_secrets import WebhookSecrets, signing_key
from tasks.celery_app import DELIVER, publish
from tasks.outbound import PrivateAddressError, describe_network_error, http_pool
from tasks.runtime import JobTask, Runtime

log = logging.getLogger("aiorch.webhooks")

MAX_ATTEMPTS = 15  # 10 s doubling to an hour between tries: about six and a half hours in all
MAX_DELAY = 3600.0
COUNTDOWN_LIMIT = 60.0  # longer waits are parked in the database for the sweep
FINISHED = "job.finished"
BREAKER_FAILURES = 2  # network failures in a row that open a receiver's circuit
BREAKER_OPEN_SECONDS = 30.0
MAX_DEFERRALS = 240  # about two hours of an open circuit before the event is given up

# One pool per worker process and settings object (Settings holds dicts, so it is not hashable:
# keyed by identity, the object kept alongside so its id cannot be reused by another).
_pools: dict[int, tuple[Settings, urllib3.PoolManager]] = {}


@dataclass
class _Circuit:
    failures: int = 0
    open_until: float = 0.0


class ReceiverBreaker:
    """Per-process circuit breaker keyed by receiver origin (scheme://host:port)."""

    def __init__(self, failures: int = BREAKER_FAILURES, open_seconds: float = BREAKER_OPEN_SECONDS) -> None:
        self.failures = failures
        self.open_seconds = open_seconds
        self._circuits: dict[str, _Circuit] = {}
        self._lock = threading.Lock()

    @staticmethod
    def origin(url: str) -> str:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}"

    def open_for(self, url: str, now: float | None = None) -> float:
        """Seconds the circuit of ``url``'s receiver stays open; 0 when a delivery may go."""
        with self._lock:
            circuit = self._circuits.get(self.origin(url))
            if circuit is None:
                return 0.0
            return max(0.0, circuit.open_until - (time.monotonic() if now is None else now))

    def record(self, url: str, network_failure: bool, now: float | None = None) -> None:
        """An answer of any status closes the circuit: the receiver is reachable."""
        with self._lock:
            key = self.origin(url)
            if not network_failure:
                self._circuits.pop(key, None)
                return
            circuit = self._circuits.setdefault(key, _Circuit())
            circuit.failures += 1
            if circuit.failures >= self.failures:
                circuit.open_until = (time.monotonic() if now is None else now) + self.open_seconds


breaker = ReceiverBreaker()


class Attempt(NamedTuple):
    """What one POST came to. ``refused``: the SSRF guard refused the receiver's address, which
    no retry can change."""

    ok: bool
    status_code: int | None
    error: str | None
    elapsed: float
    refused: bool = False


def finished_event_id(job_id: str) -> str:
    """The one event id of a job's ``job.finished``: 32 hex, stable across re-sends."""
    return hashlib.sha256(f"{job_id}:{FINISHED}".encode()).hexdigest()[:32]


def retry_delay(attempt: int, base: float = 10.0, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): doubling, +-20 % jitter."""
    delay = min(MAX_DELAY, base * 2 ** (attempt - 1))
    return delay * (rng or random).uniform(0.8, 1.2)


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    message = f"{event_id}.{timestamp}.".encode() + body
    digest = hmac.new(signing_key(secret), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(secrets: list[str], event_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<sig> v1,<sig>``: one signature per secret, space-separated, as Standard Webhooks
    lays out several; a verifier accepts the delivery when any of them matches its secret."""
    return " ".join(sign(secret, event_id, timestamp, body) for secret in secrets)


def event_body(job: Job, event: str, event_id: str) -> dict[str, Any]:
    body = {"event": event, "event_id": event_id, "ts": iso(utcnow()), **job_object(job)}
    body["predictTime"] = job.predict_time  # seed 000 repeats predict_time under this name
    return body


def _compose(job: Job, event: str, event_id: str) -> str:
    return json.dumps(event_body(job, event, event_id), separators=(",", ":"))


def _store_event(db: Database, job_id: str, event_id: str, event: str, body: str) -> None:
    """Keep an event's body for all its attempts. A second store of the same event (a re-sent
    ``job.finished``) keeps the first body, so every send of one event id is byte for byte the
    same."""
    with db.writing() as session:
        values = {
            "event_id": event_id,
            "job_id": job_id,
            "event": event,
            "body": body,
            "created_at": utcnow(),
        }
        insert_or_ignore(session, WebhookEvent, values)


def schedule_event(db: Database, app: Any, job: Job, event: str = FINISHED, now: bool = False) -> None:
    """Store one event composed from the job's row and queue its delivery: the way of a job that
    ended before its moves were logged (``tasks.events.finish_job``). ``job.started`` and ``job.progress`` go
    only to jobs that opted in with ``webhook_events``; ``job.finished`` goes to every job with a
    webhook_url.

    ``now``: make the first attempt in this process instead of queueing it, for callers that
    already run on the cpu queue. Retries are queued as usual."""
    if not job.webhook_url:
        return
    if event != FINISHED and event not in (job.webhook_events or ()):
        return
    event_id = finished_event_id(job.id) if event == FINISHED else new_id()
    # Stored (and committed) before the message that names it is published.
    _store_event(db, job.id, event_id, event, _compose(job, event, event_id))
    if now:
        deliver_webhook(job.id, event_id)  # a direct call runs the task body here, synchronously
        return
    publish(app, DELIVER, job.id, "cpu", task_kwargs={"event_id": event_id, "attempt": 1})


@shared_task(bind=True, base=JobTask, name=DELIVER, queue="cpu", soft_time_limit=30, time_limit=45)
def deliver_webhook(
    self: JobTask,
    job_id: str,
    event_id: str,
    attempt: int = 1,
    manual: bool = False,
    deferrals: int = 0,
    **published_before_upgrade: Any,
) -> None:
    """Send one stored event to the job's webhook_url (both read now, by id)."""
    rt = self.runtime
    with rt.db.session() as session:
        job = session.execute(select(Job.webhook_url, Job.client_id).where(Job.id == job_id)).first()
        stored = session.get(WebhookEvent, event_id)
        # A second first attempt of one event (a redelivered finish message, or the sweep
        # re-sending a finish it thought lost) joins the chain already under way.
        duplicate = (
            attempt == 1
            and not manual
            and session.scalar(select(exists().where(WebhookDelivery.event_id == event_id)))
        )
    if job is None or not job.webhook_url or duplicate:
        return  # the job was deleted meanwhile, or this event is already being delivered
    url, client_id = job.webhook_url, job.client_id
    if stored is None:
        stored = _adopt_legacy_message(rt.db, job_id, event_id, published_before_upgrade)
        if stored is None:
            log.warning("webhook event %s of %s has no stored body; not sent", event_id, job_id)
            return
    ids = {"event_id": event_id, "attempt": attempt, "manual": manual}
    wait = breaker.open_for(url)
    if wait and deferrals < MAX_DEFERRALS:
        # The receiver has just failed several times in a row: don't spend a slot (and an
        # attempt) on it now; come back when its circuit half-opens.
        publish(
            self.app,
            DELIVER,
            job_id,
            "cpu",
            countdown=wait + random.uniform(0, 2),
            task_kwargs={**ids, "deferrals": deferrals + 1},
        )
        return
    secrets = WebhookSecrets(rt.db, rt.settings).signing_secrets(client_id)
    result = send(rt, url, event_id, stored.body, secrets)
    if not result.refused:
        breaker.record(url, network_failure=result.status_code is None)
    final = result.ok or result.refused or attempt >= MAX_ATTEMPTS
    delay = None if final else retry_delay(attempt, rt.settings.webhook_retry_base)
    with rt.db.session() as session:
        row = WebhookDelivery(
            job_id=job_id,
            event_id=event_id,
            event=stored.event,
            attempt=attempt,
            url=url,
            status_code=result.status_code,
            error=result.error,
            duration_ms=round(result.elapsed * 1000, 2),
            ok=result.ok,
            next_retry_at=utcnow() + timedelta(seconds=delay) if delay and delay > COUNTDOWN_LIMIT else None,
        )
        session.add(row)
        counters.count_webhook_attempt(session, result.ok)  # /metrics, with the row or not at all
    if result.ok:
        return
    log.info("webhook attempt %d for %s failed: %s", attempt, job_id, result.error or result.status_code)
    if delay is not None and delay <= COUNTDOWN_LIMIT:
        try:
            publish(
                self.app,
                DELIVER,
                job_id,
                "cpu",
                countdown=delay,
                task_kwargs={**ids, "attempt": attempt + 1},
            )
        except Exception:
            # The broker is away: park the retry so the sweep sends it instead of losing it.
            log.warning("webhook retry for %s parked: broker unavailable", job_id)
            with rt.db.session() as session:
                parked = session.get(WebhookDelivery, row.id)
                if parked is not None:
                    parked.next_retry_at = utcnow() + timedelta(seconds=delay)


def _adopt_legacy_message(
    db: Database, job_id: str, event_id: str, legacy: dict[str, Any]
) -> WebhookEvent | None:
    """A delivery message published before events were stored carried ``event`` and ``body``;
    store them as the event, so that message and its retries still send the same bytes."""
    event, body = legacy.get("event"), legacy.get("body")
    if not (isinstance(event, str) and isinstance(body, str)):
        return None
    _store_event(db, job_id, event_id, event, body)
    with db.session() as session:
        return session.get(WebhookEvent, event_id)


def _pool(settings: Settings) -> urllib3.PoolManager:
    entry = _pools.get(id(settings))
    if entry is None or entry[0] is not settings:
        entry = _pools[id(settings)] = (settings, http_pool(settings))
    return entry[1]


def _refusal(exc: Exception) -> str:
    """``refused: <why>``; the guard's message says why without naming any resolved address."""
    message = str(exc)
    return message if message.startswith("refused:") else f"refused: {message}"


def _network_error(exc: BaseException) -> str:
    """``network error: <what happened>``, in words (never a class name or a connection's repr):
    the text is shown to the job's owner by ``GET /v1/jobs/{id}/deliveries``."""
    return f"network error: {describe_network_error(exc)}"


def send(rt: Runtime, url: str, event_id: str, body: str, secrets: list[str]) -> Attempt:
    """One POST signed with ``secrets``; redirects are not followed."""
    raw = body.encode()
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "aiorch-webhooks/1",
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(secrets, event_id, timestamp, raw),
    }
    started = time.monotonic()
    timeout = urllib3.Timeout(connect=min(3.0, rt.settings.webhook_timeout), read=rt.settings.webhook_timeout)
    try:
        response = _pool(rt.settings).request(
            "POST", url, body=raw, headers=headers, redirect=False, timeout=timeout, preload_content=True
        )
    except SoftTimeLimitExceeded:
        # A receiver dripping its answer byte by byte outlives every read timeout; the task's
        # soft limit ends the attempt, which is then recorded and retried like a timeout.
        return Attempt(False, None, "network error: timed out (answer too slow)", time.monotonic() - started)
    except urllib3.exceptions.MaxRetryError as exc:
        reason = exc.reason if exc.reason is not None else exc
        if isinstance(reason, PrivateAddressError):
            return Attempt(False, None, _refusal(reason), time.monotonic() - started, refused=True)
        return Attempt(False, None, _network_error(reason), time.monotonic() - started)
    except PrivateAddressError as exc:
        return Attempt(False, None, _refusal(exc), time.monotonic() - started, refused=True)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        return Attempt(False, None, _network_error(exc), time.monotonic() - started)
    return Attempt(200 <= response.status < 300, response.status, None, time.monotonic() - started)


def due_deliveries(rt: Runtime, app: Any) -> int:
    """Sweep: publish the parked retries whose time has come (each only once)."""
    sent = 0
    with rt.db.session() as session:
        rows = list(
            session.scalars(
                select(WebhookDelivery).where(WebhookDelivery.next_retry_at < utcnow()).limit(500)
            )
        )
        for row in rows:
            if row.request_body:
                # Parked before events were stored, its body only on the attempt's row: stored
                # as the event, and committed before the message that will read it goes out.
                values = {"event_id": row.event_id, "job_id": row.job_id, "event": row.event}
                insert_or_ignore(
                    session, WebhookEvent, {**values, "body": row.request_body, "created_at": utcnow()}
                )
                session.commit()
            publish(
                app,
                DELIVER,
                row.job_id,
                "cpu",
                task_kwargs={"event_id": row.event_id, "attempt": row.attempt + 1},
            )
            row.next_retry_at = None
            sent += 1
    return sent


def redeliver(db: Database, app: Any, job: Job) -> str:
    """Send the job's ``job.finished`` again, byte for byte and with its event id; returns that id."""
    event_id = finished_event_id(job.id)
    with db.session() as session:
        last = session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == job.id, WebhookDelivery.event_id == event_id)
            .order_by(WebhookDelivery.id.desc())
        ).first()
        attempt = last.attempt + 1 if last else 1
        # Normally stored when the job finished; composed now for a job that finished before
        # events were stored (its body then only on its delivery rows) or whose finish was lost.
        body = last.request_body if last and last.request_body else _compose(job, FINISHED, event_id)
    _store_event(db, job.id, event_id, FINISHED, body)
    publish(
        app,
        DELIVER,
        job.id,
        "cpu",
        task_kwargs={"event_id": event_id, "attempt": attempt, "manual": True},
    )
    return event_id
