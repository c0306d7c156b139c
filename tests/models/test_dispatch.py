"""The fair-share dispatcher's choice and its bookkeeping, on the run's Postgres and on SQLite:
who gets a free slot, that no slot is overfilled, and that a queued job's position is the order
the dispatcher really uses."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from config import Settings
from models import dispatch, standing
from models.db import Database, utcnow
from models.dispatch import Head
from models.jobs import Job, JobEvent
from models.jobstore import JobStore
from models.migrate import upgrade
from models.public import iso
from models.state import JobStatus
from tests.support.factories import make_job, new_job
from tests.support.statements import sent_statements

T0 = utcnow()


def head(client: str, n: int, priority: int = 0) -> Head:
    return Head(f"{client}{n}", client, priority, T0 + timedelta(seconds=n))


def test_each_slot_goes_to_the_client_with_the_fewest_in_flight() -> None:
    heads = {"a": [head("a", i) for i in range(5)], "b": [head("b", 10)], "c": [head("c", 20), head("c", 21)]}
    picked = dispatch.fair_order(heads, {"a": 2}, 4)
    # b and c have none in flight (b's job is older), then c again (1 < a's 2), then a.
    assert [h.id for h in picked] == ["b10", "c20", "c21", "a0"]


def test_ties_go_to_the_higher_priority_then_the_older_job_and_caps_hold() -> None:
    heads = {"a": [head("a", 5, priority=9), head("a", 1)], "b": [head("b", 0)]}
    assert [h.id for h in dispatch.fair_order(heads, {}, 3)] == ["a5", "b0", "a1"]
    assert [h.id for h in dispatch.fair_order(heads, {"a": 1}, 3, caps={"a": 1})] == ["b0"]


@pytest.fixture(params=["postgres", "sqlite"])
def db(request: pytest.FixtureRequest, settings: Settings, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        settings = settings.with_overrides(database_url=f"sqlite:///{tmp_path / 'd.db'}")
    database = Database(settings)
    if request.param == "sqlite":
        upgrade(database)
    yield database
    database.dispose()


def waiting_job(db: Database, queue: str, client: str, n: int, priority: int = 0) -> str:
    return make_job(
        db,
        queue=queue,
        client_id=client,
        priority=priority,
        dispatched_at=None,
        created_at=T0 + timedelta(milliseconds=n),
        queued_at=T0 + timedelta(milliseconds=n),
    )


def turn(db: Database, queue: str, ahead: int = 0) -> list[str]:
    with db.session() as session:
        return [job.id for job in dispatch.take_turns(session, queue, utcnow(), ahead)]


def run_and_finish(db: Database, job_id: str) -> None:
    store = JobStore(db, 3)
    claim = store.claim(job_id, redelivered=False, from_prepare=True)
    store.finish(claim, JobStatus.SUCCEEDED, result={"ok": True})


def test_take_turns_fills_the_free_slots_fairly_and_never_more(db: Database) -> None:
    queue = f"q.{uuid.uuid4().hex[:8]}"
    a = [waiting_job(db, queue, "alice", i) for i in range(6)]
    b = waiting_job(db, queue, "bob", 100)
    with db.session() as session:
        dispatch.register(session, "w1@test", {queue: 2}, utcnow())
    first = turn(db, queue)
    assert first == [a[0], b]  # one each: bob's single job does not wait behind alice's backlog
    assert turn(db, queue) == []  # both slots taken: nothing more is sent
    run_and_finish(db, b)
    assert turn(db, queue) == [a[1]]
    with db.session() as session:
        assert standing.standing(session, Job(**{"status": "running"}), utcnow()) is None
        dispatch.forget(session, "w1@test")
    assert turn(db, queue, ahead=0) == []  # no worker: no slot
    assert turn(db, queue, ahead=3) == [a[2]]  # ``ahead`` beyond the workers' slots


def test_a_runs_end_asks_whether_anyone_waits_in_one_statement(db: Database) -> None:
    """``anyone_waits``, the look before a run's end fills its slot (``fill_slots``): a waiting job
    is seen until it is sent; on Postgres the look is one statement, with no ``BEGIN`` or
    ``COMMIT`` around it."""
    queue = f"q.{uuid.uuid4().hex[:8]}"
    with sent_statements(db) as sent:
        assert dispatch.anyone_waits(db, queue) is False
    if db.is_postgres:
        assert len(sent) == 1 and sent[0].startswith("SELECT 1 FROM jobs WHERE"), sent
    job = waiting_job(db, queue, "alice", 0)
    assert dispatch.anyone_waits(db, queue) is True
    assert dispatch.anyone_waits(db, f"{queue}.other") is False
    with db.session() as session:
        dispatch.register(session, "w6@test", {queue: 1}, utcnow())
    try:
        assert turn(db, queue) == [job]
        assert dispatch.anyone_waits(db, queue) is False  # sent: it waits no more
    finally:
        with db.session() as session:
            dispatch.forget(session, "w6@test")


def test_a_new_job_is_sent_at_once_only_when_a_slot_is_free_and_nobody_waits(db: Database) -> None:
    queue = f"q.{uuid.uuid4().hex[:8]}"
    with db.session() as session:
        dispatch.register(session, "w2@test", {queue: 1}, utcnow())

    def grant(job_id: str, ahead: int, max_running: int = 0) -> tuple[bool, bool]:
        with db.session() as session:
            job = session.get(Job, job_id)
            assert job is not None
            return dispatch.grant_new(session, job, utcnow(), ahead, max_running)

    first = waiting_job(db, queue, "alice", 0)
    assert grant(first, ahead=0) == (True, False)
    second = waiting_job(db, queue, "alice", 1)
    assert grant(second, ahead=0) == (False, False)  # the one slot is taken
    third = waiting_job(db, queue, "bob", 2)
    assert grant(third, ahead=1) == (False, True)  # a slot is free, but alice's second job waited first
    other, dave = f"q.{uuid.uuid4().hex[:8]}", f"dave-{uuid.uuid4().hex[:8]}"
    assert grant(waiting_job(db, other, dave, 3), ahead=5, max_running=1) == (True, False)
    capped = waiting_job(db, other, dave, 4)
    assert grant(capped, ahead=5, max_running=1) == (False, False)  # dave has one in flight already
    assert grant(capped, ahead=5, max_running=2) == (True, False)
    with db.session() as session:
        dispatch.forget(session, "w2@test")


def test_a_submit_takes_its_turn_in_its_own_insert_by_grant_new_s_rules(db: Database) -> None:
    """``insert_in_turn`` (one statement on Postgres) decides as ``grant_new`` does above, and
    writes the row already sent exactly when it was granted, with its ``job.queued`` event."""
    queue = f"q.{uuid.uuid4().hex[:8]}"
    with db.session() as session:
        dispatch.register(session, "w3@test", {queue: 1}, utcnow())

    def submit(queue: str, client: str, n: int, ahead: int, max_running: int = 0) -> tuple[bool, bool]:
        at = T0 + timedelta(milliseconds=n)
        job = new_job(queue=queue, client_id=client, dispatched_at=None, created_at=at, queued_at=at)
        body, granted, due, _ = dispatch.insert_in_turn(db, job, utcnow(), ahead, max_running)
        assert body["job_id"] == job.id and body["status"] == "queued"
        with db.session() as session:
            row = session.get(Job, job.id)
            events = session.execute(select(JobEvent.type).where(JobEvent.job_id == job.id)).scalars().all()
        assert row is not None and (row.dispatched_at is not None) == granted
        assert events == ["job.queued"]
        return granted, due

    assert submit(queue, "alice", 0, ahead=0) == (True, False)
    assert submit(queue, "alice", 1, ahead=0) == (False, False)  # the one slot is taken
    assert submit(queue, "bob", 2, ahead=1) == (False, True)  # free, but alice's second job waited first
    other, dave = f"q.{uuid.uuid4().hex[:8]}", f"dave-{uuid.uuid4().hex[:8]}"
    assert submit(other, dave, 3, ahead=5, max_running=1) == (True, False)
    assert submit(other, dave, 4, ahead=5, max_running=1) == (False, False)  # dave is at his limit
    with db.session() as session:
        dispatch.forget(session, "w3@test")


def test_the_queue_position_is_the_order_the_dispatcher_uses(db: Database) -> None:
    """Positions read before any dispatch equal the order in which the jobs are then sent, one
    slot at a time, with three clients of different backlogs and priorities."""
    queue = f"q.{uuid.uuid4().hex[:8]}"
    jobs = [waiting_job(db, queue, "alice", i) for i in range(5)]
    jobs += [waiting_job(db, queue, "bob", 10 + i) for i in range(2)]
    jobs += [waiting_job(db, queue, "carol", 20, priority=5), waiting_job(db, queue, "carol", 21)]
    with db.session() as session:
        dispatch.register(session, "w3@test", {queue: 1}, utcnow())
        rows = {job.id: job for job in session.query(Job).filter(Job.id.in_(jobs))}
        positions = {job_id: standing.standing(session, rows[job_id], utcnow(), ahead=0) for job_id in jobs}
    order = []
    for _ in jobs:
        [sent] = turn(db, queue)
        order.append(sent)
        run_and_finish(db, sent)
    assert sorted(jobs, key=lambda job_id: positions[job_id].position) == order  # type: ignore[union-attr]
    assert sorted(p.position for p in positions.values()) == list(range(len(jobs)))  # type: ignore[union-attr]
    assert all(p.slots == 1 for p in positions.values())  # type: ignore[union-attr]
    with db.session() as session:
        dispatch.forget(session, "w3@test")


def test_the_scheduler_state_counts_live_jobs_per_queue_and_client(db: Database) -> None:
    queue = f"q.{uuid.uuid4().hex[:8]}"
    for n in range(3):
        waiting_job(db, queue, "alice", n)
    waiting_job(db, queue, "bob", 10)
    make_job(db, queue=queue, client_id="bob", dispatched_at=utcnow())  # sent, not claimed
    with db.session() as session:
        dispatch.register(session, "w4@test", {queue: 3}, utcnow())
        [state] = standing.scheduler_state(session, [queue], utcnow(), ahead=1)
        dispatch.forget(session, "w4@test")
    assert (state.slots, state.ahead) == (3, 1)
    assert state.waiting == {"alice": 3, "bob": 1} and state.in_flight == {"bob": 1}


def test_playing_out_frees_the_oldest_slot_before_each_later_pick() -> None:
    """Alice's two jobs hold the queue's two places (one running, one sent); her other two and
    bob's three wait. Each later pick follows a job's end, so the clients alternate (bob first:
    he has none in flight) rather than bob taking the next two while alice's count is still 2."""
    heads = {"alice": [head("alice", 2), head("alice", 3)], "bob": [head("bob", 10 + i) for i in range(3)]}
    expected = ["bob10", "alice2", "bob11", "alice3", "bob12"]
    every = [h for hs in heads.values() for h in hs]
    order = list(standing.play_order(heads, ["alice", "alice"], 2, {"alice": T0}))
    places = {h.id: order.index(h.id) for h in every}
    assert sorted(places, key=places.__getitem__) == expected
    assert sorted(places.values()) == [0, 1, 2, 3, 4]


