"""The lifecycle table and its compiled moves, on the run's Postgres and on SQLite: exactly the legal
moves succeed, each writes one event to the job's log, and the log's pending events are taken once."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError

from models import lifecycle, outbox
from models.db import Database, utcnow
from models.failures import JobFailure
from models.jobs import Job, JobEvent
from models.jobstore import JobStore, new_id
from models.state import (
    ENDED,
    FINAL_STATUSES,
    LIVE_STATES,
    MOVES,
    STATES,
    TRANSITIONS,
    Event,
    Guard,
    IllegalTransition,
    JobStatus,
    Move,
    State,
    sources_of,
    state_of,
)
from tests.support.factories import make_job
from tests.support.statements import sent_statements

TOKEN = "t" * 32
MAX_ATTEMPTS = 3


# -- the table, without a database -------------------------------------------------------------------


def test_final_states_have_no_way_out_and_every_live_state_can_end() -> None:
    for move in MOVES.values():
        assert all(not source.final for source in move.sources), move.name
        for source in move.sources:
            assert move.after(source) in STATES
    for state in LIVE_STATES:
        assert any(move.after(state).final for move in MOVES.values() if move.allows(state)), state
    with pytest.raises(IllegalTransition):
        MOVES["claim"].after(ENDED[JobStatus.SUCCEEDED])


# Every legal move, as a reader of the README's diagram expects it: the table may only change
# together with this list.
LEGAL = {
    "prepare": {"queued/prepare -> queued/run"},
    "claim": {"queued/run -> running/local"},
    "claim_direct": {"queued/prepare -> running/local", "queued/run -> running/local"},
    "claim_remote": {"queued/run -> running/submit"},
    "reclaim": {"running/local -> running/local"},
    "reclaim_remote": {"running/submit -> running/submit", "running/poll -> running/poll"},
    "submitted": {"running/submit -> running/poll"},
    "run_locally": {"running/submit -> running/local", "running/poll -> running/local"},
    "resume": {"running/submit -> running/submit", "running/poll -> running/poll"},
    "progress": {f"running/{p} -> running/{p}" for p in ("local", "submit", "poll")},
    "request_cancel": {f"running/{p} -> running/{p}" for p in ("local", "submit", "poll")},
    "cancel": {"queued/prepare -> cancelled/done", "queued/run -> cancelled/done"},
    "expire": {"queued/prepare -> expired/done", "queued/run -> expired/done"},
    "fail": {"queued/prepare -> failed/done", "queued/run -> failed/done"},
    **{
        f"finish_{status}": {f"running/{p} -> {status}/done" for p in ("local", "submit", "poll")}
        for status in ("succeeded", "failed", "rejected", "cancelled", "expired")
    },
    "cancel_flagged": {f"running/{p} -> cancelled/done" for p in ("local", "submit", "poll")},
    "revoke": {
        f"{s} -> cancelled/done"
        for s in ("queued/prepare", "queued/run", *(f"running/{p}" for p in ("local", "submit", "poll")))
    },
    "give_up": {
        f"{s} -> failed/done"
        for s in ("queued/prepare", "queued/run", *(f"running/{p}" for p in ("local", "submit", "poll")))
    },
}


def test_the_table_holds_exactly_the_legal_moves() -> None:
    table = {name: {f"{s} -> {move.after(s)}" for s in move.sources} for name, move in MOVES.items()}
    assert table == LEGAL


def test_the_status_projection_of_the_table() -> None:
    assert TRANSITIONS[JobStatus.QUEUED] == {
        JobStatus.RUNNING,
        JobStatus.FAILED,
        JobStatus.CANCELLED,
        JobStatus.EXPIRED,
    }
    assert TRANSITIONS[JobStatus.RUNNING] == FINAL_STATUSES
    assert all(TRANSITIONS[status] == frozenset() for status in FINAL_STATUSES)
    assert sources_of(JobStatus.RUNNING) == ("queued",)
    assert set(sources_of(JobStatus.SUCCEEDED)) == {"running"}


def test_every_move_that_ends_a_job_writes_job_finished_and_no_other_does() -> None:
    for move in MOVES.values():
        ends = move.target is not None and move.target.final
        assert (move.event is Event.FINISHED) == ends, move.name


def test_a_row_with_an_unknown_status_and_stage_pair_is_no_state() -> None:
    assert state_of("running", "poll") in STATES
    with pytest.raises(ValueError):
        state_of("running", "run")  # the stage a running job had before phases were typed


def test_touches_never_write_a_column_that_only_moves_write() -> None:
    for name, statement in lifecycle.TOUCHES.items():
        sql = str(statement.compile(dialect=postgresql.dialect()))
        assigned = set(re.findall(r"(\w+)=", sql.split(" SET ", 1)[1].split(" WHERE ", 1)[0]))
        assert assigned and not assigned & lifecycle.MOVE_COLUMNS, (name, assigned)


# -- every (state, move) pair against a real database ------------------------------------------------


def job_in(db: Database, state: State, move: Move) -> str:
    """A job in ``state`` whose row meets ``move``'s guards, so only its state decides."""
    old = utcnow() - timedelta(hours=1)
    return make_job(
        db,
        status=state.status.value,
        stage=state.phase.value,
        claim_token=TOKEN,
        attempts=MAX_ATTEMPTS if Guard.AT_LIMIT in move.guards else 1,
        cancel_requested=Guard.CANCELLING in move.guards,
        event_seq=4,
        updated_at=old,
        webhook_url="http://127.0.0.1:9/hook",
    )


