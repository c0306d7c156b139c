"""A job's writes as the pipeline needs them, each one move of the lifecycle (``models.lifecycle``).

Claims and finishes are conditional UPDATEs (``... WHERE (status, stage) IN (...) AND claim_token
= ...``) so two workers holding copies of one message, or a worker racing a cancel, can never both
win. Every move writes its event in the same transaction; after the commit, a move whose event a
webhook wants calls ``on_notify`` (the tasks layer's kick of the dispatcher).
"""

from __future__ import annotations

import statistics
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, bindparam, func, select
from sqlalchemy.orm import Session

from models import feed, lifecycle
from models.assets import OUTPUT, stamps
from models.db import Database, rowcount, utcnow
from models.failures import JobFailure
from models.jobs import Job, StoredFile, WebhookDelivery
from models.lifecycle import Moved, job_from
from models.state import FINAL_STATUSES, MOVES, JobStatus, Phase, finish_move

__all__ = [
    "CancelOutcome",
    "Claim",
    "ClaimRefused",
    "JobStore",
    "Moved",
    "insert_job",
    "new_id",
]

PREDICT_WINDOW = 20
# The ways a job that never ran ends, by status.
_END_QUEUED = {
    JobStatus.CANCELLED: MOVES["cancel"],
    JobStatus.EXPIRED: MOVES["expire"],
    JobStatus.FAILED: MOVES["fail"],
}


def new_id() -> str:
    return uuid.uuid4().hex


def predict_seconds(session: Session, engine_task: str, default: float) -> float:
    """The platform's estimate of a new job's run time, from the last finished jobs of the task.

    Jobs of the same task can run on different backends (a Lanczos fallback and a neural model
    differ by orders of magnitude), so only the backend that served the latest job counts.
    ``default``: the estimate before any job of the task has finished here (its engine declares
    it, ``LocalTask.predict_seconds``; the catalog's ``TaskSpec.predict_seconds``).
    """
    latest_backend = session.scalar(
        select(Job.backend)
        .where(Job.engine_task == engine_task, Job.status == JobStatus.SUCCEEDED.value)
        .order_by(Job.finished_at.desc())
        .limit(1)
    )
    if latest_backend is None:
        return default
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
        return default
    return round(statistics.median(durations), 3)


def insert_job(session: Session, job: Job) -> dict[str, Any]:
    """The submit path's one write: the job's INSERT and its first event (``lifecycle.create``);
    returns the job object. (A job that waits for a slot: ``models.dispatch.insert_in_turn``.)"""
    return lifecycle.create(session, job)


@dataclass(frozen=True)
class Claim:
    job_id: str
    token: str
    attempt: int
    # Other jobs of the same task were queued on the same queue when the claim was made.
    neighbours: bool = False


@dataclass
class CancelOutcome:
    """What ``cancel_many`` did: queued jobs ended at once, running jobs asked to stop, and how
    many had already finished."""

    ended: list[str] = field(default_factory=list)
    flagged: list[str] = field(default_factory=list)
    already_final: int = 0


class ClaimRefused(Exception):
    """The job cannot run now (finished, cancelled, already running elsewhere, out of attempts)."""

    def __init__(self, reason: str, finalized: bool = False):
        super().__init__(reason)
        self.reason = reason
        # True when refusing also ended the job (cancelled, or failed at the attempt limit).
        self.finalized = finalized


_files: Table = StoredFile.__table__  # type: ignore[assignment]
_GET_JOB = select(Job.__table__).where(Job.__table__.c.id == bindparam("job_id"))


