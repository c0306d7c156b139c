"""A run's final write that the database took but never answered (the connection dropped between
its commit and its reply): ``tasks.outputs.record_outcome`` waits for the database, writes again,
and tells its own committed write from another run's by the job's stored file rows."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from config import Settings
from models.assets import OUTPUT, output_asset
from models.db import Database
from models.jobs import StoredFile
from models.jobstore import JobStore
from models.state import JobStatus
from tasks.outputs import record_outcome
from tasks.runtime import Runtime
from tests.support.factories import make_job

DEBUG = dict(task="debug_sleep", engine_task="debug_sleep", queue="gpu.diffusion")
DROPPED = OperationalError("COMMIT", None, Exception("server closed the connection unexpectedly"))


@pytest.fixture
def rt(settings: Settings, tmp_path: Any) -> Runtime:
    return Runtime(settings.with_overrides(storage_dir=tmp_path / "storage"))


def output(rt: Runtime, job_id: str) -> StoredFile:
    saved = rt.storage.save_output(b"\x89PNG fake", "png")
    return output_asset(saved.name, job_id, "alice", saved.content_type, saved.size, 1, 1)


def result_of(files: list[StoredFile]) -> dict[str, Any]:
    return {"ok": True, "status": JobStatus.SUCCEEDED.value, "filename": files[0].name}


def answer_lost_once(rt: Runtime, monkeypatch: pytest.MonkeyPatch, before: Any = None) -> None:
    """The store's next ``finish`` runs ``before`` (another run's write), then its own, which
    commits, and then raises as a dropped connection does; the one after it runs as it is."""
    finish = rt.store.finish

    def once(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(rt.store, "finish", finish)
        if before is not None:
            before()
        finish(*args, **kwargs)
        raise DROPPED

    monkeypatch.setattr(rt.store, "finish", once)


def claimed_with_output(rt: Runtime, db: Database) -> tuple[str, Any, list[StoredFile]]:
    """A running job's id, its claim and the output its run stored."""
    job_id = make_job(db, **DEBUG)
    return job_id, rt.store.claim(job_id, redelivered=False), [output(rt, job_id)]


def test_a_committed_final_write_whose_answer_was_lost_is_the_runs_own_and_keeps_its_outputs(
    rt: Runtime, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, claim, files = claimed_with_output(rt, db)
    answer_lost_once(rt, monkeypatch)
    assert record_outcome(rt, claim, None, result=result_of(files), files=files, backend="debug")
    job = JobStore(db).get(job_id)
    assert job is not None and job.status == JobStatus.SUCCEEDED.value
    assert rt.storage.read_file(OUTPUT, files[0].name) is not None


def test_a_write_fenced_off_by_another_runs_finish_is_not_the_runs_own_and_deletes_its_outputs(
    rt: Runtime, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, claim, files = claimed_with_output(rt, db)

    def revoked() -> None:
        rt.store.revoke(job_id)  # the job ends without this run: its own write is then fenced off

    answer_lost_once(rt, monkeypatch, before=revoked)
    assert not record_outcome(rt, claim, None, result=result_of(files), files=files, backend="debug")
    assert not rt.store.has_file(job_id, files[0].name)
    assert rt.storage.read_file(OUTPUT, files[0].name) is None
