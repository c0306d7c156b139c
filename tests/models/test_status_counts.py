"""The status counts (``job_status_counts``, kept by the jobs triggers of migration 0010) stay equal
to a GROUP BY over the jobs table through every kind of write: single and batch creates, each kind
of move (and the writes that change no status), refused and rolled-back moves, expiry, and every
delete, on the run's Postgres and on SQLite. On Postgres, concurrent writers of one client neither
lose a count nor wait on one row, and migration 0010 back-fills the counts of an existing table.
``/stats`` and ``/metrics`` read them instead of the jobs (``models.stats``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select, text, update

from config import Settings
from models import lifecycle
from models.batches import withdraw_jobs
from models.db import Database, utcnow
from models.failures import JobFailure
from models.jobs import Job, JobStatusCount
from models.jobstore import JobStore, new_id
from models.migrate import upgrade
from models.reads import JobFilter, list_jobs
from models.state import MOVES, JobStatus
from models.stats import client_overview, job_metrics
from tests.conftest import RUN_ID
from tests.support.services import pg_admin as _pg_admin

Counts = dict[tuple[str, str, str], int]
FAILURE = JobFailure("engine_error", "The engine failed.")
# A task the client names, with the engine task it runs on (an alias and its engine, and two others).
TASKS = (("upscale", "upscale"), ("ahv_image", "generate"), ("remove_background", "remove_background"))


def a_client() -> str:
    """Each test counts a client of its own: the run's Postgres database is shared."""
    return f"c{new_id()[:12]}"


def counted(db: Database, client: str) -> Counts:
    """What the triggers kept: the client's counts by (task, engine task, status), shards summed."""
    n = func.sum(JobStatusCount.n)
    query = (
        select(JobStatusCount.task, JobStatusCount.engine_task, JobStatusCount.status, n)
        .where(JobStatusCount.client_id == client)
        .group_by(JobStatusCount.task, JobStatusCount.engine_task, JobStatusCount.status)
    )
    with db.session() as session:
        return {(t, e, s): int(c) for t, e, s, c in session.execute(query) if int(c) != 0}


def grouped(db: Database, client: str) -> Counts:
    """The truth: GROUP BY over the client's jobs."""
    query = (
        select(Job.task, Job.engine_task, Job.status, func.count())
        .where(Job.client_id == client)
        .group_by(Job.task, Job.engine_task, Job.status)
    )
    with db.session() as session:
        return {(t, e, s): int(c) for t, e, s, c in session.execute(query)}


def exact(db: Database, client: str) -> Counts:
    truth = grouped(db, client)
    assert counted(db, client) == truth
    return truth


def new_job(client: str, task: tuple[str, str] = TASKS[0], **values: Any) -> Job:
    now = utcnow()
    attributes: dict[str, Any] = dict(
        id=new_id(), client_id=client, task=task[0], engine_task=task[1], queue="gpu.superres",
        progress=0, priority=0, payload={}, meta={}, attempts=0, cancel_requested=False,
        created_at=now, queued_at=now, updated_at=now,
    )  # fmt: skip
    attributes.update(values)
    return Job.transient(**attributes)


def create(db: Database, client: str, task: tuple[str, str] = TASKS[0], **values: Any) -> str:
    job = new_job(client, task, **values)
    with db.session() as session:
        lifecycle.create(session, job)
    return job.id


def create_batch(db: Database, client: str, n: int, task: tuple[str, str] = TASKS[0]) -> list[str]:
    jobs = [new_job(client, task) for _ in range(n)]
    with db.session() as session:
        lifecycle.create_many(session, jobs)  # COPY on Postgres
    return [job.id for job in jobs]