SAMPLES: dict[str, Any] = {
    "inputs": {"image_url": {"path": "/x.png", "ext": "png", "width": 8, "height": 8}},
    "backend": "st",
    "remote_id": "remote-1",
    "claim_token": "n" * 32,
    "progress": 42,
    "result": {"ok": True},
    "error": {"code": "x", "message": "y"},
    "expires_at": None,
    "new_token": "n" * 32,
    "max_attempts": MAX_ATTEMPTS,
}


def given_for(move: Move) -> dict[str, Any]:
    now = utcnow()
    accepted = lifecycle._ACCEPTS[move.name]  # what apply() checks the caller against
    values = {name: SAMPLES.get(name) for name in accepted}
    for name in ("dispatched_at", "next_poll_at"):
        if name in accepted:
            values[name] = now
    if "seen" in accepted:
        values["seen"] = now
    return values


def row_of(db: Database, job_id: str) -> tuple[Job, list[JobEvent]]:
    with db.session() as session:
        job = session.get(Job, job_id)
        events = list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)))
        session.expunge_all()
    assert job is not None
    return job, events


@pytest.mark.parametrize("name", sorted(MOVES))
def test_exactly_the_legal_moves_succeed_from_every_state(database: Database, name: str) -> None:
    move = MOVES[name]
    for state in STATES:
        job_id = job_in(database, state, move)
        with database.session() as session:
            moved = lifecycle.apply(session, move, job_id, utcnow(), TOKEN, **given_for(move))
        job, events = row_of(database, job_id)
        if not move.allows(state):
            assert moved is None, f"{name} moved a job from {state}"
            assert (job.status, job.stage, job.event_seq, events) == (
                state.status.value,
                state.phase.value,
                4,
                [],
            ), f"{name} wrote a job in {state}"
            continue
        assert moved is not None, f"{name} refused a job in {state}"
        after = move.after(state)
        assert (job.status, job.stage) == (after.status.value, after.phase.value)
        assert moved.job.status == job.status and moved.seq == job.event_seq == 5
        [logged] = events
        assert (logged.seq, logged.type) == (5, move.event.value)
        assert logged.data["status"] == job.status and logged.data["job_id"] == job_id
        assert logged.data["attempts"] == job.attempts and logged.data["progress"] == job.progress
        if after.final:
            assert job.finished_at is not None


