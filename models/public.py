"""The job object of the public contract (seed 000's webhook body without the event fields)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from models.db import utcnow
from models.jobs import Job
from models.state import JobStatus


def iso(value: datetime | None) -> str | None:
    # isoformat() drops the microseconds when they are zero; the contract always shows them.
    return value.isoformat(timespec="microseconds") if value is not None else None


def millis(value: datetime | None) -> int | None:
    return int(value.timestamp() * 1000) if value is not None else None


def eta(job: Job, now: datetime | None = None) -> datetime | None:
    """``queued_at`` + the estimate; while still queued past that point, now + the estimate."""
    if job.predict_time is None:
        return None
    estimate = timedelta(seconds=job.predict_time)
    planned = job.queued_at + estimate
    if job.status == JobStatus.QUEUED.value:
        now = now or utcnow()
        if planned < now:
            return now + estimate
    return planned


def job_object(job: Job, now: datetime | None = None) -> dict[str, Any]:
    duration = None
    if job.started_at is not None and job.finished_at is not None:
        duration = round((job.finished_at - job.started_at).total_seconds(), 6)
    body: dict[str, Any] = {
        "job_id": job.id,
        "task": job.task,
        "status": job.status,
        "progress": job.progress,
        "ok": job.status == JobStatus.SUCCEEDED.value,
    }
    for name in ("created_at", "queued_at", "started_at", "finished_at"):
        value = getattr(job, name)
        body[name] = iso(value)
        body[f"{name}_ms"] = millis(value)
    body.update(
        {
            "duration": duration,
            "predict_time": job.predict_time,
            "eta_utc": iso(eta(job, now)),
            "result": job.result,
            "error": job.error,
            "attempts": job.attempts,
            "metadata": job.meta or {},
            "webhook_url": job.webhook_url,
            "batch_id": job.batch_id,
            "priority": job.priority,
            "expires_at": iso(job.expires_at),
            # Last, after seed 000's fields: filled in by GET /v1/jobs/{id} while the job is queued
            # (models/standing.standing).
            "queue_position": None,
            # What a run reports beside its percentage (a training's step and loss); null for most.
            "progress_detail": job.progress_detail,
        }
    )
    return body
