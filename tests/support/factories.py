"""Rows the tests need, built one way: one factory per model, each INSERTs one committed row of
client alice with plausible defaults, lets ``overrides`` set any column, and returns the row's
primary key. ``FACTORIES`` maps each model to its factory (tests/test_architecture.py checks that
every mapped model has one and that each builds a row the database accepts)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from models import lifecycle
from models.db import Base, Database, utcnow
from models.jobs import (
    ApiKey,
    ClientLimit,
    DispatchTurn,
    Job,
    JobCounter,
    JobEvent,
    JobStatusCount,
    QueueSlot,
    StoredFile,
    WebhookDelivery,
    WebhookEvent,
    WebhookSecret,
)
from models.jobstore import new_id
from models.keys import generate_key, hash_key
from models.webhook_secrets import new_secret

HOOK_URL = "http://127.0.0.1:9/hook"  # nothing listens on the discard port: deliveries fail fast


def _insert(db: Database, row: Base) -> None:
    with db.session() as session:
        session.add(row)


def _job_values(**overrides: object) -> dict[str, object]:
    now = utcnow()
    values: dict[str, object] = dict(
        id=new_id(),
        client_id="alice",
        task="upscale",
        engine_task="upscale",
        queue="gpu.superres",
        status="queued",
        stage="run",
        progress=0,
        priority=0,
        payload={},
        meta={},
        attempts=0,
        cancel_requested=False,
        created_at=now,
        queued_at=now,
        updated_at=now,
    )
    values.update(overrides)
    return values


def new_job(**overrides: object) -> Job:
    """A queued upscale job not inserted yet (a submit's), ``overrides`` setting any column."""
    return Job.transient(**_job_values(**overrides))


def make_job(db: Database, **overrides: object) -> str:
    """INSERT a queued upscale job (committed) and return its id; ``overrides`` set any column."""
    values = _job_values(**overrides)
    with db.session() as session:
        session.add(Job(**values))
    return str(values["id"])


def make_job_event(db: Database, **overrides: object) -> int:
    """Create a queued upscale job through the lifecycle's own first move (``lifecycle.create``:
    the job's INSERT and its ``job.queued`` event, in one transaction) and return that event's row
    id; ``overrides`` set the job's columns (its status and stage are the lifecycle's)."""
    job = Job(**_job_values(**overrides))
    with db.session() as session:
        lifecycle.create(session, job)
    with db.session() as session:
        event_id = session.scalar(select(JobEvent.id).where(JobEvent.job_id == job.id, JobEvent.seq == 1))
    assert event_id is not None
    return event_id


def make_finished_job(db: Database, **overrides: object) -> str:
    """A job that succeeded just now with a webhook URL: what deliveries and events hang off."""
    values: dict[str, object] = dict(status="succeeded", stage="done", progress=100, webhook_url=HOOK_URL)
    values.update(started_at=utcnow(), finished_at=utcnow())
    values.update(overrides)
    return make_job(db, **values)


def make_api_key(db: Database, key: str | None = None, **overrides: Any) -> int:
    """INSERT a live API key of alice and return its row id. Only the key's hash is stored, so a
    test that authenticates with it passes its own ``key``."""
    key = key or generate_key()
    values: dict[str, Any] = dict(client_id="alice", key_hash=hash_key(key), prefix=key[:10], label="factory")
    values.update(overrides)
    row = ApiKey(**values)
    _insert(db, row)
    return int(row.id)


def make_asset(db: Database, **overrides: Any) -> str:
    """INSERT an asset row of alice (an upload unless ``kind``/``job_id`` say otherwise) and return
    its storage name, the primary key; the row's ``asset_id`` is a fresh 32-hex id unless given.
    No file is written: a test that serves the bytes stores them through the Storage."""
    values: dict[str, Any] = dict(
        name=f"{uuid.uuid4().hex}.png",
        asset_id=uuid.uuid4().hex,
        kind="upload",
        job_id=None,
        client_id="alice",
        filename="factory.png",
        content_type="image/png",
        size=68,
        width=1,
        height=1,
    )
    values.update(overrides)
    _insert(db, StoredFile(**values))
    return str(values["name"])


def make_webhook_event(db: Database, job_id: str | None = None, **overrides: Any) -> str:
    """INSERT the recorded body of one event of ``job_id`` (a fresh finished job when None) and
    return its event id."""
    job_id = job_id or make_finished_job(db)
    values: dict[str, Any] = dict(event_id=uuid.uuid4().hex, job_id=job_id, event="job.finished")
    values.update(overrides)
    values.setdefault("body", json.dumps({"event": values["event"], "job_id": job_id}))
    _insert(db, WebhookEvent(**values))
    return str(values["event_id"])


def make_webhook_delivery(db: Database, job_id: str | None = None, **overrides: Any) -> int:
    """INSERT one failed first attempt to deliver the finish of ``job_id`` (a fresh finished job
    when None) and return the delivery's row id."""
    job_id = job_id or make_finished_job(db)
    values: dict[str, Any] = dict(
        job_id=job_id, event_id=uuid.uuid4().hex, event="job.finished", attempt=1, url=HOOK_URL, ok=False
    )
    values.update(overrides)
    row = WebhookDelivery(**values)
    _insert(db, row)
    return int(row.id)


def make_webhook_secret(db: Database, client_id: str | None = None, **overrides: Any) -> str:
    """INSERT a rotated webhook secret for ``client_id`` (by default a client of its own, so it
    never collides with a secret another test rotated) and return the client id."""
    client_id = client_id or f"client-{new_id()[:12]}"
    values: dict[str, Any] = dict(client_id=client_id, secret=new_secret(), rotated_at=utcnow())
    values.update(overrides)
    _insert(db, WebhookSecret(**values))
    return str(values["client_id"])


def make_job_counter(db: Database, **overrides: Any) -> tuple[str, str, str]:
    """INSERT one series of ``/metrics`` (two succeeded jobs of a task of its own) and return its
    key ``(metric, task, label)``."""
    values: dict[str, Any] = dict(
        metric="jobs_finished", task=f"t{new_id()[:12]}", label="succeeded", value=2, total=0.0
    )
    values.update(overrides)
    _insert(db, JobCounter(**values))
    return (values["metric"], values["task"], values["label"])


def make_job_status_count(db: Database, **overrides: Any) -> tuple[str, str, str, str, int]:
    """INSERT one shard of a status count of alice (a task of its own; no jobs unless ``n`` says so:
    the counts that ``/stats`` and ``/metrics`` read stay true) and return its key ``(client_id,
    task, engine_task, status, shard)``. The jobs triggers keep these rows (migration 0010)."""
    task = f"t{new_id()[:12]}"
    values: dict[str, Any] = dict(
        client_id="alice", task=task, engine_task=task, status="queued", shard=0, n=0
    )
    values.update(overrides)
    _insert(db, JobStatusCount(**values))
    return (values["client_id"], values["task"], values["engine_task"], values["status"], values["shard"])


def make_queue_slot(db: Database, **overrides: Any) -> tuple[str, str]:
    """INSERT one worker's slots on a queue (seen now) and return its key ``(node, queue)``."""
    values: dict[str, Any] = dict(
        node=f"w{new_id()[:12]}@test", queue="gpu.superres", slots=1, seen_at=utcnow()
    )
    values.update(overrides)
    _insert(db, QueueSlot(**values))
    return (values["node"], values["queue"])


def make_dispatch_turn(db: Database, **overrides: Any) -> tuple[str, str]:
    """INSERT when a client last got a slot of a queue and return its key ``(queue, client_id)``."""
    values: dict[str, Any] = dict(queue=f"q.{new_id()[:8]}", client_id="alice", last_at=utcnow())
    values.update(overrides)
    _insert(db, DispatchTurn(**values))
    return (values["queue"], values["client_id"])


def make_client_limit(db: Database, client_id: str | None = None, **overrides: Any) -> str:
    """INSERT limits of a client of its own (``aiorch keys update``: a rate of 60 a minute, the
    rest the defaults) and return its id."""
    client_id = client_id or f"client-{new_id()[:12]}"
    values: dict[str, Any] = dict(client_id=client_id, rate_per_minute=60, updated_at=utcnow())
    values.update(overrides)
    _insert(db, ClientLimit(**values))
    return str(values["client_id"])


FACTORIES: dict[type[Base], Callable[..., object]] = {
    Job: make_job,
    JobEvent: make_job_event,
    ApiKey: make_api_key,
    StoredFile: make_asset,
    WebhookEvent: make_webhook_event,
    WebhookDelivery: make_webhook_delivery,
    WebhookSecret: make_webhook_secret,
    JobCounter: make_job_counter,
    JobStatusCount: make_job_status_count,
    QueueSlot: make_queue_slot,
    DispatchTurn: make_dispatch_turn,
    ClientLimit: make_client_limit,
}
