"""A move as a unit of work of its own on Postgres (``lifecycle.apply_alone``: the claim and the
final write of every job): what it writes and returns is what the session path writes and
returns, a failure leaves nothing behind (no half-made move, no connection left in a
transaction), and errors come out as SQLAlchemy's."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from models.db import Database
from models.jobs import Job, JobEvent, StoredFile
from models.jobstore import JobStore
from models.lifecycle import job_from
from models.state import JobStatus
from tests.support.factories import make_job

pytestmark = pytest.mark.usefixtures("db")


def as_read(db: Database, job_id: str) -> Job:
    with db.session() as session:
        return job_from(session.execute(select(Job.__table__).where(Job.id == job_id)).one())


def attributes(job: Job) -> dict[str, object]:
    return {key: value for key, value in vars(job).items() if not key.startswith("_")}


def in_transaction(db: Database) -> int:
    """Sessions of this database that sit idle inside a transaction."""
    with db.engine.connect() as conn:
        query = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
        )
        return int(conn.execute(text(query)).scalar() or 0)


def a_file(job_id: str, name: str) -> StoredFile:
    return StoredFile(
        name=name, asset_id=uuid.uuid4().hex, kind="output", job_id=job_id, client_id="alice",
        filename="out.png", content_type="image/png", size=3, width=1, height=1,
    )  # fmt: skip


def test_the_claim_and_the_finish_return_the_rows_they_wrote(db: Database) -> None:
    store = JobStore(db)
    job_id = make_job(db, client_id="alice")
    claim, claimed = store.claim_job(job_id, redelivered=False)
    assert claimed.status == "running" and claimed.claim_token == claim.token and claimed.attempts == 1
    assert attributes(claimed) == attributes(as_read(db, job_id))  # every column, times in UTC
    assert claimed.started_at is not None and claimed.started_at.utcoffset().total_seconds() == 0
    moved = store.finish(claim, JobStatus.SUCCEEDED, result={"ok": True}, files=[a_file(job_id, "a.png")])
    assert moved is not None and moved.job.status == "succeeded" and moved.job.result == {"ok": True}
    assert attributes(moved.job) == attributes(as_read(db, job_id))
    with db.session() as session:
        events = session.execute(select(JobEvent.seq, JobEvent.type).where(JobEvent.job_id == job_id)).all()
        assert sorted(events) == [(1, "job.started"), (2, "job.finished")]
        assert session.get(StoredFile, "a.png") is not None


def test_a_refused_move_changes_nothing_and_ends_its_transaction(db: Database) -> None:
    store = JobStore(db)
    claim, _ = store.claim_job(make_job(db), redelivered=False)
    stale = type(claim)(claim.job_id, "not-the-token", claim.attempt, False)
    assert store.finish(stale, JobStatus.SUCCEEDED, result={"ok": True}) is None
    assert as_read(db, claim.job_id).status == "running"
    assert in_transaction(db) == 0


def test_a_failed_write_rolls_the_whole_move_back(db: Database) -> None:
    store = JobStore(db)
    taken = make_job(db, client_id="alice")
    with db.session() as session:
        session.add(a_file(taken, "taken.png"))
    job_id = make_job(db, client_id="alice")
    claim, _ = store.claim_job(job_id, redelivered=False)
    # The file's name is taken: the second round trip fails, after the UPDATE had matched.
    with pytest.raises(IntegrityError):
        store.finish(claim, JobStatus.SUCCEEDED, result={"ok": True}, files=[a_file(job_id, "taken.png")])
    assert in_transaction(db) == 0  # the connection went back to the pool with nothing open
    job = as_read(db, job_id)
    assert job.status == "running" and job.result is None and job.event_seq == 1  # nothing of it
    # The claim still holds, and the pool's connections work: the run's next write goes through.
    for _ in range(5):  # whichever pooled connection it gets
        probe = make_job(db)
        store.finish(store.claim_job(probe, redelivered=False)[0], JobStatus.SUCCEEDED, result={})
    assert store.finish(claim, JobStatus.SUCCEEDED, result={"ok": True}) is not None
    assert as_read(db, job_id).status == "succeeded"
