"""Batches of jobs (``POST /v1/jobs/batch``): their one-transaction INSERT, their look-ups, their
status, and their withdrawal when the broker would not take them.

A batch is no row of its own: it is the jobs that carry its ``batch_id`` (a client may send one
batch in several requests under the same id). Every read takes the client: another client's batch
is found exactly as often as one that does not exist, never. Where the client may be None, that is
an admin key's read: the jobs of every client with that batch id (or those ids).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, delete, func, select, true
from sqlalchemy.orm import Session

from models import feed, lifecycle
from models.db import Database, utcnow
from models.jobs import Job, StoredFile, WebhookDelivery
from models.public import eta
from models.state import FINAL_STATUSES, JobStatus

# Rows per statement where a batch's jobs are named one by one (an IN list, a cancel's moves).
CHUNK = 1000
LIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


def insert_jobs(session: Session, jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """The batch submit's one write: the jobs' multi-row INSERT and their first events
    (``lifecycle.create_many``), in the caller's transaction; returns their job objects."""
    return lifecycle.create_many(session, jobs)


def jobs_by_idempotency_keys(db: Database, client_id: str, keys: Sequence[str]) -> dict[str, Job]:
    """The client's jobs created with any of these idempotency keys, by key (one query per
    ``CHUNK`` keys, on the (client_id, idempotency_key) unique index)."""
    found: dict[str, Job] = {}
    with db.session() as session:
        for part in _chunks(list(dict.fromkeys(keys))):
            rows = session.scalars(
                select(Job).where(Job.client_id == client_id, Job.idempotency_key.in_(part))
            )
            found.update({job.idempotency_key: job for job in rows if job.idempotency_key})
    return found


def withdraw_jobs(db: Database, job_ids: Sequence[str]) -> None:
    """Delete jobs that were inserted but never published (the broker refused their batch), with
    their rows in other tables, so no worker and no client ever sees them."""
    with db.session() as session:
        for part in _chunks(job_ids):
            session.execute(delete(StoredFile).where(StoredFile.job_id.in_(part)))
            session.execute(delete(WebhookDelivery).where(WebhookDelivery.job_id.in_(part)))
            session.execute(delete(Job).where(Job.id.in_(part)))
            feed.announce(session, part)


@dataclass(frozen=True)
class BatchStatus:
    """``GET /v1/batches/{batch_id}``: its jobs by status, how far it is, and when it should end."""

    batch_id: str
    total: int
    counts: dict[str, int]
    progress: int  # 0-100: a final job counts 100, a live one its own progress
    eta_utc: datetime | None  # the latest estimate of its live jobs; None once all are final
    created_at: datetime


def owned_by(client_id: str | None) -> ColumnElement[bool]:
    """The jobs of ``client_id``; of every client for None (an admin key)."""
    return true() if client_id is None else Job.client_id == client_id


def batch_status(
    db: Database, client_id: str | None, batch_id: str, now: datetime | None = None
) -> BatchStatus | None:
    """The batch's status, or None when the client has no job in it.

    One grouped query, whatever the batch's size: per (status, estimate) the count, the progress
    summed, the first creation and the latest queueing. A live job's ETA only grows with its
    ``queued_at`` for a given estimate, so the latest one per group is the group's latest ETA."""
    now = now or utcnow()
    query = (
        select(
            Job.status,
            Job.predict_time,
            func.count(),
            func.coalesce(func.sum(Job.progress), 0),
            func.min(Job.created_at),
            func.max(Job.queued_at),
        )
        .where(owned_by(client_id), Job.batch_id == batch_id)
        .group_by(Job.status, Job.predict_time)
    )
    with db.session() as session:
        rows = session.execute(query).all()
    if not rows:
        return None
    counts: dict[str, int] = {}
    done = 0.0
    etas: list[datetime] = []
    for status, predict_time, count, progress, _created, queued in rows:
        counts[status] = counts.get(status, 0) + count
        if status in FINAL_STATUSES:
            done += 100 * count
            continue
        done += progress
        latest = eta(Job(status=status, predict_time=predict_time, queued_at=queued), now)
        if latest is not None:
            etas.append(latest)
    total = sum(counts.values())
    final = sum(n for status, n in counts.items() if status in FINAL_STATUSES)
    # 100 only when every job is final, however close the live ones are.
    progress = 100 if final == total else min(99, int(done / total))
    return BatchStatus(
        batch_id=batch_id,
        total=total,
        counts=counts,
        progress=progress,
        eta_utc=max(etas) if etas else None,
        created_at=min(row[4] for row in rows),
    )


def live_job_ids(db: Database, client_id: str | None, batch_id: str) -> tuple[list[str], int]:
    """The batch's jobs that may still be cancelled, and how many of its jobs are final already."""
    with db.session() as session:
        ids = list(
            session.scalars(
                select(Job.id).where(owned_by(client_id), Job.batch_id == batch_id, Job.status.in_(LIVE))
            )
        )
        final = session.scalar(
            select(func.count()).where(owned_by(client_id), Job.batch_id == batch_id, Job.status.not_in(LIVE))
        )
    return ids, final or 0


def owned_job_ids(db: Database, client_id: str | None, job_ids: Sequence[str]) -> list[str]:
    """Those of ``job_ids`` that are the client's jobs (others' and unknown ids are left out)."""
    owned: list[str] = []
    with db.session() as session:
        for part in _chunks(list(dict.fromkeys(job_ids))):
            owned += session.scalars(select(Job.id).where(owned_by(client_id), Job.id.in_(part)))
    return owned


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]
