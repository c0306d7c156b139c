"""The ``/metrics`` counters (``models.counters``): the move that ends a job counts it, in its own
transaction, on the run's Postgres and on SQLite; nothing else counts it again and deleting jobs
lowers nothing; a scrape reads one row per series, not the jobs (100,000 final jobs on Postgres);
migration 0006 back-fills the counters with what the old scrape-time aggregate said."""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import SQLColumnExpression, case, event, func, insert, select, text
from sqlalchemy.orm import Session

from config import Settings
from models import counters, lifecycle
from models.db import Database, utcnow
from models.failures import JobFailure
from models.jobs import Job, WebhookDelivery
from models.jobstore import JobStore, new_id
from models.migrate import upgrade
from models.state import FINAL_STATUSES, MOVES, JobStatus
from models.stats import Histogram, JobMetrics, job_metrics
from tasks.celery_app import create_celery
from tasks.events import dispatch
from tasks.runtime import Runtime
from tests.conftest import RUN_ID
from tests.support.factories import HOOK_URL, make_job
from tests.support.servers import WebhookReceiver
from tests.support.services import pg_admin as _pg_admin
from tests.support.statements import sent_statements

Key = tuple[str, str, str]
FAILURE = JobFailure("engine_error", "The engine failed.")


def series(db: Database, task: str) -> dict[Key, tuple[int, float]]:
    """The counters of one engine task (each test counts its own task: the run's database is shared)."""
    with db.session() as session:
        return {
            (s.metric, s.task, s.label): (s.value, round(s.total, 6))
            for s in counters.read(session)
            if s.task == task
        }


def a_task() -> str:
    return f"t{new_id()[:12]}"


def test_a_finish_counts_the_job_its_run_time_and_its_estimate_once(database: Database) -> None:
    task = a_task()
    store = JobStore(database)
    job_id = make_job(database, engine_task=task, predict_time=3.0)
    claim = store.claim(job_id, redelivered=False)
    assert series(database, task) == {}  # a claim is no final move
    moved = store.finish(claim, JobStatus.SUCCEEDED, result={"ok": True})
    assert moved is not None
    started, finished = moved.job.started_at, moved.job.finished_at
    assert started is not None and finished is not None
    ran = (finished - started).total_seconds()
    waited = (started - moved.job.queued_at).total_seconds()
    expected = {
        ("jobs_finished", task, "succeeded"): (1, 0.0),
        ("job_duration_seconds", task, counters.bucket_of(ran)): (1, round(ran, 6)),
        ("job_predict_time_seconds", task, "5"): (1, 3.0),
        ("job_queue_wait_seconds", task, counters.bucket_of(waited)): (1, round(waited, 6)),
    }
    assert series(database, task) == expected
    # The same finish again (a redelivered message, a retried call) is refused and counts nothing.
    assert store.finish(claim, JobStatus.SUCCEEDED, result={"ok": True}) is None
    assert store.finish(claim, JobStatus.FAILED, error=FAILURE) is None
    assert series(database, task) == expected


def test_a_job_that_never_ran_counts_its_status_and_no_run_time(database: Database) -> None:
    task = a_task()
    store = JobStore(database)
    store.cancel(make_job(database, engine_task=task, predict_time=1.0))
    store.fail_unclaimed(make_job(database, engine_task=task), FAILURE)
    assert series(database, task) == {
        ("jobs_finished", task, "cancelled"): (1, 0.0),
        ("jobs_finished", task, "failed"): (1, 0.0),
    }


def test_a_move_whose_transaction_rolls_back_counts_nothing(database: Database) -> None:
    task = a_task()
    job_id = make_job(database, engine_task=task)
    error = {"code": "cancelled", "message": "m"}
    with pytest.raises(RuntimeError), database.session() as session:
        assert lifecycle.apply(session, MOVES["cancel"], job_id, utcnow(), error=error) is not None
        raise RuntimeError("the process dies before the commit")
    assert series(database, task) == {}
    with database.session() as session:
        assert lifecycle.apply(session, MOVES["cancel"], job_id, utcnow(), error=error) is not None
    assert series(database, task) == {("jobs_finished", task, "cancelled"): (1, 0.0)}


