"""Every write that moves a job: create, claim, progress, finish, cancel, expire.

Claims and finishes are conditional UPDATEs (``... WHERE status IN (...) AND claim_token = ...``)
so two workers holding copies of one message, or a worker racing a cancel, can never both win.
"""

from __future__ import annotations

import statistics
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Integer, String, Table, bindparam, func, insert, literal, select, text, update
from sqlalchemy.orm import Session

from models.assets import OUTPUT, stamps
from models.db import Database, UTCDateTime, relaxed_commit, rowcount, utcnow
from models.jobs import Job, StoredFile, WebhookDelivery
from models.state import FINAL_STATUSES, JobStatus, sources_of, timestamps_for

# Seconds a task takes before any job of it has finished here; replaced by measurements as soon
# as there are some. Rough GPU figures, so a fresh install's ETA is not absurd.
DEFAULT_PREDICT_SECONDS = {
    "upscale": 3.0,
    "generate": 8.0,
    "inpaint": 8.0,
    "outpaint": 10.0,
    "remove_object": 6.0,
    "remove_background": 2.0,
    "scan_objects": 1.0,
    "faceswap": 4.0,
    "faceswap_multi": 6.0,
    "face_detect": 1.0,
}
PREDICT_WINDOW = 20
FINAL_CHANNEL = "aiorch_job_final"


def notify_final(session: Session, job_id: str) -> None:
    """Tell listeners (blocking endpoints) that a job is final; delivered only on COMMIT."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_notify(:channel, :job_id)"), {"channel": FINAL_CHANNEL, "job_id": job_id}
        )


def new_id() -> str:
    return uuid.uuid4().hex


def predict_seconds(session: Session, engine_task: str) -> float:
    """The platform's estimate of a new job's run time, from the last finished jobs of the task.

    Jobs of the same task can run on different backends (a Lanczos fallback and a neural model
    differ by orders of magnitude), so only the backend that served the latest job counts.
    """
    latest_backend = session.scalar(
        select(Job.backend)
        .where(Job.engine_task == engine_task, Job.status == JobStatus.SUCCEEDED.value)
        .order_by(Job.finished_at.desc())
        .limit(1)
    )
    if latest_backend is None:
        return DEFAULT_PREDICT_SECONDS.get(engine_task, 5.0)
    rows = session.execute(
        select(Job.started_at, Job.finished_at)
        .where(
            Job.engine_task == engine_task,
            Job.status == JobStatus.SUCCEEDED.value,
            Job.backend == latest_backend,
        )
        .order_by(Job.finished_at.desc())
        .limit(PREDICT_WINDOW)
    ).all()
    durations = [(f - s).total_seconds() for s, f in rows if s is not None and f is not None]
    if not durations:
        return DEFAULT_PREDICT_SECONDS.get(engine_task, 5.0)
    return round(statistics.median(durations), 3)


@dataclass(frozen=True)
class Claim:
    job_id: str
    token: str
    attempt: int
    # Other jobs of the same task were queued on the same queue when the claim was made.
    neighbours: bool = False


class ClaimRefused(Exception):
    """The job cannot run now (finished, cancelled, already running elsewhere, out of attempts)."""

    def __init__(self, reason: str, finalized: bool = False):
        super().__init__(reason)
        self.reason = reason
        # True when refusing also ended the job (cancelled, or failed at the attempt limit).
        self.finalized = finalized


_jobs: Table = Job.__table__  # type: ignore[assignment]
_files: Table = StoredFile.__table__  # type: ignore[assignment]
_c = _jobs.c
_other = _jobs.alias("neighbour")
# Built once: the job's hot path runs these per job, and building a statement costs more than
# running it on a local Postgres.
_NEIGHBOURS = (
    select(literal(1))
    .where(
        _other.c.status == JobStatus.QUEUED.value,
        _other.c.engine_task == _c.engine_task,
        _other.c.queue == _c.queue,
        _other.c.id != _c.id,
    )
    .correlate(_jobs)
    .exists()
    .label("neighbours")
)
_NOW = bindparam("now", type_=UTCDateTime())


def _claim_statement(stages: tuple[str, ...]) -> Any:
    return (
        update(_jobs)
        .where(
            _c.id == bindparam("job_id"),
            _c.status.in_(sources_of(JobStatus.RUNNING)),
            _c.stage.in_(stages),
            _c.cancel_requested.is_(False),
            _c.attempts < bindparam("max_attempts"),
        )
        .values(
            status=JobStatus.RUNNING.value,
            attempts=_c.attempts + 1,
            claim_token=bindparam("token"),
            stage="run",
            started_at=_NOW,
            updated_at=_NOW,
        )
        .returning(*_c, _NEIGHBOURS)
    )


_CLAIM = _claim_statement(("run",))
_CLAIM_FROM_PREPARE = _claim_statement(("prepare", "run"))
_RECLAIM = (
    update(_jobs)
    .where(
        _c.id == bindparam("job_id"),
        _c.status == JobStatus.RUNNING.value,
        _c.cancel_requested.is_(False),
        _c.attempts < bindparam("max_attempts"),
    )
    .values(attempts=_c.attempts + 1, claim_token=bindparam("token"), started_at=_NOW, updated_at=_NOW)
    .returning(*_c, _NEIGHBOURS)
)
_FINISH = (
    update(_jobs)
    .where(
        _c.id == bindparam("job_id"),
        _c.claim_token == bindparam("token"),
        _c.status.in_(bindparam("sources", expanding=True)),
    )
    .values(
        status=bindparam("status"),
        result=bindparam("result"),
        error=bindparam("error"),
        stage="done",
        backend=func.coalesce(bindparam("backend", type_=String()), _c.backend),
        progress=func.coalesce(bindparam("progress", type_=Integer()), _c.progress),
        expires_at=bindparam("expires", type_=UTCDateTime()),
        finished_at=_NOW,
        updated_at=_NOW,
    )
)
_ATTRIBUTES = {attr.columns[0].name: attr.key for attr in Job.__mapper__.column_attrs}


_INSERT_JOB = insert(_jobs)
_GET_JOB = select(_jobs).where(_c.id == bindparam("job_id"))


def insert_job(session: Session, job: Job) -> None:
    """INSERT a new job from a transient ``Job`` (the attributes it was given, column defaults
    for the rest), without the ORM unit of work: the submit path's one write."""
    state = job.__dict__
    session.execute(_INSERT_JOB, {name: state[key] for name, key in _ATTRIBUTES.items() if key in state})


