"""Webhook delivery on the cpu queue: the seed 000 body, Standard Webhooks signatures, retries.

A delivery attempt has a short timeout and runs on the cpu queue, so a slow or dead receiver
never holds a GPU slot. Failures retry with exponential backoff and jitter for hours: short waits
ride on a Celery countdown, longer ones are parked in the database (``next_retry_at``) and sent by
the periodic sweep, because RabbitMQ drops a consumer that holds an unacked message for too long.

A receiver that keeps timing out would otherwise eat the cpu slots other clients' webhooks need,
one timeout each. So every worker process keeps a small circuit breaker per receiver (scheme, host
and port): after ``BREAKER_FAILURES`` network failures in a row the circuit opens for
``BREAKER_OPEN_SECONDS``, and deliveries to that receiver are put back with a countdown without
being sent (and without using up an attempt); the first one after that is the probe.

``job.finished`` has one event id per job, derived from the job id, so a redelivered finish
message, a sweep that re-sends a lost one and a manual redelivery all carry the same
``webhook-id`` and a receiver can drop duplicates.
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
from typing import Any
from urllib.parse import urlsplit

import urllib3
from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import exists, select

from models.db import Database, utcnow
from models.jobs import Job, WebhookDelivery
from models.jobstore import new_id
from models.public import iso, job_object
from tasks.celery_app import publish
from tasks.inputs import PrivateAddressError, http_pool
from tasks.jobs import JobTask, Runtime

log = logging.getLogger("aiorch.webhooks")

DELIVER = "aiorch.deliver_webhook"
MAX_ATTEMPTS = 15  # 10 s doubling to an hour between tries: about six and a half hours in all
MAX_DELAY = 3600.0
COUNTDOWN_LIMIT = 60.0  # longer waits are parked in the database for the sweep
FINISHED = "job.finished"
BREAKER_FAILURES = 2  # network failures in a row that open a receiver's circuit
BREAKER_OPEN_SECONDS = 30.0
MAX_DEFERRALS = 240  # about two hours of an open circuit before the event is given up

_pools: dict[bool, urllib3.PoolManager] = {}


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


def finished_event_id(job_id: str) -> str:
    """The one event id of a job's ``job.finished``: 32 hex, stable across re-sends."""
    return hashlib.sha256(f"{job_id}:{FINISHED}".encode()).hexdigest()[:32]