def test_deleting_jobs_lowers_no_counter(database: Database) -> None:
    task = a_task()
    store = JobStore(database)
    ids = [make_job(database, engine_task=task, predict_time=0.2) for _ in range(3)]
    for job_id in ids:
        store.finish(store.claim(job_id, redelivered=False), JobStatus.SUCCEEDED, result={"ok": True})
    before = series(database, task)
    assert before[("jobs_finished", task, "succeeded")] == (3, 0.0)
    for job_id in ids:
        store.delete(job_id)
    assert series(database, task) == before
    figures = job_metrics(database)
    assert (task, "succeeded", 3) in figures.finished
    [durations] = [h for h in figures.durations if h.task == task]
    assert durations.count == 3 and durations.at_most[-1] == 3


def attempts(db: Database) -> dict[str, int]:
    with db.session() as session:
        return {s.label: s.value for s in counters.read(session) if s.metric == counters.WEBHOOK_ATTEMPTS}


def test_the_dispatcher_running_twice_counts_the_job_and_its_webhook_attempt_once(
    settings: Settings,
) -> None:
    """What a crash between a move's commit and its dispatch leads to: the dispatcher runs on the
    job twice (the kick and the sweep). The job was counted with its move, its one webhook attempt
    with that attempt's delivery row; taking the event again adds nothing."""
    settings = settings.with_overrides(webhook_secret="whsec_" + "A" * 32)
    receiver = WebhookReceiver().start()
    runtime = Runtime(settings)
    try:
        task = a_task()
        store = JobStore(runtime.db)
        job_id = make_job(runtime.db, engine_task=task, webhook_url=receiver.url)
        store.finish(store.claim(job_id, redelivered=False), JobStatus.FAILED, error=FAILURE)
        counted = series(runtime.db, task)
        assert counted[("jobs_finished", task, "failed")] == (1, 0.0)
        before = attempts(runtime.db)
        app = create_celery(settings)
        assert dispatch(runtime, app, job_id, inline=True) == 1  # delivered here, at once
        assert dispatch(runtime, app, job_id, inline=True) == 0
        assert len(receiver.wait_for(1)) == 1
        assert series(runtime.db, task) == counted
        assert attempts(runtime.db) == {**before, "success": before.get("success", 0) + 1}
    finally:
        receiver.stop()
        runtime.db.dispose()


def test_a_final_move_adds_one_upsert_to_its_transaction(db: Database) -> None:
    store = JobStore(db)
    claim = store.claim(make_job(db, engine_task=a_task(), predict_time=1.0), redelivered=False)
    with sent_statements(db) as statements:
        store.finish(claim, JobStatus.SUCCEEDED, result={"ok": True})
    parts = [
        " ".join(part.split()[:3]).upper().replace('"', "")
        for s in statements
        for part in re.split(r";\s+", s)
    ]
    writes = [s for s in parts if not s.startswith(("SET", "SELECT PG_NOTIFY", "BEGIN", "COMMIT"))]
    assert writes == ["UPDATE JOBS SET", "INSERT INTO JOB_EVENTS", "INSERT INTO JOB_COUNTERS"]
    if db.is_postgres:
        # Two round trips: BEGIN with the UPDATE, then the writes that go with it and COMMIT.
        assert len(statements) == 2
        assert parts[0] == "BEGIN" and parts[-1] == "COMMIT"


# Rows written at revision 0005, before later migrations added columns the models now have: only
# the columns given (and the models' defaults) are written.
def job_at_0005(db: Database, **values: Any) -> str:
    now = utcnow()
    row: dict[str, Any] = dict(
        id=new_id(), client_id="alice", task="upscale", engine_task="upscale", queue="gpu.superres",
        payload={}, created_at=now, queued_at=now, updated_at=now,
    )  # fmt: skip
    row.update(values)
    with db.session() as session:
        session.execute(insert(Job).values(row))
    return str(row["id"])


def attempt_at_0005(db: Database, job_id: str, ok: bool) -> None:
    row = dict(job_id=job_id, event_id=new_id(), event="job.finished", attempt=1, url=HOOK_URL, ok=ok)
    with db.session() as session:
        session.execute(insert(WebhookDelivery).values(row))


# -- a scrape at 100,000 jobs, and the back-fill of migration 0006 ----------------------------------

