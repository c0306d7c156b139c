"""JobControl, the RunControl a worker hands its engine, on the run's Postgres: progress writes are
throttled, the cancel flag is read on every step."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import event

from models.db import Database
from models.jobstore import JobStore
from tasks.jobs import PROGRESS_INTERVAL, JobControl
from tests.test_state_machine import make_job


@pytest.fixture()
def statements(db: Database) -> Iterator[list[str]]:
    """Every SQL statement the database engine sends, as the driver receives it."""
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        seen.append(" ".join(statement.split()))

    event.listen(db.engine, "before_cursor_execute", record)
    yield seen
    event.remove(db.engine, "before_cursor_execute", record)


def progress_writes(statements: list[str]) -> int:
    return sum(s.startswith("UPDATE jobs SET progress") for s in statements)


def test_progress_writes_are_throttled_and_cancel_is_seen_on_the_next_step(
    db: Database, statements: list[str]
) -> None:
    store = JobStore(db, max_attempts=3)
    job_id = make_job(db)
    control = JobControl(store, store.claim(job_id, redelivered=False))
    statements.clear()
    steps, cancel_at, step_s = 120, 90, 0.01
    stopped_at = None
    started = time.monotonic()
    for step in range(steps):
        # What the diffusion engine's step callback does: report progress, then ask.
        control.progress(100 * step / steps)
        if control.should_stop():
            stopped_at = step
            break
        if step == cancel_at:
            assert store.cancel(job_id) == "running"  # the API's cancel of a running job
        time.sleep(step_s)
    elapsed = time.monotonic() - started

    # Cancelled after step 90: the very next step's check sees it.
    assert stopped_at == cancel_at + 1
    # ~1 s of steps: one write at the start and one per PROGRESS_INTERVAL after, not one per step.
    writes = progress_writes(statements)
    assert 2 <= writes <= 1 + elapsed / PROGRESS_INTERVAL + 1, (writes, elapsed)
    assert writes < stopped_at / 10


def test_a_cancel_seen_once_stays_seen_without_more_queries(db: Database, statements: list[str]) -> None:
    store = JobStore(db, max_attempts=3)
    job_id = make_job(db)
    control = JobControl(store, store.claim(job_id, redelivered=False))
    store.cancel(job_id)
    assert control.should_stop()
    statements.clear()
    assert all(control.should_stop() for _ in range(5))
    assert statements == []
