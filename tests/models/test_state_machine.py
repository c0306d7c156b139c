"""The conditional claims, finishes and cancels of ``JobStore``, moves of the job lifecycle, on the
run's Postgres (the lifecycle table itself: tests/models/test_lifecycle.py)."""

from __future__ import annotations

import pytest

from models.db import Database
from models.failures import JobFailure
from models.jobstore import ClaimRefused, JobStore
from models.state import FINAL_STATUSES, JobStatus, sources_of
from tests.support.factories import make_job


def test_a_claim_and_a_success_set_their_timestamps_and_progress(db: Database) -> None:
    store = JobStore(db)
    job_id = make_job(db, progress=10)
    claim, claimed = store.claim_job(job_id, redelivered=False)
    assert claimed.started_at is not None and claimed.finished_at is None
    finished = store.finish(claim, JobStatus.SUCCEEDED, result={"ok": True})
    assert finished is not None
    assert finished.job.finished_at is not None and finished.job.progress == 100
    assert finished.job.stage == "done"


def test_sources_of_matches_the_table() -> None:
    assert sources_of(JobStatus.RUNNING) == ("queued",)
    assert set(sources_of(JobStatus.CANCELLED)) == {"queued", "running"}
    assert set(sources_of(JobStatus.EXPIRED)) == {"queued", "running"}
    assert all(status not in sources_of(target) for status in FINAL_STATUSES for target in JobStatus)


def test_a_job_is_claimed_once_and_a_stale_copy_is_refused(db: Database) -> None:
    store = JobStore(db, max_attempts=3)
    job_id = make_job(db)
    claim = store.claim(job_id, redelivered=False)
    assert claim.attempt == 1
    with pytest.raises(ClaimRefused):
        store.claim(job_id, redelivered=False)  # a duplicate message of a running job


def test_a_redelivered_claim_fences_off_the_earlier_run(db: Database) -> None:
    store = JobStore(db, max_attempts=3)
    job_id = make_job(db)
    first = store.claim(job_id, redelivered=False)
    second = store.claim(job_id, redelivered=True)
    assert second.attempt == 2
    assert store.finish(first, JobStatus.SUCCEEDED, result={"ok": True}) is None
    assert store.finish(second, JobStatus.SUCCEEDED, result={"ok": True}) is not None
    assert store.get(job_id).status == "succeeded"


def test_attempt_limit_fails_the_job(db: Database) -> None:
    store = JobStore(db, max_attempts=2)
    job_id = make_job(db)
    store.claim(job_id, redelivered=False)
    store.claim(job_id, redelivered=True)
    with pytest.raises(ClaimRefused) as refused:
        store.claim(job_id, redelivered=True)
    assert refused.value.finalized
    job = store.get(job_id)
    assert job.status == "failed" and job.error["code"] == "worker_lost" and job.attempts == 2


def test_finished_and_cancelled_jobs_are_never_claimed(db: Database) -> None:
    store = JobStore(db)
    done = make_job(db, status="succeeded", stage="done")
    with pytest.raises(ClaimRefused):
        store.claim(done, redelivered=True)
    queued = make_job(db)
    assert store.cancel(queued) == "cancelled"
    with pytest.raises(ClaimRefused):
        store.claim(queued, redelivered=True)
    assert store.get(queued).status == "cancelled"


def test_cancelling_a_running_job_flags_it_and_its_finish_is_cancelled(db: Database) -> None:
    store = JobStore(db)
    job_id = make_job(db)
    claim = store.claim(job_id, redelivered=False)
    assert store.cancel(job_id) == "running"
    assert store.cancel_requested(job_id) is True
    assert store.finish(claim, JobStatus.CANCELLED, error=JobFailure.cancelled("x"))
    with pytest.raises(ClaimRefused):
        store.cancel(job_id)


def test_progress_is_clamped_below_100_until_success(db: Database) -> None:
    store = JobStore(db)
    job_id = make_job(db)
    claim = store.claim(job_id, redelivered=False)
    store.report_progress(claim, 150)
    assert store.get(job_id).progress == 99


def test_a_claim_says_whether_jobs_of_its_task_wait_on_its_queue(db: Database) -> None:
    store = JobStore(db, max_attempts=3)
    queue = "gpu.neighbours-" + make_job(db)[:8]  # a queue no other test uses
    alone = make_job(db, queue=queue)
    assert store.claim(alone, redelivered=False).neighbours is False
    first, second = make_job(db, queue=queue), make_job(db, queue=queue)
    make_job(db, queue=queue, engine_task="scan_objects")  # another task on the queue: not a partner
    assert store.claim(first, redelivered=False).neighbours is True
    assert store.claim(second, redelivered=False).neighbours is False


def test_a_claim_from_prepare_takes_a_job_the_api_sent_straight_to_its_run_queue(db: Database) -> None:
    store = JobStore(db, max_attempts=3)
    direct = make_job(db, stage="prepare")
    with pytest.raises(ClaimRefused):
        store.claim(direct, redelivered=False)  # an ordinary run message waits for the prepare task
    claim, job = store.claim_job(direct, redelivered=False, from_prepare=True)
    assert (job.status, job.stage, job.attempts, job.claim_token) == ("running", "local", 1, claim.token)
    assert job.started_at is not None and job.inputs is None  # the run task checks them next
    assert store.finish(claim, JobStatus.FAILED, error=JobFailure("input_not_image", "x"))
    assert store.get(direct).error["code"] == "input_not_image"


def test_a_pooled_connection_that_died_while_idle_is_replaced_before_use(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Postgres restart or an idle timeout closes pooled connections; the next checkout after
    an idle spell pings its connection and opens a new one instead of failing a job."""
    from sqlalchemy import text

    import models.db
    from tests.conftest import _pg_admin

    with db.session() as session:
        pid = session.scalar(text("SELECT pg_backend_pid()"))
    _pg_admin(f"SELECT pg_terminate_backend({int(pid)})")  # from outside the pool, as a restart would
    monkeypatch.setattr(models.db, "IDLE_PING_SECONDS", 0.0)
    with db.session() as session:
        assert session.scalar(text("SELECT pg_backend_pid()")) != pid