@pytest.mark.parametrize("name", sorted(n for n, m in MOVES.items() if m.fenced))
def test_a_fenced_move_needs_the_current_claim_token(db: Database, name: str) -> None:
    move = MOVES[name]
    source = min(move.sources, key=str)
    job_id = job_in(db, source, move)
    with db.session() as session:
        assert lifecycle.apply(session, move, job_id, utcnow(), "f" * 32, **given_for(move)) is None
        with pytest.raises(IllegalTransition):
            lifecycle.apply(session, move, job_id, utcnow(), None, **given_for(move))
    job, events = row_of(db, job_id)
    assert (job.status, job.stage, events) == (source.status.value, source.phase.value, [])


def test_a_move_refuses_a_column_it_does_not_write(db: Database) -> None:
    job_id = make_job(db, status="running", stage="local", claim_token=TOKEN)
    with db.session() as session, pytest.raises(TypeError):
        lifecycle.apply(session, MOVES["progress"], job_id, utcnow(), TOKEN, progress=5, result={"ok": True})


def test_claims_honour_the_cancel_flag_and_the_attempt_limit(db: Database) -> None:
    flagged = make_job(db, cancel_requested=True)
    spent = make_job(db, attempts=MAX_ATTEMPTS)
    given = {"new_token": new_id(), "max_attempts": MAX_ATTEMPTS}
    with db.session() as session:
        assert lifecycle.apply(session, MOVES["claim"], flagged, utcnow(), **given) is None
        assert lifecycle.apply(session, MOVES["claim"], spent, utcnow(), **given) is None


# -- the log --------------------------------------------------------------------------------------------


def pending(db: Database, job_id: str) -> list[str]:
    with db.session() as session:
        return list(
            session.scalars(
                select(JobEvent.type)
                .where(JobEvent.job_id == job_id, JobEvent.dispatched_at.is_(None))
                .order_by(JobEvent.seq)
            )
        )


def test_only_events_a_webhook_wants_wait_for_the_dispatcher(db: Database) -> None:
    store = JobStore(db)
    quiet = make_job(db)
    hooked = make_job(db, webhook_url="http://127.0.0.1:9/hook")
    opted = make_job(db, webhook_url="http://127.0.0.1:9/hook", webhook_events=["job.progress"])
    for job_id in (quiet, hooked, opted):
        claim = store.claim(job_id, redelivered=False)
        store.report_progress(claim, 30)
        store.finish(claim, JobStatus.SUCCEEDED, result={"ok": True})
    assert pending(db, quiet) == []
    assert pending(db, hooked) == ["job.finished"]
    assert pending(db, opted) == ["job.progress", "job.finished"]
    with db.session() as session:
        types = list(
            session.scalars(select(JobEvent.type).where(JobEvent.job_id == quiet).order_by(JobEvent.seq))
        )
    assert types == ["job.started", "job.progress", "job.finished"]


def test_the_store_kicks_after_the_commit_only_for_a_pending_event(db: Database) -> None:
    seen: list[tuple[str, str, list[str]]] = []
    other = JobStore(db)

    def kick(moved: lifecycle.Moved) -> None:
        # Called after the commit: another connection already sees the event.
        seen.append((moved.job.id, moved.event.value, pending(db, moved.job.id)))

    store = JobStore(db, on_notify=kick)
    hooked = make_job(db, webhook_url="http://127.0.0.1:9/hook")
    quiet = make_job(db)
    for job_id in (hooked, quiet):
        claim = store.claim(job_id, redelivered=False)
        store.finish(claim, JobStatus.FAILED, error=JobFailure("x", "y"))
    assert seen == [(hooked, "job.finished", ["job.finished"])]
    assert other.get(hooked).status == "failed"