def retry_delay(attempt: int, base: float = 10.0, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): doubling, +-20 % jitter."""
    delay = min(MAX_DELAY, base * 2 ** (attempt - 1))
    return delay * (rng or random).uniform(0.8, 1.2)


def signing_key(secret: str) -> bytes:
    """Standard Webhooks keys are base64, usually behind ``whsec_``; the verifier libraries
    decode a key without the prefix the same way, so both sign alike (Settings refuses a secret
    that is not base64)."""
    return base64.b64decode(secret.removeprefix("whsec_"), validate=True)


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    message = f"{event_id}.{timestamp}.".encode() + body
    digest = hmac.new(signing_key(secret), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def event_body(job: Job, event: str, event_id: str) -> dict[str, Any]:
    body = {"event": event, "event_id": event_id, "ts": iso(utcnow()), **job_object(job)}
    body["predictTime"] = job.predict_time  # seed 000 repeats predict_time under this name
    return body


def schedule_event(app: Any, job: Job, event: str = FINISHED, now: bool = False) -> None:
    """Queue one event for delivery. ``job.started`` and ``job.progress`` go only to jobs that
    opted in with ``webhook_events``; ``job.finished`` goes to every job with a webhook_url.

    ``now``: make the first attempt in this process instead of queueing it, for callers that
    already run on the cpu queue (``finish_job``): one broker hop less between a job's end and
    its webhook. Retries are queued as usual."""
    if not job.webhook_url:
        return
    if event != FINISHED and event not in (job.webhook_events or ()):
        return
    event_id = finished_event_id(job.id) if event == FINISHED else new_id()
    body = json.dumps(event_body(job, event, event_id), separators=(",", ":"))
    kwargs = {"event_id": event_id, "event": event, "body": body, "attempt": 1}
    if now:
        deliver_webhook(job.id, **kwargs)  # a direct call runs the task body here, synchronously
        return
    publish(app, DELIVER, job.id, "cpu", task_kwargs=kwargs)


@shared_task(bind=True, base=JobTask, name=DELIVER, queue="cpu", soft_time_limit=30, time_limit=45)
def deliver_webhook(
    self: JobTask,
    job_id: str,
    event_id: str,
    event: str,
    body: str,
    attempt: int = 1,
    manual: bool = False,
    deferrals: int = 0,
) -> None:
    rt = self.runtime
    with rt.db.session() as session:
        url = session.scalar(select(Job.webhook_url).where(Job.id == job_id))
        # A second first attempt of one event (a redelivered finish message, or the sweep
        # re-sending a finish it thought lost) joins the chain already under way.
        duplicate = (
            attempt == 1
            and not manual
            and session.scalar(select(exists().where(WebhookDelivery.event_id == event_id)))
        )
    if not url or duplicate:
        return  # the job was deleted meanwhile, or this event is already being delivered
    kwargs = {"event_id": event_id, "event": event, "body": body, "attempt": attempt, "manual": manual}
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
            task_kwargs={**kwargs, "deferrals": deferrals + 1},
        )
        return
    ok, status_code, error, elapsed = send(rt, url, event_id, body)
    breaker.record(url, network_failure=status_code is None)
    delay = None if ok or attempt >= MAX_ATTEMPTS else retry_delay(attempt, rt.settings.webhook_retry_base)
    with rt.db.session() as session:
        row = WebhookDelivery(
            job_id=job_id,
            event_id=event_id,
            event=event,
            attempt=attempt,
            url=url,
            status_code=status_code,
            error=error,
            duration_ms=round(elapsed * 1000, 2),
            ok=ok,
            request_body=body,
            next_retry_at=utcnow() + timedelta(seconds=delay) if delay and delay > COUNTDOWN_LIMIT else None,
        )
        session.add(row)
    if ok:
        return
    log.info("webhook attempt %d for %s failed: %s", attempt, job_id, error or status_code)
    if delay is not None and delay <= COUNTDOWN_LIMIT:
        try:
            publish(
                self.app,
                DELIVER,
                job_id,
                "cpu",
                countdown=delay,
                task_kwargs={**kwargs, "attempt": attempt + 1},
            )
        except Exception:
            # The broker is away: park the retry so the sweep sends it instead of losing it.
            log.warning("webhook retry for %s parked: broker unavailable", job_id)
            with rt.db.session() as session:
                parked = session.get(WebhookDelivery, row.id)
                if parked is not None:
                    parked.next_retry_at = utcnow() + timedelta(seconds=delay)


def send(rt: Runtime, url: str, event_id: str, body: str) -> tuple[bool, int | None, str | None, float]:
    """One POST; returns (ok, status code, error, seconds). Redirects are not followed."""
    pool = _pools.get(rt.settings.allow_private_urls)
    if pool is None:
        pool = _pools[rt.settings.allow_private_urls] = http_pool(rt.settings.allow_private_urls)
    raw = body.encode()
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "aiorch-webhooks/1",
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
    }
    if rt.settings.webhook_secret:
        headers["webhook-signature"] = sign(rt.settings.webhook_secret, event_id, timestamp, raw)
    started = time.monotonic()
    timeout = urllib3.Timeout(connect=min(3.0, rt.settings.webhook_timeout), read=rt.settings.webhook_timeout)
    try:
        response = pool.request(
            "POST", url, body=raw, headers=headers, redirect=False, timeout=timeout, preload_content=True
        )
    except SoftTimeLimitExceeded:
        # A receiver dripping its answer byte by byte outlives every read timeout; the task's
        # soft limit ends the attempt, which is then recorded and retried like a timeout.
        return False, None, "network error: timed out (answer too slow)", time.monotonic() - started
    except urllib3.exceptions.MaxRetryError as exc:
        reason = exc.reason if exc.reason is not None else exc
        prefix = "refused" if isinstance(reason, PrivateAddressError) else "network error"
        return False, None, f"{prefix}: {reason}", time.monotonic() - started
    except PrivateAddressError as exc:
        return False, None, f"refused: {exc}", time.monotonic() - started
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        return False, None, f"network error: {exc}", time.monotonic() - started
    elapsed = time.monotonic() - started
    return 200 <= response.status < 300, response.status, None, elapsed


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
            publish(
                app,
                DELIVER,
                row.job_id,
                "cpu",
                task_kwargs={
                    "event_id": row.event_id,
                    "event": row.event,
                    "body": row.request_body or "{}",
                    "attempt": row.attempt + 1,
                },
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
        body = (
            last.request_body
            if last and last.request_body
            else json.dumps(event_body(job, FINISHED, event_id), separators=(",", ":"))
        )
    publish(
        app,
        DELIVER,
        job.id,
        "cpu",
        task_kwargs={
            "event_id": event_id,
            "event": FINISHED,
            "body": body,
            "attempt": attempt,
            "manual": True,
        },
    )
    return event_id


def lost_finishes(rt: Runtime, app: Any, older_than: float = 120.0, window: float = 86400.0) -> int:
    """Sweep: re-send ``job.finished`` of final jobs that have a webhook but no delivery at all,
    e.g. because the finish message could not be published. A finish merely slow in the queue
    is harmless to re-send: the first attempt of an event already under way is dropped."""
    now = utcnow()
    with rt.db.session() as session:
        rows = list(
            session.scalars(
                select(Job.id)
                .where(
                    Job.webhook_url.is_not(None),
                    Job.finished_at < now - timedelta(seconds=older_than),
                    Job.finished_at > now - timedelta(seconds=window),
                    ~exists().where(WebhookDelivery.job_id == Job.id, WebhookDelivery.event == FINISHED),
                )
                .limit(500)
            )
        )
    for job_id in rows:
        job = rt.store.get(job_id)
        if job is not None:
            schedule_event(app, job)
    return len(rows)