def test_counts_follow_every_kind_of_write(database: Database) -> None:
    client = a_client()
    store = JobStore(database)
    # Creates: one at a time (one task each), a batch, and a batch's worth of another task.
    singles = [create(database, client, task) for task in TASKS]
    batch = create_batch(database, client, 30, TASKS[1])
    assert exact(database, client) == {
        ("upscale", "upscale", "queued"): 1,
        ("ahv_image", "generate", "queued"): 31,
        ("remove_background", "remove_background", "queued"): 1,
    }

    # A run: claim, progress, a heartbeat and a cancel request (no status change), then success.
    claim = store.claim(singles[0], redelivered=False, from_prepare=True)
    exact(database, client)
    assert store.report_progress(claim, 40) is False
    assert store.heartbeat(claim) is True
    with database.session() as session:
        lifecycle.touch(session, "inputs", claim.job_id, utcnow(), claim.token, inputs={"a": 1})
    before = exact(database, client)
    assert store.finish(claim, JobStatus.SUCCEEDED, result={"ok": True}) is not None
    assert store.finish(claim, JobStatus.FAILED, error=FAILURE) is None  # refused: counts nothing
    after = exact(database, client)
    assert after[("upscale", "upscale", "succeeded")] == 1 and after != before

    # A remote run: claim, submitted, handed back to a local engine, failed; a flagged cancel.
    store.set_prepared(batch[0], {})
    remote = store.claim(batch[0], redelivered=False, remote=True)
    assert store.record_remote(remote, "fake", "r-1", utcnow())
    assert store.run_locally(remote, "local")
    assert store.fail(remote, FAILURE) is not None
    running = store.claim(batch[1], redelivered=False, from_prepare=True)
    assert store.cancel(batch[1]) == JobStatus.RUNNING.value  # flagged only
    exact(database, client)
    assert store.fail(running, JobFailure.cancelled()) is not None

    # The moves that end a queued job, a revoke of a running one, and cancel_many's transaction.
    assert store.cancel(batch[2]) == JobStatus.CANCELLED.value
    assert store.fail_unclaimed(batch[3], FAILURE)
    store.claim(batch[4], redelivered=False, from_prepare=True)
    assert store.revoke(batch[4]) is not None
    outcome = store.cancel_many(batch[5:9])
    assert len(outcome.ended) == 4
    exact(database, client)

    # Expiry, as the sweep does it: jobs queued before the deadline end expired. Queued in 2001,
    # so that on the shared database no other test's job is old enough to be touched.
    old = datetime(2001, 1, 1, tzinfo=UTC)
    stale = [create(database, client, TASKS[2], created_at=old, queued_at=old) for _ in range(3)]
    expired = store.expire_queued(60, now=old + timedelta(seconds=120))
    assert set(stale) <= set(expired)
    assert exact(database, client)[("remove_background", "remove_background", "expired")] == 3

    # A move whose transaction rolls back counts nothing.
    error = {"code": "cancelled", "message": "m"}
    with pytest.raises(RuntimeError), database.session() as session:
        assert lifecycle.apply(session, MOVES["cancel"], batch[9], utcnow(), error=error) is not None
        raise RuntimeError("the process dies before the commit")
    with pytest.raises(RuntimeError), database.session() as session:
        lifecycle.create_many(session, [new_job(client) for _ in range(5)])
        raise RuntimeError("and before this one's")
    exact(database, client)

    # Deletes: one job (final or queued), and a batch's withdrawn jobs.
    store.delete(singles[0])
    store.delete(singles[1])
    withdraw_jobs(database, batch[10:25])
    final = exact(database, client)
    assert sum(final.values()) == 3 + 30 + 3 - 2 - 15


def test_a_batch_is_one_upsert_per_task_and_status(database: Database) -> None:
    """COPY of 1,000 jobs: one row of counts for their key (a statement trigger on Postgres; a
    row trigger on SQLite, into one row too)."""
    client = a_client()
    create_batch(database, client, 1000, TASKS[1])
    with database.session() as session:
        rows = session.execute(
            select(JobStatusCount.shard, JobStatusCount.n).where(JobStatusCount.client_id == client)
        ).all()
    assert len(rows) == 1 and rows[0].n == 1000
    assert exact(database, client) == {("ahv_image", "generate", "queued"): 1000}
    withdraw_jobs(database, [job_id for (job_id,) in _ids(database, client)])
    assert exact(database, client) == {}


def _ids(db: Database, client: str) -> list[tuple[str]]:
    with db.session() as session:
        return [tuple(row) for row in session.execute(select(Job.id).where(Job.client_id == client))]


def test_a_change_of_client_or_task_moves_the_count_too(database: Database) -> None:
    """No code writes these today; the counts stay exact if one ever does (models/ only)."""
    client, other = a_client(), a_client()
    job_id = create(database, client)
    with database.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(client_id=other, task="upscale_x"))
    assert exact(database, client) == {}
    assert exact(database, other) == {("upscale_x", "upscale", "queued"): 1}