def test_a_place_deep_in_a_backlog_is_computed_without_playing_it_out(db: Database) -> None:
    queue = f"q.{uuid.uuid4().hex[:8]}"
    alice = [waiting_job(db, queue, "alice", i) for i in range(standing.PLAY_OUT_DEPTH + 50)]
    bob = [waiting_job(db, queue, "bob", 10_000 + i) for i in range(5)]
    urgent = waiting_job(db, queue, "alice", 20_000, priority=9)  # alice's newest, and her first
    with db.session() as session:
        rows = {job.id: job for job in session.query(Job).filter(Job.id.in_([alice[-1], bob[2], urgent]))}
        deep = standing.standing(session, rows[alice[-1]], utcnow())
        shallow = standing.standing(session, rows[bob[2]], utcnow())
        first = standing.standing(session, rows[urgent], utcnow())
    assert deep is not None and shallow is not None and first is not None
    # Her priority-9 job, all of her earlier jobs and bob's five go before her last one; bob's
    # third goes after alice's first three (the urgent one among them) and his own first two.
    assert deep.position == len(alice) + len(bob)
    assert shallow.position == 5
    assert first.position == 0


def test_jobs_placed_together_get_the_places_each_gets_alone(db: Database) -> None:
    """``standings`` (a stream following a batch: each client's order read once) against
    ``standing`` job by job: sent jobs, jobs near the head (played out) and deep in a backlog
    (closed form), two clients of mixed priorities; and the places of the waiting jobs are the
    next ones after the sent, each once."""
    queue = f"q.{uuid.uuid4().hex[:8]}"
    sent = [
        make_job(db, queue=queue, client_id="bob", dispatched_at=T0 + timedelta(seconds=n)) for n in range(2)
    ]
    waiting = [waiting_job(db, queue, "alice", i, priority=1 if i % 7 == 0 else 0) for i in range(230)]
    waiting += [waiting_job(db, queue, "bob", 1_000 + i, priority=i % 2) for i in range(6)]
    now = utcnow()
    with db.session() as session:
        dispatch.register(session, f"w.{queue}", {queue: 2}, now)
        jobs = list(session.scalars(select(Job).where(Job.queue == queue)))
        together = standing.standings(session, jobs, now, ahead=1)
        alone = {job.id: standing.standing(session, job, now, ahead=1) for job in jobs}
    assert set(together) == set(alone) == {*sent, *waiting}
    assert together == alone
    assert sorted(together[job_id].position for job_id in waiting) == list(range(2, 2 + len(waiting)))


