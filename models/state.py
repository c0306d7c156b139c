"""The job state machine: every status change in aiorch goes through here.

``TRANSITIONS`` is the single table of legal moves. ORM code calls ``transition`` (which also sets
the timestamps); the conditional UPDATEs that claim and finish jobs build their ``WHERE status IN
(...)`` from ``sources_of`` so the two can never disagree.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.jobs import Job


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


FINAL_STATUSES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.REJECTED, JobStatus.CANCELLED, JobStatus.EXPIRED}
)

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    # A queued job can fail or be rejected before it runs: bad inputs are found while preparing.
    JobStatus.QUEUED: frozenset(
        {JobStatus.RUNNING, JobStatus.FAILED, JobStatus.REJECTED, JobStatus.CANCELLED, JobStatus.EXPIRED}
    ),
    # A running job expires when its remote provider dropped it after the provider's own lifetime
    # (Volcengine forgets a task after 12 h: ``not_found``); our queue TTL only expires queued jobs.
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.REJECTED, JobStatus.CANCELLED, JobStatus.EXPIRED}
    ),
    **{status: frozenset() for status in FINAL_STATUSES},
}


class IllegalTransition(Exception):
    def __init__(self, job_id: str, current: str, target: str):
        super().__init__(f"job {job_id}: cannot go from {current} to {target}")
        self.current = current
        self.target = target


def sources_of(target: JobStatus) -> tuple[str, ...]:
    """Statuses from which ``target`` may be reached (for conditional UPDATEs)."""
    return tuple(sorted(src.value for src, targets in TRANSITIONS.items() if target in targets))


def is_final(status: str) -> bool:
    return status in FINAL_STATUSES


def timestamps_for(target: JobStatus, now: datetime) -> dict[str, datetime]:
    """The timestamp columns a move into ``target`` sets."""
    if target is JobStatus.RUNNING:
        return {"started_at": now, "updated_at": now}
    if target in FINAL_STATUSES:
        return {"finished_at": now, "updated_at": now}
    return {"updated_at": now}


def transition(job: Job, target: JobStatus, now: datetime) -> None:
    """Move an ORM job to ``target``, or raise ``IllegalTransition``."""
    current = JobStatus(job.status)
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(job.id, current, target)
    job.status = target.value
    for column, value in timestamps_for(target, now).items():
        setattr(job, column, value)
    if target is JobStatus.SUCCEEDED:
        job.progress = 100