MANY = 100_000
TASKS = ("upscale", "generate", "face_swap")


def seed_final_jobs(db: Database, rows: int) -> None:
    """``rows`` final jobs of three tasks and five statuses, run times from 0 to about 25 minutes
    (a few with no start: ended while queued), one estimate in three missing, one INSERT."""
    statuses = ", ".join(f"'{s}'" for s in sorted(FINAL_STATUSES))
    tasks = ", ".join(f"'{t}'" for t in TASKS)
    with db.session() as session:
        session.execute(
            text(
                f"""
                INSERT INTO jobs (id, client_id, task, engine_task, queue, status, stage, progress,
                    priority, payload, metadata, attempts, cancel_requested, created_at, queued_at,
                    updated_at, started_at, finished_at, predict_time, event_seq)
                SELECT md5(n::text), 'alice', t, t, 'cpu', s, 'done', 100, 0, '{{}}', '{{}}', 1, false,
                    now(), now(), now(),
                    CASE WHEN n % 17 = 0 THEN NULL ELSE now() - interval '1 hour' END,
                    now() - interval '1 hour' + ((n % 1500) * 1.01) * interval '1 second',
                    CASE WHEN n % 3 = 0 THEN NULL ELSE (n % 700) / 7.0 END, 1
                FROM generate_series(1, :rows) AS n,
                    LATERAL (SELECT (ARRAY[{tasks}])[1 + n % 3] AS t,
                                    (ARRAY[{statuses}])[1 + n % 5] AS s) AS pick
                """
            ),
            {"rows": rows},
        )


@pytest.fixture(scope="module")
def history(base_settings: Settings) -> Iterator[Database]:
    """A database of its own, migrated to 0005, seeded with ``MANY`` final jobs and some webhook
    attempts, then upgraded to head: what an upgrade of a busy installation meets."""
    name = f"aiorch_t_{RUN_ID}_counters"
    _pg_admin(f"CREATE DATABASE {name}")
    db = Database(replace(base_settings, database_url=f"postgresql://postgres@127.0.0.1:5432/{name}"))
    try:
        upgrade(db, "0005")
        seed_final_jobs(db, MANY)
        job_id = job_at_0005(db, status="succeeded", stage="done")
        for ok in (True, False, False):
            attempt_at_0005(db, job_id, ok)
        upgrade(db)
        with db.engine.connect() as connection:
            connection.execute(text("ANALYZE jobs"))
        yield db
    finally:
        db.dispose()
        _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def aggregated_at_scrape(session: Session, bounds: tuple[float, ...]) -> JobMetrics:
    """What ``/metrics`` read before the counters: aggregates over the whole jobs table."""
    seconds: SQLColumnExpression[Any] = func.extract("epoch", Job.finished_at - Job.started_at)

    def histograms(column: SQLColumnExpression[Any]) -> list[Histogram]:
        buckets = [func.sum(case((column <= bound, 1), else_=0)) for bound in bounds]
        query = (
            select(Job.engine_task, func.count(), func.coalesce(func.sum(column), 0.0), *buckets)
            .where(Job.finished_at.is_not(None), Job.started_at.is_not(None), column.is_not(None))
            .group_by(Job.engine_task)
            .order_by(Job.engine_task)
        )
        return [
            Histogram(task, int(n), float(total), [int(b) for b in at_most])
            for task, n, total, *at_most in session.execute(query)
        ]

    jobs = session.execute(
        select(Job.engine_task, Job.status, func.count()).group_by(Job.engine_task, Job.status)
    )
    return JobMetrics(
        live=[],
        finished=sorted((task, status, int(n)) for task, status, n in jobs),
        durations=histograms(seconds),
        predict_times=histograms(Job.predict_time),
        queue_waits=[],  # not counted before the moves kept counters: 0006 back-fills none
        webhook_attempts={"success": 1, "failure": 2},
    )


def same_histograms(got: list[Histogram], expected: list[Histogram]) -> bool:
    """Equal counts and buckets; sums equal but for the last bits (double vs numeric arithmetic)."""
    return [(h.task, h.count, h.at_most) for h in got] == [
        (h.task, h.count, h.at_most) for h in expected
    ] and all(g.total == pytest.approx(e.total, rel=1e-9) for g, e in zip(got, expected, strict=True))


