"""The API's read-only queries of jobs: a client's job list and look-ups, a job's webhook delivery
attempts, and the counts a client's admission limits are checked against.

Views call these and build no SQL themselves. Every read of a client's jobs takes the client:
another client's job is found exactly as often as one that does not exist, never. Where the client
may be None, that is an admin key's read (``app.auth.job_scope``): every client's jobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, text

from models.db import Database
from models.jobs import Job, WebhookDelivery
from models.state import JobStatus


@dataclass(frozen=True)
class JobFilter:
    """``GET /v1/jobs``'s filters; None where the client gave none."""

    ids: Sequence[str] | None = None
    status: str | None = None
    task: str | None = None
    before: datetime | None = None
    batch_id: str | None = None


def list_jobs(db: Database, client_id: str | None, filters: JobFilter, limit: int) -> tuple[list[Job], bool]:
    """A page of the client's jobs (every client's for None), newest first, and whether more
    follow it.

    One row past the page answers "more?" without a COUNT; ``id`` breaks ties between jobs
    created in the same microsecond, so pages never skip or repeat one."""
    query = select(Job)
    if client_id is not None:
        query = query.where(Job.client_id == client_id)
    if filters.ids is not None:
        query = query.where(Job.id.in_(filters.ids))
    if filters.status is not None:
        query = query.where(Job.status == filters.status)
    if filters.task is not None:
        query = query.where(Job.task == filters.task)
    if filters.before is not None:
        query = query.where(Job.created_at < filters.before)
    if filters.batch_id is not None:
        query = query.where(Job.batch_id == filters.batch_id)
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    with db.session() as session:
        rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit


def job_by_idempotency_key(db: Database, client_id: str, key: str) -> Job | None:
    """The client's job created with this ``Idempotency-Key`` (keys are per client)."""
    with db.session() as session:
        return session.scalar(select(Job).where(Job.client_id == client_id, Job.idempotency_key == key))


def clients_of(db: Database, job_ids: Sequence[str]) -> dict[str, str]:
    """The client of each of these jobs that exists (``/diag/backends``: whose are the running
    jobs). A few ids at a time, one per busy slot: one query on the primary key."""
    if not job_ids:
        return {}
    with db.session() as session:
        rows = session.execute(select(Job.id, Job.client_id).where(Job.id.in_(list(job_ids))))
        return {str(job_id): str(client) for job_id, client in rows}


def deliveries_of(db: Database, job_id: str) -> list[WebhookDelivery]:
    """Every webhook delivery attempt of the job, oldest first (the caller checked ownership)."""
    with db.session() as session:
        return list(
            session.scalars(
                select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.id)
            )
        )


@dataclass(frozen=True)
class AdmissionCounts:
    """What a client's admission limits are checked against; zero where not asked for."""

    created_since: int = 0
    oldest_since: datetime | None = None  # the oldest of those jobs: when the window frees a place
    queued: int = 0


def admission_counts(db: Database, client_id: str, since: datetime | None, queued: bool) -> AdmissionCounts:
    """The client's jobs created after ``since`` (when given) and its queued jobs (when ``queued``),
    in one session; both counts use the jobs' indexes (client + created, status + queued)."""
    mine = Job.client_id == client_id
    created, oldest, waiting = 0, None, 0
    with db.session() as session:
        if since is not None:
            created, oldest = session.execute(
                select(func.count(), func.min(Job.created_at)).where(mine, Job.created_at > since)
            ).one()
        if queued:
            waiting = (
                session.scalar(select(func.count()).where(mine, Job.status == JobStatus.QUEUED.value)) or 0
            )
    return AdmissionCounts(created_since=created, oldest_since=oldest, queued=waiting)


def ping(db: Database) -> None:
    """One round trip to the database (``/readyz``); raises the driver's error when it is down."""
    with db.engine.connect() as connection:
        connection.execute(text("SELECT 1"))