def test_the_dispatchers_reads_walk_index_ranges_not_the_backlog(settings: Settings) -> None:
    """With 3,000 jobs waiting behind 30,000 of history, a fill and the place of a job near the
    head read a few index entries per look-up: the clients that wait (one probe each), each
    client's head (its first jobs), the jobs before the job (a range). A ``SELECT DISTINCT`` over
    the waiting, a client's order that was not the index's (a sort of all its jobs), or a ``LIMIT 1``
    the planner answers by reading the table from its start, read the backlog or the history."""
    db = Database(settings)
    queue = f"q.{uuid.uuid4().hex[:8]}"
    with db.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO jobs (id, client_id, task, engine_task, queue, status, stage, progress, priority,"
            " payload, metadata, attempts, cancel_requested, created_at, queued_at, updated_at, event_seq)"
            " SELECT md5(%(queue)s || g), CASE WHEN g <= 3 THEN 'bob' ELSE 'alice' END, 'upscale', 'upscale',"
            " %(queue)s, CASE WHEN g > 3003 THEN 'succeeded' ELSE 'queued' END, 'prepare', 0, mod(g, 3),"
            " '{}', '{}', 0, false, now() - interval '1 hour' + g * interval '1 millisecond', now(), now(), 1"
            " FROM generate_series(1, 33003) AS g ORDER BY g DESC",  # the history first on disk
            {"queue": queue},
        )
        conn.exec_driver_sql("ANALYZE jobs")
    statements: list[tuple[str, Any]] = []

    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            statements.append((statement, parameters))

    with db.session() as session:
        near_head = session.scalars(
            select(Job)
            .where(Job.queue == queue, Job.client_id == "alice")
            .order_by(Job.priority.desc(), Job.created_at)
            .limit(1)
        ).one()
    event.listen(db.engine, "before_cursor_execute", seen)
    try:
        with db.session() as session:
            place = standing.standing(session, near_head, utcnow(), ahead=3)
            picked = dispatch.take_turns(session, queue, utcnow(), ahead=3)
            session.rollback()
    finally:
        event.remove(db.engine, "before_cursor_execute", seen)
    assert place is not None and len(picked) == 3
    read = {}
    with db.engine.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        for statement, parameters in statements:
            cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters)
            read[statement] = rows_read(cursor.fetchone()[0][0]["Plan"])
        conn.rollback()
    db.dispose()
    assert read and max(read.values()) <= 50, {k[:300]: v for k, v in read.items() if v > 50}