def test_stats_and_metrics_read_the_counts(database: Database) -> None:
    client, other = a_client(), a_client()
    store = JobStore(database)
    ids = [create(database, client, task) for task in TASKS]
    create(database, other)
    claim = store.claim(ids[0], redelivered=False, from_prepare=True)
    store.cancel(ids[1])
    mine = client_overview(database, client)
    assert mine.by_status == {"cancelled": 1, "queued": 1, "running": 1}
    assert mine.by_task == {"ahv_image": 1, "remove_background": 1, "upscale": 1}
    assert mine.by_client is None
    assert [job.id for job in mine.recent] == ids[::-1]
    every = client_overview(database, None)
    assert every.by_client is not None and every.by_client[client] == 3 and every.by_client[other] == 1
    assert sum(every.by_status.values()) == sum(every.by_client.values()) == sum(every.by_task.values())
    with database.session() as session:
        total = session.scalar(select(func.count()).select_from(Job))
        live = session.execute(
            select(Job.engine_task, Job.status, func.count())
            .where(Job.status.in_(("queued", "running")))
            .group_by(Job.engine_task, Job.status)
        ).all()
    assert sum(every.by_status.values()) == total
    assert job_metrics(database).live == sorted((t, s, int(n)) for t, s, n in live)
    store.finish(claim, JobStatus.SUCCEEDED, result={"ok": True})
    store.delete(ids[0])
    mine = client_overview(database, client)
    assert mine.by_status == {"cancelled": 1, "queued": 1}  # a key whose jobs all went is left out
    assert "upscale" not in mine.by_task


# -- Postgres: concurrent writers, and the back-fill of migration 0010 ------------------------------