def _job_from(row: Any) -> Job:
    """A detached ``Job`` from a row of all the jobs table's columns (SELECT or RETURNING)."""
    mapping = row._mapping
    return Job(**{key: mapping[name] for name, key in _ATTRIBUTES.items()})


def fenced_update(
    session: Session, job_id: str, token: str | None, *conditions: Any, running: bool = False, **values: Any
) -> bool:
    """A claim holder's write: ``values`` (and ``updated_at``) land only while the job still
    carries ``token`` (and, with ``running``, is still ``running``) and every extra condition
    holds. False when the claim was fenced off meanwhile."""
    where = [Job.id == job_id, Job.claim_token == token, *conditions]
    if running:
        where.append(Job.status == JobStatus.RUNNING.value)
    values.setdefault("updated_at", utcnow())
    return bool(rowcount(session.execute(update(Job).where(*where).values(**values))))


class JobStore:
    """Job writes against one database."""

    def __init__(self, db: Database, max_attempts: int = 3):
        self.db = db
        self.max_attempts = max_attempts

    # -- reads ----------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        """The job as a detached ``Job``, or None (a prebuilt SELECT: polls and every task read it)."""
        with self.db.session() as session:
            row = session.execute(_GET_JOB, {"job_id": job_id}).first()
            return None if row is None else _job_from(row)

    def update_claimed(
        self, job_id: str, token: str | None, *conditions: Any, running: bool = False, **values: Any
    ) -> bool:
        """``fenced_update`` in a transaction of its own."""
        with self.db.session() as session:
            return fenced_update(session, job_id, token, *conditions, running=running, **values)

    # -- the pipeline ---------------------------------------------------------------------------
    def mark_dispatched(self, job_id: str) -> None:
        with self.db.session() as session:
            session.execute(update(Job).where(Job.id == job_id).values(dispatched_at=utcnow()))

    def set_prepared(self, job_id: str, inputs: dict[str, Any]) -> bool:
        """Record fetched inputs and hand the job to its run queue; False if it left ``queued``."""
        now = utcnow()
        with self.db.session() as session:
            done = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value, Job.stage == "prepare")
                .values(inputs=inputs, stage="run", updated_at=now, dispatched_at=now)
            )
            return bool(rowcount(done))

    def claim(self, job_id: str, *, redelivered: bool, from_prepare: bool = False) -> Claim:
        """``claim_job`` without the row."""
        return self.claim_job(job_id, redelivered=redelivered, from_prepare=from_prepare)[0]

    def claim_job(self, job_id: str, *, redelivered: bool, from_prepare: bool = False) -> tuple[Claim, Job]:
        """Take a prepared job for running, with a fresh fencing token; returns the claim and the
        row as it is after the claim, from one UPDATE ... RETURNING (no read before or after).

        A first delivery may only take a ``queued`` job. A redelivered message (its worker died
        mid-run) may also re-take a ``running`` job, counting another attempt; past the limit the
        job fails instead, so a job that kills its worker every time cannot loop forever.

        ``from_prepare``: the job may still be at stage ``prepare`` (sent to the run queue by the
        API because its inputs need no network); the claim moves it to ``run`` and the claiming
        worker checks the inputs itself. A job a prepare task already handled is taken as usual.

        The claim also says whether other jobs of the same task wait on the same queue
        (``Claim.neighbours``), so a batching engine looks for partners only when there are any.
        """
        now = utcnow()
        token = new_id()
        params = {"job_id": job_id, "token": token, "now": now, "max_attempts": self.max_attempts}
        with self.db.session() as session:
            relaxed_commit(session)
            row = session.execute(_CLAIM_FROM_PREPARE if from_prepare else _CLAIM, params).first()
            if row is None and redelivered:
                row = session.execute(_RECLAIM, params).first()
            if row is not None:
                job = _job_from(row)
                return Claim(job_id, token, job.attempts, bool(row.neighbours)), job
            refusal = self._refusal(session, job_id, redelivered)
        # Raised outside the unit of work, so the final status written by _refusal is committed.
        raise refusal

    def _refusal(self, session: Session, job_id: str, redelivered: bool) -> ClaimRefused:
        job = session.get(Job, job_id)
        if job is None:
            return ClaimRefused("job no longer exists")
        if job.status in FINAL_STATUSES:
            return ClaimRefused(f"job is already {job.status}")
        if job.cancel_requested:
            self._set_final(
                session,
                job_id,
                JobStatus.CANCELLED,
                None,
                {"code": "cancelled", "message": "The job was cancelled."},
            )
            return ClaimRefused("job was cancelled", finalized=True)
        if job.attempts >= self.max_attempts and (job.status == JobStatus.RUNNING.value or redelivered):
            self._set_final(
                session,
                job_id,
                JobStatus.FAILED,
                None,
                {
                    "code": "worker_lost",
                    "message": f"The job's worker died {job.attempts} times while running it; "
                    "it is not retried again.",
                },
            )
            return ClaimRefused("attempt limit reached", finalized=True)
        return ClaimRefused(f"job is {job.status} (stage {job.stage}); this copy of the message is stale")

    def report_progress(self, claim: Claim, percent: int) -> bool:
        """Store progress; returns True when the job has been asked to stop."""
        with self.db.session() as session:
            session.execute(
                update(Job)
                .where(Job.id == claim.job_id, Job.claim_token == claim.token)
                .values(progress=max(0, min(99, percent)), updated_at=utcnow())
            )
            return bool(session.scalar(select(Job.cancel_requested).where(Job.id == claim.job_id)))

    def cancel_requested(self, job_id: str) -> bool:
        with self.db.session() as session:
            row = session.execute(select(Job.status, Job.cancel_requested).where(Job.id == job_id)).first()
            return row is None or bool(row.cancel_requested) or row.status in FINAL_STATUSES

    def finish(
        self,
        claim: Claim,
        status: JobStatus,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        backend: str | None = None,
        files: Sequence[StoredFile] = (),
        retention: float | None = None,
    ) -> bool:
        """Write the final status of a claimed run; False when the claim was fenced off."""
        now = utcnow()
        expires = now + timedelta(seconds=retention) if retention and files else None
        succeeded = status is JobStatus.SUCCEEDED
        with self.db.session() as session:
            done = session.execute(
                _FINISH,
                {
                    "job_id": claim.job_id,
                    "token": claim.token,
                    "sources": [s for s in sources_of(status) if s == JobStatus.RUNNING.value],
                    "status": status.value,
                    "result": result,
                    "error": error,
                    "backend": backend or None,
                    "progress": 100 if succeeded else None,
                    "expires": expires if succeeded else None,
                    "now": now,
                },
            )
            if not rowcount(done):
                return False
            if files:
                session.execute(
                    insert(_files),
                    [
                        {
                            "name": f.name,
                            "asset_id": f.asset_id,
                            "kind": f.kind or OUTPUT,
                            "job_id": f.job_id,
                            "client_id": f.client_id,
                            "filename": f.filename,
                            "content_type": f.content_type,
                            "size": f.size,
                            "width": f.width,
                            "height": f.height,
                            "created_at": created,
                            "expires_at": expires,
                        }
                        for f, created in zip(files, stamps(now, len(files)), strict=True)
                    ],
                )
                for stored in files:
                    stored.expires_at = expires
            notify_final(session, claim.job_id)
            return True

    def fail_unclaimed(self, job_id: str, status: JobStatus, error: dict[str, Any]) -> bool:
        """End a job that never ran (bad input found while preparing, expiry): from ``queued`` only."""
        with self.db.session() as session:
            return self._set_final(session, job_id, status, [JobStatus.QUEUED.value], error)

    def _set_final(
        self,
        session: Session,
        job_id: str,
        status: JobStatus,
        only_from: list[str] | None,
        error: dict[str, Any] | None,
    ) -> bool:
        sources = sources_of(status) if only_from is None else tuple(set(only_from) & set(sources_of(status)))
        done = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(sources))
            .values(status=status.value, error=error, stage="done", **timestamps_for(status, utcnow()))
        )
        if rowcount(done):
            notify_final(session, job_id)
        return bool(rowcount(done))

    def cancel(self, job_id: str) -> str:
        """Cancel a job: ``queued`` ends at once; ``running`` is flagged for its engine to stop.

        Returns the status the job has afterwards (``cancelled`` or ``running``), or raises
        ``ClaimRefused`` when it had already finished.
        """
        with self.db.session() as session:
            if self._set_final(
                session,
                job_id,
                JobStatus.CANCELLED,
                [JobStatus.QUEUED.value],
                {"code": "cancelled", "message": "The job was cancelled by the client."},
            ):
                return JobStatus.CANCELLED.value
            flagged = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value)
                .values(cancel_requested=True, updated_at=utcnow())
            )
            if rowcount(flagged):
                return JobStatus.RUNNING.value
            status = session.scalar(select(Job.status).where(Job.id == job_id))
            raise ClaimRefused(f"job is already {status}")

    # -- sweeps ---------------------------------------------------------------------------------
    def expire_queued(self, ttl: float, now: datetime | None = None) -> list[str]:
        """Jobs still ``queued`` after their TTL end ``expired``."""
        now = now or utcnow()
        deadline = now - timedelta(seconds=ttl)
        with self.db.session() as session:
            ids = list(
                session.scalars(
                    select(Job.id).where(Job.status == JobStatus.QUEUED.value, Job.queued_at < deadline)
                )
            )
            expired = []
            for job_id in ids:
                if self._set_final(
                    session,
                    job_id,
                    JobStatus.EXPIRED,
                    [JobStatus.QUEUED.value],
                    {
                        "code": "expired",
                        "message": f"The job waited longer than its TTL of {ttl:g} s.",
                    },
                ):
                    expired.append(job_id)
            return expired

    def stuck_jobs(self, older_than: float, now: datetime | None = None) -> list[tuple[str, str, str, int]]:
        """Queued jobs whose message may have been lost: (id, stage, queue, priority).

        A job that was accepted but never dispatched (the API died between COMMIT and publish), or
        whose last dispatch is older than ``older_than`` seconds, is published again; the claim's
        conditional UPDATE makes any duplicate message harmless.
        """
        now = now or utcnow()
        cutoff = now - timedelta(seconds=older_than)
        with self.db.session() as session:
            rows = session.execute(
                select(Job.id, Job.stage, Job.queue, Job.priority).where(
                    Job.status == JobStatus.QUEUED.value,
                    func.coalesce(Job.dispatched_at, Job.queued_at) < cutoff,
                )
            ).all()
            return [(r.id, r.stage, r.queue, r.priority) for r in rows]

    def running_silence(self, now: datetime | None = None) -> list[tuple[str, str, int, str, float]]:
        """Running jobs with the seconds since their last write: (id, queue, priority, task, silent)."""
        now = now or utcnow()
        with self.db.session() as session:
            rows = session.execute(
                select(Job.id, Job.queue, Job.priority, Job.engine_task, Job.updated_at).where(
                    Job.status == JobStatus.RUNNING.value, Job.updated_at < now - timedelta(seconds=60)
                )
            ).all()
            return [
                (r.id, r.queue, r.priority, r.engine_task, (now - r.updated_at).total_seconds()) for r in rows
            ]

    def expired_files(self, now: datetime | None = None) -> list[tuple[str, str]]:
        """Delete the rows of stored files past their retention, outputs and uploads alike;
        returns them as ``(kind, name)`` for ``Storage.delete_files``."""
        now = now or utcnow()
        with self.db.session() as session:
            rows = session.execute(
                select(StoredFile.kind, StoredFile.name).where(StoredFile.expires_at < now)
            ).all()
            names = [row.name for row in rows]
            if names:
                session.query(StoredFile).filter(StoredFile.name.in_(names)).delete()
            return [(row.kind, row.name) for row in rows]

    def delete(self, job_id: str) -> list[str]:
        """Delete a job with its files and deliveries; returns the file names to unlink."""
        with self.db.session() as session:
            names = list(session.scalars(select(StoredFile.name).where(StoredFile.job_id == job_id)))
            session.query(StoredFile).filter(StoredFile.job_id == job_id).delete()
            session.query(WebhookDelivery).filter(WebhookDelivery.job_id == job_id).delete()
            session.query(Job).filter(Job.id == job_id).delete()
            notify_final(session, job_id)  # a blocking request waiting on it answers at once
            return names