def test_a_claim_is_one_update_returning_and_one_event_insert(db: Database) -> None:
    job_id = make_job(db)
    with sent_statements(db) as statements:
        JobStore(db).claim(job_id, redelivered=False)
    words = [part.split()[0].upper() for s in statements for part in re.split(r";\s+", s)]
    assert [w for w in words if w not in ("SET", "BEGIN", "COMMIT")] == ["UPDATE", "INSERT"]
    if db.is_postgres:
        # Two round trips: BEGIN with the UPDATE, then the relaxed commit's setting, the event and
        # COMMIT (through a session it was four: BEGIN and COMMIT each cost one).
        assert len(statements) == 2
        assert words == ["BEGIN", "UPDATE", "SET", "INSERT", "COMMIT"]
        assert "synchronous_commit" in statements[1]


def test_pending_events_are_taken_once_and_left_overs_only_when_old(db: Database) -> None:
    store = JobStore(db)
    job_id = make_job(db, webhook_url="http://127.0.0.1:9/hook")
    store.finish(store.claim(job_id, redelivered=False), JobStatus.SUCCEEDED, result={"ok": True})
    now = utcnow()
    with db.session() as session:
        young = outbox.take_left_over(session, now, now - timedelta(seconds=60))
        assert job_id not in {e.job_id for e in young}  # its kick may still be on the way
        session.rollback()
    with db.session() as session:
        [taken] = outbox.take_pending(session, job_id, now)
    assert (taken.type, taken.seq, taken.data["status"]) == ("job.finished", 2, "succeeded")
    with db.session() as session:
        assert outbox.take_pending(session, job_id, now) == []
    later = make_job(db, webhook_url="http://127.0.0.1:9/hook")
    store.finish(store.claim(later, redelivered=False), JobStatus.SUCCEEDED, result={"ok": True})
    with db.session() as session:
        left = outbox.take_left_over(session, utcnow(), utcnow() + timedelta(seconds=1))
    assert later in {e.job_id for e in left}


def test_old_events_are_pruned(db: Database) -> None:
    job_id = make_job(db)
    JobStore(db).claim(job_id, redelivered=False)
    with db.session() as session:
        outbox.prune(session, utcnow() - timedelta(days=1))
        assert [e.type for e in outbox.events_of(session, job_id)] == ["job.started"]
        assert outbox.prune(session, utcnow() + timedelta(seconds=1)) >= 1
        assert outbox.events_of(session, job_id) == []


@pytest.mark.parametrize("many", [False, True])
def test_a_create_that_reuses_an_idempotency_key_raises_integrity_error_and_writes_nothing(
    database: Database, many: bool
) -> None:
    # The API's idempotency race handling catches SQLAlchemy's IntegrityError, whatever way the
    # rows were written (COPY, one round trip of two INSERTs, or SQLAlchemy's own executemany).
    now = utcnow()
    key = f"k-{new_id()}"

    def fresh(**overrides: Any) -> Job:
        values: dict[str, Any] = dict(
            id=new_id(), client_id="alice", task="upscale", engine_task="upscale", queue="gpu.superres",
            progress=0, priority=0, payload={"s": "a\\b\tc\nd"}, meta={}, attempts=0, cancel_requested=False,
            created_at=now, queued_at=now, updated_at=now, idempotency_key=key,
        )  # fmt: skip
        values.update(overrides)
        return Job.transient(**values)

    with database.session() as session:
        lifecycle.create(session, fresh())
    second = [fresh(idempotency_key=f"other-{new_id()}"), fresh()]
    with pytest.raises(IntegrityError), database.session() as session:
        if many:
            lifecycle.create_many(session, second)
        else:
            lifecycle.create(session, second[1])
    with database.session() as session:
        ids = {job.id for job in second}
        assert session.scalars(select(Job.id).where(Job.id.in_(ids))).all() == []
        assert session.scalars(select(JobEvent.id).where(JobEvent.job_id.in_(ids))).all() == []
        stored = session.scalars(select(Job.payload).where(Job.idempotency_key == key)).one()
    assert stored == {"s": "a\\b\tc\nd"}