def test_concurrent_submits_and_moves_of_one_client_stay_exact(db: Database) -> None:
    """Eight threads submit one client's jobs (one at a time and in batches) while four claim and
    finish them: no count lost, no deadlock, and the writes spread over several shards."""
    client = a_client()
    store = JobStore(db)
    errors: list[BaseException] = []
    made: list[str] = []
    lock = threading.Lock()

    def submit(n: int) -> None:
        try:
            for i in range(n):
                ids = [create(db, client, TASKS[i % 3])] if i % 4 else create_batch(db, client, 10, TASKS[1])
                with lock:
                    made.extend(ids)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    def work() -> None:
        finished = 0
        try:
            while finished < 40:
                with lock:
                    job_id = made.pop() if made else None
                if job_id is None:
                    time.sleep(0.005)
                    continue
                claim = store.claim(job_id, redelivered=False, from_prepare=True)
                store.finish(claim, JobStatus.SUCCEEDED, result={"ok": True})
                finished += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(24,)) for _ in range(8)]
    threads += [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    truth = exact(db, client)
    assert sum(truth.values()) == 8 * (18 + 6 * 10)
    assert sum(n for (_, _, status), n in truth.items() if status == "succeeded") == 4 * 40
    with db.session() as session:
        shards = session.scalar(
            select(func.count(func.distinct(JobStatusCount.shard))).where(JobStatusCount.client_id == client)
        )
    assert shards is not None and shards > 1


def seed_at_0009(db: Database, rows: int) -> None:
    """``rows`` jobs of three clients, three tasks and every status, in one INSERT."""
    with db.session() as session:
        session.execute(
            text(
                """
                INSERT INTO jobs (id, client_id, task, engine_task, queue, status, stage, progress,
                    priority, payload, metadata, attempts, cancel_requested, created_at, queued_at,
                    updated_at, event_seq)
                SELECT md5(n::text), (ARRAY['alice', 'bob', 'carol'])[1 + mod(n, 3)], t, t, 'cpu',
                    (ARRAY['queued', 'running', 'succeeded', 'failed', 'rejected', 'cancelled',
                           'expired'])[1 + mod(n / 3, 7)],
                    'done', 0, 0, '{}', '{}', 1, false, now() - n * interval '1 second',
                    now(), now(), 1
                FROM generate_series(1, :rows) AS n,
                    LATERAL (SELECT (ARRAY['upscale', 'generate', 'faceswap'])[1 + mod(n / 21, 3)] AS t)
                    AS pick
                """
            ),
            {"rows": rows},
        )


def all_counts(db: Database) -> tuple[Counts, Counts]:
    """(kept, true) counts of every client, by (client, task, status)."""
    n = func.sum(JobStatusCount.n)
    with db.session() as session:
        kept = session.execute(
            select(JobStatusCount.client_id, JobStatusCount.task, JobStatusCount.status, n).group_by(
                JobStatusCount.client_id, JobStatusCount.task, JobStatusCount.status
            )
        ).all()
        true = session.execute(
            select(Job.client_id, Job.task, Job.status, func.count()).group_by(
                Job.client_id, Job.task, Job.status
            )
        ).all()
    return {(c, t, s): int(k) for c, t, s, k in kept if k}, {(c, t, s): int(k) for c, t, s, k in true}


@pytest.fixture(scope="module")
def history(base_settings: Settings) -> Iterator[Database]:
    """A database of its own at revision 0009 with 20,000 jobs, then upgraded to head and analyzed:
    what the upgrade of a busy installation meets."""
    name = f"aiorch_t_{RUN_ID}_status_counts"
    _pg_admin(f"CREATE DATABASE {name}")
    db = Database(replace(base_settings, database_url=f"postgresql://postgres@127.0.0.1:5432/{name}"))
    try:
        upgrade(db, "0009")
        seed_at_0009(db, 20_000)
        upgrade(db)
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("VACUUM ANALYZE jobs")
        yield db
    finally:
        db.dispose()
        _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_migration_0010_backfills_the_counts_of_an_existing_table(history: Database) -> None:
    kept, true = all_counts(history)
    assert sum(true.values()) >= 20_000 and kept == true
    client = a_client()
    create_batch(history, client, 5)  # and the triggers count from there on
    assert exact(history, client) == {("upscale", "upscale", "queued"): 5}


def plans(db: Database, call: Callable[[], object]) -> list[str]:
    """The plan of every SELECT that ``call`` issues, as Postgres would run it now."""
    issued: list[tuple[str, Any]] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        issued.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        call()
    finally:
        event.remove(db.engine, "before_cursor_execute", record)
    found = []
    with db.engine.connect() as connection:
        for statement, parameters in issued:
            if statement.lstrip().upper().startswith("SELECT"):
                rows = connection.exec_driver_sql(f"EXPLAIN {statement}", parameters)
                found.append(" ".join(statement.split()) + "\n" + "\n".join(row[0] for row in rows))
    return found


def test_the_api_reads_use_indexes_and_never_the_whole_jobs_table(history: Database) -> None:
    """``/stats`` (a client's and an admin's), ``/metrics``, ``GET /v1/jobs`` (a client's page, an
    admin's, ``?ids=``) and ``GET /v1/jobs/{id}``: each page comes out of an index in its order
    (no Sort of the client's or every client's jobs), counts come from the status counts."""
    with history.session() as session:
        ids = list(session.scalars(select(Job.id).where(Job.client_id == "bob").limit(10)))
    reads: dict[str, Callable[[], object]] = {
        "overview of alice": lambda: client_overview(history, "alice"),
        "overview of every client": lambda: client_overview(history, None),
        "metrics": lambda: job_metrics(history),
        "page of alice": lambda: list_jobs(history, "alice", JobFilter(), 50),
        "page of alice before a time": lambda: list_jobs(
            history, "alice", JobFilter(before=utcnow() - timedelta(hours=2)), 50
        ),
        "page of every client": lambda: list_jobs(history, None, JobFilter(), 50),
        "ids of bob": lambda: list_jobs(history, "bob", JobFilter(ids=ids), 50),
        "one job": lambda: JobStore(history).get(ids[0]),
    }
    for name, read in reads.items():
        for plan in plans(history, read):
            assert "Seq Scan on jobs" not in plan, (name, plan)
            statement = plan.splitlines()[0]
            if "FROM jobs" in statement and "ORDER BY" in statement and "ids" not in name:
                # LIMIT over an index walked in the page's order; ?ids= sorts its few rows.
                assert "Sort" not in plan and "Index Scan Backward" in plan, (name, plan)
            elif "FROM jobs" in statement:
                assert " jobs_pkey" in plan, (name, plan)  # an index or bitmap scan of ids
    [counts_plan] = [p for p in plans(history, reads["overview of alice"]) if "job_status_counts" in p]
    assert "FROM jobs" not in counts_plan


def test_migration_0010_backfills_sqlite(tmp_path: Path) -> None:
    db = Database(Settings(database_url=f"sqlite:///{tmp_path / 'upgrade.db'}"))
    upgrade(db, "0009")
    clients = ("alice", "bob")
    for i, status in enumerate(("queued", "running", "succeeded", "failed", "succeeded")):
        for client in clients:
            create(db, client, TASKS[i % 3])
            with db.session() as session:
                session.execute(
                    update(Job).where(Job.client_id == client, Job.status == "queued").values(status=status)
                )
    upgrade(db)
    kept, true = all_counts(db)
    assert kept == true and sum(true.values()) == 10
    db.dispose()
