"""Webhook delivery on the cpu queue: the seed 000 body, Standard Webhooks signatures, retries.

A delivery attempt has a short timeout and runs on the cpu queue, so a slow or dead receiver
never holds a GPU slot. Failures retry with exponential backoff and jitter for hours: short waits
ride on a Celery countdown, longer ones are parked in the database (``next_retry_at``) and sent by
the periodic sweep, because RabbitMQ drops a consumer that holds an unacked message for too long.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import time
from datetime import timedelta
from typing import Any

import urllib3
from celery import shared_task
from sqlalchemy import select

from models.db import Database, utcnow
from models.jobs import Job, WebhookDelivery
from models.jobstore import new_id
from models.public import iso, job_object
from tasks.celery_app import publish
from tasks.inputs import PrivateAddressError, http_pool
from tasks.jobs import JobTask, Runtime

log = logging.getLogger("aiorch.webhooks")

DELIVER = "aiorch.deliver_webhook"
MAX_ATTEMPTS = 15  # 10 s doubling to an hour between tries: about 9 hours in all
MAX_DELAY = 3600.0
COUNTDOWN_LIMIT = 60.0  # longer waits are parked in the database for the sweep

_pools: dict[bool, urllib3.PoolManager] = {}


def retry_delay(attempt: int, base: float = 10.0, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): doubling, +-20 % jitter."""
    delay = min(MAX_DELAY, base * 2 ** (attempt - 1))
    return delay * (rng or random).uniform(0.8, 1.2)


def signing_key(secret: str) -> bytes:
    """Standard Webhooks keys are ``whsec_`` + base64; a bare secret is used as its bytes."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[len("whsec_") :])
    return secret.encode()


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    message = f"{event_id}.{timestamp}.".encode() + body
    digest = hmac.new(signing_key(secret), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def event_body(job: Job, event: str, event_id: str) -> dict[str, Any]:
    body = {"event": event, "event_id": event_id, "ts": iso(utcnow()), **job_object(job)}
    body["predictTime"] = job.predict_time  # seed 000 repeats predict_time under this name
    return body


def schedule_event(app: Any, job: Job, event: str = "job.finished") -> None:
    """Queue one event for delivery. ``job.started`` and ``job.progress`` go only to jobs that
    opted in with ``webhook_events``; ``job.finished`` goes to every job with a webhook_url."""
    if not job.webhook_url:
        return
    if event != "job.finished" and event not in (job.webhook_events or ()):
        return
    event_id = new_id()
    body = json.dumps(event_body(job, event, event_id), separators=(",", ":"))
    publish(
        app,
        DELIVER,
        job.id,
        "cpu",
        task_kwargs={"event_id": event_id, "event": event, "body": body, "attempt": 1},
    )


@shared_task(bind=True, base=JobTask, name=DELIVER, queue="cpu", soft_time_limit=30, time_limit=45)
def deliver_webhook(
    self: JobTask, job_id: str, event_id: str, event: str, body: str, attempt: int = 1
) -> None:
    rt = self.runtime
    with rt.db.session() as session:
        url = session.scalar(select(Job.webhook_url).where(Job.id == job_id))
    if not url:
        return  # the job was deleted meanwhile
    ok, status_code, error, elapsed = send(rt, url, event_id, body)
    delay = None if ok or attempt >= MAX_ATTEMPTS else retry_delay(attempt, rt.settings.webhook_retry_base)
    with rt.db.session() as session:
        session.add(
            WebhookDelivery(
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
                next_retry_at=utcnow() + timedelta(seconds=delay)
                if delay and delay > COUNTDOWN_LIMIT
                else None,
            )
        )
    if ok:
        return
    log.info("webhook attempt %d for %s failed: %s", attempt, job_id, error or status_code)
    if delay is not None and delay <= COUNTDOWN_LIMIT:
        publish(
            self.app,
            DELIVER,
            job_id,
            "cpu",
            countdown=delay,
            task_kwargs={"event_id": event_id, "event": event, "body": body, "attempt": attempt + 1},
        )


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
    """Send the job's latest event again, with the same event id; returns that id."""
    with db.session() as session:
        last = session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == job.id)
            .order_by(WebhookDelivery.id.desc())
        ).first()
        attempt = last.attempt + 1 if last else 1
        event_id = last.event_id if last else new_id()
        body = (
            last.request_body
            if last and last.request_body
            else json.dumps(event_body(job, "job.finished", event_id), separators=(",", ":"))
        )
    publish(
        app,
        DELIVER,
        job.id,
        "cpu",
        task_kwargs={"event_id": event_id, "event": "job.finished", "body": body, "attempt": attempt},
    )
    return event_id