def rows_read(plan: dict[str, Any]) -> int:
    """The rows a plan's scans of ``jobs`` returned (an index scan's entries, a sequential scan's
    whole table), over all their loops."""
    own = 0
    if plan.get("Relation Name") == "jobs":
        own = int(plan["Actual Rows"] * plan["Actual Loops"] + plan.get("Rows Removed by Filter", 0))
    return own + sum(rows_read(child) for child in plan.get("Plans", []))


def test_a_polls_read_places_each_job_as_standing_does(db: Database) -> None:
    """``read_live`` (GET /v1/jobs/{id}: the row and, for a sent job, its place in one statement)
    gives every job the place and slots ``standing`` gives it: sent jobs of mixed priorities and
    send times, jobs still waiting for a slot, a running job (no place)."""
    queue = f"q.{uuid.uuid4().hex[:8]}"
    sent = [
        make_job(
            db, queue=queue, client_id=client, priority=priority, dispatched_at=T0 + timedelta(seconds=n)
        )
        for n, (client, priority) in enumerate(
            [("alice", 0), ("bob", 5), ("alice", 5), ("bob", 0), ("carol", 0)]
        )
    ]
    waiting = [waiting_job(db, queue, "alice", 30 + n) for n in range(2)]
    running = make_job(db, queue=queue, client_id="bob", status="running", stage="local", started_at=T0)
    now = utcnow()
    with db.session() as session:
        dispatch.register(session, "w5@test", {queue: 2}, now)
        for job_id in [*sent, *waiting, running]:
            read = standing.read_live(session, job_id, now, ahead=1)
            assert read is not None
            job, body = read
            expected = standing.standing(session, job, now, ahead=1)
            if expected is None:
                assert job_id == running and body["queue_position"] is None
            else:
                assert body["queue_position"] == expected.position, job_id
                assert body["eta_utc"] == iso(expected.eta(now, job.predict_time))
        assert standing.read_live(session, uuid.uuid4().hex, now) is None
    # The same read as a unit of work of its own (a poll's, a stream's first word): the same
    # objects; on Postgres one statement on a bare cursor, unless the job still waits for a slot.
    for job_id in [*sent, *waiting, running]:
        with db.session() as session:
            in_session = standing.read_live(session, job_id, now, ahead=1)
        with sent_statements(db) as statements:
            alone = standing.read_live_alone(db, job_id, now, ahead=1)
        assert alone is not None and in_session is not None
        assert alone[1] == in_session[1] and alone[0].id == job_id, job_id
        if db.is_postgres and job_id not in waiting:
            assert len(statements) == 1, statements
    assert standing.read_live_alone(db, uuid.uuid4().hex, now) is None
    with db.session() as session:
        dispatch.forget(session, "w5@test")
    # The sent jobs by priority, then the time they were sent: bob's and alice's 5s, then the 0s.
    with db.session() as session:
        places = {job_id: standing.read_live(session, job_id, now)[1]["queue_position"] for job_id in sent}  # type: ignore[index]
    assert sorted(sent, key=places.__getitem__) == [sent[1], sent[2], sent[0], sent[3], sent[4]]
