"""The single submit's statement on Postgres (``models.dispatch.insert_in_turn``): PREPAREd once
per connection and run by ``EXECUTE`` with a generic plan, and sent as a plain statement, with the
same effect, where the server does not keep what was prepared (a pooler in transaction mode)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from models import dispatch
from models.db import Database, utcnow
from models.jobs import Job, JobEvent
from models.together import _Prepared
from tests.support.factories import new_job


@pytest.fixture
def queue(db: Database) -> Iterator[str]:
    name = f"q.{uuid.uuid4().hex[:8]}"
    with db.session() as session:
        dispatch.register(session, "prep@test", {name: 1}, utcnow())
    yield name
    with db.session() as session:
        dispatch.forget(session, "prep@test")


def submit(db: Database, queue: str) -> tuple[str, bool, bool]:
    job = new_job(queue=queue, client_id=f"c-{uuid.uuid4().hex[:6]}", dispatched_at=None)
    body, granted, due, _ = dispatch.insert_in_turn(db, job, utcnow(), 0)
    assert body["job_id"] == job.id
    with db.session() as session:
        row = session.get(Job, job.id)
        events = session.scalars(select(JobEvent.type).where(JobEvent.job_id == job.id)).all()
    assert row is not None and row.queue == queue and row.payload == job.payload
    assert (row.dispatched_at is not None) == granted and events == ["job.queued"]
    return job.id, granted, due


def prepared_here(db: Database) -> list[tuple[str, int]]:
    with db.statement() as cursor:
        cursor.execute("SELECT name, generic_plans FROM pg_prepared_statements WHERE name LIKE 'aiorch_%'")
        return list(cursor.fetchall())


def test_the_submit_is_prepared_once_per_connection_and_runs_a_generic_plan(db: Database, queue: str) -> None:
    assert [submit(db, queue)[1:] for _ in range(3)] == [(True, False), (False, False), (False, False)]
    for _ in range(8):
        submit(db, queue)
    [(name, generic)] = prepared_here(db)  # one pooled connection served them all: one statement
    assert generic >= 5  # after the server's five custom plans, no planning per submit


def test_where_the_server_forgets_it_the_plain_statement_is_sent_with_the_same_effect(
    db: Database, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_Prepared, "usable", True)
    submit(db, queue)
    with db.statement() as cursor:
        cursor.execute("DEALLOCATE ALL")  # what a pooler's other server session looks like
    assert submit(db, queue)[1:] == (False, False)  # EXECUTE failed: sent plain, nothing lost
    assert _Prepared.usable is False and prepared_here(db) == []
    assert submit(db, queue)[1:] == (False, False)  # and plain from then on
    assert prepared_here(db) == []