class JobStore:
    """Job writes against one database. ``on_notify`` is called, after the commit, with each move
    whose event waits for the dispatcher (a webhook wants it)."""

    def __init__(self, db: Database, max_attempts: int = 3, on_notify: Callable[[Moved], None] | None = None):
        self.db = db
        self.max_attempts = max_attempts
        self.on_notify = on_notify

    def _done(self, moved: Moved | None) -> Moved | None:
        """After the commit of a move: hand a pending event to ``on_notify``."""
        if moved is not None and moved.notify and self.on_notify is not None:
            self.on_notify(moved)
        return moved

    def _move(
        self, move: Any, job_id: str, now: datetime, token: str | None = None, **values: Any
    ) -> Moved | None:
        """One move in a transaction of its own, its event handed on after the commit."""
        with self.db.session() as session:
            moved = lifecycle.apply(session, move, job_id, now, token, **values)
        return self._done(moved)

    # -- reads ----------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        """The job as a detached ``Job``, or None (a prebuilt SELECT: polls and every task read it)."""
        with self.db.reading() as session:
            row = session.execute(_GET_JOB, {"job_id": job_id}).first()
            return None if row is None else job_from(row)

    def has_file(self, job_id: str, name: str) -> bool:
        """Whether the job has a stored file of this name: its final write, which inserts the
        output file rows in its own transaction, committed (one look-up on the primary key)."""
        with self.db.reading() as session:
            found = session.scalar(
                select(StoredFile.name).where(StoredFile.name == name, StoredFile.job_id == job_id)
            )
        return found is not None

    def cancel_requested(self, job_id: str) -> bool:
        with self.db.reading() as session:
            row = session.execute(select(Job.status, Job.cancel_requested).where(Job.id == job_id)).first()
            return row is None or bool(row.cancel_requested) or row.status in FINAL_STATUSES

    # -- the pipeline ---------------------------------------------------------------------------
    def set_prepared(self, job_id: str, inputs: dict[str, Any]) -> Job | None:
        """Record fetched inputs (the job is then at DISPATCHED, its next message on the way);
        returns the job as the move left it, or None when it left ``queued`` meanwhile."""
        now = utcnow()
        done = self._move(MOVES["prepare"], job_id, now, inputs=inputs, dispatched_at=now)
        return None if done is None else done.job

    def mark_dispatched(self, job_id: str) -> None:
        with self.db.session() as session:
            lifecycle.touch(session, "dispatched", job_id, utcnow())

    def claim(
        self, job_id: str, *, redelivered: bool, from_prepare: bool = False, remote: bool = False
    ) -> Claim:
        """``claim_job`` without the row."""
        return self.claim_job(job_id, redelivered=redelivered, from_prepare=from_prepare, remote=remote)[0]

    def claim_job(
        self, job_id: str, *, redelivered: bool, from_prepare: bool = False, remote: bool = False
    ) -> tuple[Claim, Job]:
        """Take a prepared job for running, with a fresh fencing token; returns the claim and the
        row as it is after the claim, from one UPDATE ... RETURNING (no read before or after).

        A first delivery may only take a ``queued`` job. A redelivered message (its worker died
        mid-run) may also re-take a ``running`` job where it was (a local run, or a submit or poll
        at a provider), counting another attempt; past the limit the job fails instead, so a job
        that kills its worker every time cannot loop forever.

        ``from_prepare``: the job may still be at phase PREPARING (sent to the run queue by the
        API because its inputs need no network); the worker checks the inputs itself.
        ``remote``: the claim is the submit task's: the job goes to a provider, not a local engine.

        The claim also says whether other jobs of the same task wait on the same queue
        (``Claim.neighbours``), so a batching engine looks for partners only when there are any.
        """
        now = utcnow()
        token = new_id()
        first = MOVES["claim_remote" if remote else "claim_direct" if from_prepare else "claim"]
        again = MOVES["reclaim_remote" if remote else "reclaim"]
        given: dict[str, Any] = {"new_token": token, "max_attempts": self.max_attempts}
        # A claim a database crash may lose is harmless: its job reads queued again, the lost
        # run's fenced finish matches nothing, and the sweep publishes the job again.
        moved = lifecycle.apply_alone(self.db, first, job_id, now, None, relaxed=True, **given)
        if moved is None:  # a redelivery, or a refusal: read and decided in a transaction of their own
            with self.db.session() as session:
                if redelivered:
                    moved = lifecycle.apply(session, again, job_id, now, None, relaxed=True, **given)
                if moved is None:
                    refusal, ended = self._refusal(session, job_id, redelivered, now)
        if moved is None:
            # Raised after the unit of work, so the final status written by _refusal is committed.
            self._done(ended)
            raise refusal
        self._done(moved)
        return Claim(job_id, token, moved.job.attempts, moved.neighbours), moved.job

    def _refusal(
        self, session: Session, job_id: str, redelivered: bool, now: datetime
    ) -> tuple[ClaimRefused, Moved | None]:
        """Why a claim was refused, ending the job where the refusal shows its run is over."""
        job = session.get(Job, job_id)
        if job is None:
            return ClaimRefused("job no longer exists"), None
        if job.status in FINAL_STATUSES:
            return ClaimRefused(f"job is already {job.status}"), None
        if job.cancel_requested:
            error = JobFailure.cancelled().as_error()
            ended = lifecycle.apply(session, MOVES["cancel_flagged"], job_id, now, error=error)
            return ClaimRefused("job was cancelled", finalized=ended is not None), ended
        if job.attempts >= self.max_attempts and (job.status == JobStatus.RUNNING.value or redelivered):
            error = JobFailure.worker_lost(job.attempts).as_error()
            ended = lifecycle.apply(
                session, MOVES["give_up"], job_id, now, error=error, max_attempts=self.max_attempts
            )
            return ClaimRefused("attempt limit reached", finalized=ended is not None), ended
        stale = f"job is {job.status} (stage {job.stage}); this copy of the message is stale"
        return ClaimRefused(stale), None

    def report_progress(self, claim: Claim, percent: int, detail: dict[str, Any] | None = None) -> bool:
        """Store progress (a ``progress`` move, fenced) and what the run reports beside it; returns
        True when the job has been asked to stop, or was taken from this claim."""
        with self.db.session() as session:
            moved = lifecycle.apply(
                session,
                MOVES["progress"],
                claim.job_id,
                utcnow(),
                claim.token,
                progress=max(0, min(99, percent)),
                progress_detail=detail,
            )
        self._done(moved)
        return moved is None or bool(moved.job.cancel_requested)

    def heartbeat(self, claim: Claim) -> bool:
        """Show the claim alive without a move; False when the job was asked to stop or the claim
        was lost (a remote submit checks this before each backend)."""
        with self.db.session() as session:
            row = lifecycle.touch(session, "heartbeat", claim.job_id, utcnow(), claim.token).first()
        return row is not None and not row.cancel_requested

    def finish(
        self,
        claim: Claim,
        status: JobStatus,
        *,
        result: dict[str, Any] | None = None,
        error: JobFailure | None = None,
        backend: str | None = None,
        files: Sequence[StoredFile] = (),
        retention: float | None = None,
        progress_detail: dict[str, Any] | None = None,
    ) -> Moved | None:
        """Write the final status of a claimed run (with its ``error`` unless it succeeded), its
        output files and its last progress detail (None keeps the stored one); None when the claim
        was fenced off."""
        now = utcnow()
        expires = now + timedelta(seconds=retention) if retention and files else None
        succeeded = status is JobStatus.SUCCEEDED
        rows = [
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
        ]
        also: list[tuple[Table, list[dict[str, Any]]]] = [(_files, rows)] if rows else []
        values: dict[str, Any] = {
            "result": result,
            "error": None if error is None else error.as_error(),
            "backend": backend or None,
            "expires_at": expires if succeeded else None,
            "progress_detail": progress_detail,
        }
        moved = lifecycle.apply_alone(
            self.db, finish_move(status), claim.job_id, now, claim.token, also=also, **values
        )
        if moved is not None:
            for stored in files:
                stored.expires_at = expires
        return self._done(moved)

    def fail(self, claim: Claim, failure: JobFailure, *, backend: str | None = None) -> Moved | None:
        """End a claimed run as ``failure`` says (failed, rejected, cancelled or expired)."""
        return self.finish(claim, failure.status, error=failure, backend=backend)

    def fail_unclaimed(self, job_id: str, failure: JobFailure) -> bool:
        """End a job that never ran (bad input found while preparing): from ``queued`` only."""
        move = _END_QUEUED[failure.status]
        return self._move(move, job_id, utcnow(), error=failure.as_error()) is not None

    def cancel(self, job_id: str) -> str:
        """Cancel a job: ``queued`` ends at once; ``running`` is flagged for its engine to stop.

        Returns the status the job has afterwards (``cancelled`` or ``running``), or raises
        ``ClaimRefused`` when it had already finished.
        """
        now = utcnow()
        error = JobFailure.cancelled("The job was cancelled by the client.").as_error()
        with self.db.session() as session:
            moved = lifecycle.apply(session, MOVES["cancel"], job_id, now, error=error)
            if moved is None:
                moved = lifecycle.apply(session, MOVES["request_cancel"], job_id, now)
            status = moved.job.status if moved else session.scalar(select(Job.status).where(Job.id == job_id))
        if moved is None:
            raise ClaimRefused(f"job is already {status}")
        self._done(moved)
        return moved.job.status

    def revoke(self, job_id: str) -> Moved | None:
        """End a live job ``cancelled`` (``revoked_by_operator``), queued or running, whoever holds
        its claim: an operator revoked one of its Celery tasks (``tasks.revocation``)."""
        return self._move(MOVES["revoke"], job_id, utcnow(), error=JobFailure.revoked().as_error())

    def cancel_many(self, job_ids: Sequence[str]) -> CancelOutcome:
        """``cancel`` for many jobs (``POST /v1/jobs/cancel``), each through the same moves, in one
        transaction; the caller checked that they are its own."""
        now = utcnow()
        error = JobFailure.cancelled("The job was cancelled by the client.").as_error()
        outcome = CancelOutcome()
        moves: list[Moved] = []
        with self.db.session() as session:
            for job_id in job_ids:
                moved = lifecycle.apply(session, MOVES["cancel"], job_id, now, error=error)
                if moved is not None:
                    outcome.ended.append(job_id)
                else:
                    moved = lifecycle.apply(session, MOVES["request_cancel"], job_id, now)
                    if moved is not None:
                        outcome.flagged.append(job_id)
                    elif session.scalar(select(Job.status).where(Job.id == job_id)) is not None:
                        outcome.already_final += 1  # a job deleted meanwhile is neither
                if moved is not None:
                    moves.append(moved)
        for moved in moves:
            self._done(moved)
        return outcome

    # -- a remote provider's side ---------------------------------------------------------------
    def record_remote(self, claim: Claim, backend: str, remote_id: str, next_poll_at: datetime) -> bool:
        """A provider accepted the job: its id, stored before the first poll."""
        moved = self._move(
            MOVES["submitted"],
            claim.job_id,
            utcnow(),
            claim.token,
            backend=backend,
            remote_id=remote_id,
            next_poll_at=next_poll_at,
        )
        return moved is not None

    def run_locally(self, claim: Claim, backend: str) -> bool:
        """The route fell through to a local engine: the job's run task takes it over."""
        moved = self._move(
            MOVES["run_locally"], claim.job_id, utcnow(), claim.token, backend=backend, remote_id=None
        )
        return moved is not None

    def resume(self, job: Job, token: str) -> Claim | None:
        """A fresh claim on a silent remote job, unless it was written since ``job`` was read."""
        if job.claim_token is None:
            return None
        moved = self._move(
            MOVES["resume"],
            job.id,
            utcnow(),
            job.claim_token,
            claim_token=token,
            next_poll_at=None,
            seen=job.updated_at,
        )
        if moved is None:
            return None
        return Claim(job.id, token, job.attempts)

    def set_next_poll(self, job_id: str, token: str, when: datetime | None) -> bool:
        with self.db.session() as session:
            return bool(rowcount(lifecycle.touch(session, "next_poll", job_id, utcnow(), token, when=when)))

    def record_inputs(self, claim: Claim, inputs: dict[str, Any], files: Sequence[StoredFile] = ()) -> bool:
        """Store the job's inputs (with new entries) and the files they name, under the claim."""
        with self.db.session() as session:
            if not rowcount(
                lifecycle.touch(session, "inputs", claim.job_id, utcnow(), claim.token, inputs=inputs)
            ):
                return False
            session.add_all(files)
            return True

    def lease_due(self, job: Job, limit: int, now: datetime, due_by: datetime, until: datetime) -> list[Job]:
        """Other running jobs at ``job``'s provider due to be polled by ``due_by``, leased until
        ``until`` (``next_poll_at``), so a second poll task running at the same time does not ask
        about them too."""
        if limit <= 0:
            return []
        with self.db.session() as session:
            candidates = list(
                session.scalars(
                    select(Job)
                    .where(
                        Job.backend == job.backend,
                        Job.id != job.id,
                        Job.status == JobStatus.RUNNING.value,
                        Job.stage == Phase.POLLING.value,
                        Job.claim_token.is_not(None),
                        Job.cancel_requested.is_(False),
                        func.coalesce(Job.next_poll_at, due_by) <= due_by,
                    )
                    .order_by(Job.next_poll_at)
                    .limit(limit)
                )
            )
            leased = [
                candidate
                for candidate in candidates
                if rowcount(
                    lifecycle.touch(
                        session, "lease", candidate.id, now, candidate.claim_token, due_by=due_by, when=until
                    )
                )
            ]
            session.expunge_all()
        return leased

    # -- sweeps ---------------------------------------------------------------------------------
    def expire_queued(self, ttl: float, now: datetime | None = None) -> list[str]:
        """Jobs still ``queued`` after their TTL end ``expired``."""
        now = now or utcnow()
        deadline = now - timedelta(seconds=ttl)
        error = JobFailure.expired(f"The job waited longer than its TTL of {ttl:g} s.").as_error()
        with self.db.session() as session:
            ids = list(
                session.scalars(
                    select(Job.id).where(Job.status == JobStatus.QUEUED.value, Job.queued_at < deadline)
                )
            )
        expired = []
        for job_id in ids:
            if self._move(MOVES["expire"], job_id, now, error=error) is not None:
                expired.append(job_id)
        return expired

    def stuck_jobs(self, older_than: float, now: datetime | None = None) -> list[tuple[str, str, str, int]]:
        """Queued jobs whose message may have been lost: (id, stage, queue, priority).

        A job that was sent (the API or a dispatcher marked it so; either may have died between
        its COMMIT and its publish), and whose last sending is older than ``older_than`` seconds, is
        published again; the claim's conditional UPDATE makes any duplicate message harmless. A job
        waiting for a slot (never sent, ``models.dispatch``) is not stuck: it waits its turn.
        """
        now = now or utcnow()
        cutoff = now - timedelta(seconds=older_than)
        with self.db.session() as session:
            rows = session.execute(
                select(Job.id, Job.stage, Job.queue, Job.priority).where(
                    Job.status == JobStatus.QUEUED.value,
                    Job.dispatched_at < cutoff,
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

    def delete_files(self, names: Sequence[str]) -> None:
        """Forget stored files by name (a remote job's public input copies, once it ended)."""
        if names:
            with self.db.session() as session:
                session.query(StoredFile).filter(StoredFile.name.in_(list(names))).delete()

    def delete(self, job_id: str) -> list[str]:
        """Delete a job with its files, deliveries and events; returns the file names to unlink."""
        with self.db.session() as session:
            names = list(session.scalars(select(StoredFile.name).where(StoredFile.job_id == job_id)))
            session.query(StoredFile).filter(StoredFile.job_id == job_id).delete()
            session.query(WebhookDelivery).filter(WebhookDelivery.job_id == job_id).delete()
            session.query(Job).filter(Job.id == job_id).delete()
            feed.announce(session, [job_id])  # a request waiting on it answers at once
            return names