def test_migration_0006_backfills_what_the_scrape_time_aggregate_said(history: Database) -> None:
    with history.session() as session:
        expected = aggregated_at_scrape(session, counters.BOUNDS)
    figures = job_metrics(history)
    assert sum(n for _, _, n in figures.finished) == MANY + 1
    assert figures.finished == expected.finished
    assert same_histograms(figures.durations, expected.durations)
    assert same_histograms(figures.predict_times, expected.predict_times)
    assert figures.webhook_attempts == expected.webhook_attempts
    assert figures.live == []


def test_migration_0006_backfills_sqlite_as_the_moves_would_have_counted(tmp_path: Path) -> None:
    db = Database(Settings(database_url=f"sqlite:///{tmp_path / 'upgrade.db'}"))
    upgrade(db, "0005")
    now = utcnow()
    ago = lambda seconds: now - timedelta(seconds=seconds)  # noqa: E731
    final: list[dict[str, Any]] = [
        dict(engine_task="upscale", status="succeeded", started_at=ago(10.3), predict_time=4.0),
        dict(engine_task="upscale", status="failed", started_at=ago(0.05)),
        dict(engine_task="upscale", status="succeeded", started_at=ago(0.6), predict_time=0.6),
        dict(engine_task="generate", status="cancelled"),  # ended while queued: no run time
        dict(engine_task="generate", status="succeeded", started_at=ago(2000), predict_time=5000.0),
    ]
    ids = [job_at_0005(db, stage="done", finished_at=now, **values) for values in final]
    job_at_0005(db, status="queued", stage="run")  # still queued: not counted
    job_id = ids[0]
    for ok in (True, True, False):
        attempt_at_0005(db, job_id, ok)
    upgrade(db)
    expected: dict[Key, list[float]] = {}
    with db.session() as session:
        for job in session.scalars(select(Job).where(Job.id.in_(ids))):
            for s in counters.observations(job):
                if s.metric == counters.QUEUE_WAIT:
                    continue  # counted from later moves on; 0006 back-fills none
                value, total = expected.setdefault(s[:3], [0, 0.0])
                expected[s[:3]] = [value + s.value, total + s.total]
        got = {(s.metric, s.task, s.label): [s.value, s.total] for s in counters.read(session)}
    expected[("webhook_attempts", "", "success")] = [2, 0.0]
    expected[("webhook_attempts", "", "failure")] = [1, 0.0]
    assert got.keys() == expected.keys()
    for key, (value, total) in expected.items():
        assert got[key][0] == value and got[key][1] == pytest.approx(total, abs=1e-3), key
    assert ("job_duration_seconds", "generate", "+Inf") in got  # past the last bound
    db.dispose()


def test_a_scrape_reads_the_counters_and_no_job(history: Database) -> None:
    issued: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        issued.append(" ".join(statement.split()))

    event.listen(history.engine, "before_cursor_execute", record)
    try:
        job_metrics(history)
    finally:
        event.remove(history.engine, "before_cursor_execute", record)
    # The live gauge sums the status counts (job_status_counts, kept by the jobs triggers).
    assert not [s for s in issued if "FROM jobs" in s], issued
    assert any("FROM job_status_counts" in s for s in issued), issued
    took = []
    for _ in range(7):
        started = time.perf_counter()
        job_metrics(history)
        took.append(time.perf_counter() - started)
    # The aggregate it replaced took 140 ms at this size on the machine, 1.06 s at 1 M.
    assert statistics.median(took) < 0.05, took


def test_the_live_gauge_counts_queued_and_running_jobs_now(database: Database) -> None:
    task = a_task()
    store = JobStore(database)
    make_job(database, engine_task=task)
    running = make_job(database, engine_task=task)
    claim = store.claim(running, redelivered=False)
    assert {row for row in job_metrics(database).live if row[0] == task} == {
        (task, "queued", 1),
        (task, "running", 1),
    }
    store.finish(claim, JobStatus.SUCCEEDED, result={"ok": True})
    figures = job_metrics(database)
    assert {row for row in figures.live if row[0] == task} == {(task, "queued", 1)}
    assert (task, "succeeded", 1) in figures.finished
