"""JobControl, the RunControl a worker hands its engine, on the run's Postgres: the engine's steps
send no query (a watcher thread writes progress and reads the cancel flag once per interval), and a
cancel is seen within one interval."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import event

from models.db import Database
from models.jobstore import JobStore
from tasks.run import PROGRESS_INTERVAL, JobControl
from tests.models.test_state_machine import make_job


@dataclass
class Statement:
    sql: str
    thread: int

    def startswith(self, prefix: str) -> bool:
        return self.sql.startswith(prefix)


@pytest.fixture()
def statements(db: Database) -> Iterator[list[Statement]]:
    """Every SQL statement the database engine sends, as the driver receives it, with the thread
    that sent it."""
    seen: list[Statement] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        seen.append(Statement(" ".join(statement.split()), threading.get_ident()))

    event.listen(db.engine, "before_cursor_execute", record)
    yield seen
    event.remove(db.engine, "before_cursor_execute", record)


def from_this_thread(statements: list[Statement]) -> list[str]:
    here = threading.get_ident()
    return [s.sql for s in statements if s.thread == here]


def api_cancel(store: JobStore, job_id: str) -> str | None:
    """The API's cancel of a running job, from a thread of its own as another process's would be."""
    answer: list[str | None] = []
    sender = threading.Thread(target=lambda: answer.append(store.cancel(job_id)))
    sender.start()
    sender.join()
    return answer[0]


def count_checks(control: JobControl) -> list[float]:
    """When each of the watcher's looks at the database began."""
    began: list[float] = []
    check = control.check

    def counted() -> None:
        began.append(time.monotonic())
        check()

    control.check = counted  # type: ignore[method-assign]
    return began


def progress_writes(statements: list[Statement]) -> int:
    return sum(s.startswith("UPDATE jobs SET progress") for s in statements)


def test_steps_send_no_query_progress_is_written_per_interval_and_a_cancel_is_seen_within_one(
    db: Database, statements: list[Statement]
) -> None:
    store = JobStore(db, max_attempts=3)
    job_id = make_job(db)
    steps, cancel_at, step_s = 150, 60, 0.01
    stopped_at = cancelled_at = None
    control = JobControl(store, store.claim(job_id, redelivered=False))
    checks = count_checks(control)
    with control:
        statements.clear()
        started = time.monotonic()
        for step in range(steps):
            # What the diffusion engine's step callback does: report progress, then ask.
            control.progress(100 * step / steps)
            if control.should_stop():
                stopped_at = time.monotonic()
                break
            if step == cancel_at:
                assert api_cancel(store, job_id) == "running"
                cancelled_at = time.monotonic()
            time.sleep(step_s)
        elapsed = time.monotonic() - started
    # The steps themselves sent nothing: every query came from the watcher.
    assert from_this_thread(statements) == []
    assert stopped_at is not None and cancelled_at is not None
    # Seen by the watcher's first look after the cancel, which comes one interval after the one
    # before (a busy machine may stretch that, never skip a look).
    assert len([t for t in checks if cancelled_at < t < stopped_at]) <= 1, (checks, cancelled_at)
    assert stopped_at - cancelled_at <= PROGRESS_INTERVAL + 2.0
    # One write per interval at most, counted from the claim, not one per step.
    writes = progress_writes(statements)
    assert 1 <= writes <= elapsed / PROGRESS_INTERVAL, (writes, elapsed)


def test_a_job_shorter_than_the_interval_sends_no_query(db: Database, statements: list[Statement]) -> None:
    store = JobStore(db, max_attempts=3)
    claim = store.claim(make_job(db), redelivered=False)
    statements.clear()
    with JobControl(store, claim, interval=5) as control:
        for step in range(1000):
            control.progress(step / 10)
            assert not control.should_stop()
    assert statements == []


def test_the_watcher_writes_progress_only_when_it_moved_and_otherwise_reads_the_flag(
    db: Database, statements: list[Statement]
) -> None:
    store = JobStore(db, max_attempts=3)
    job_id = make_job(db)
    control = JobControl(store, store.claim(job_id, redelivered=False))
    statements.clear()
    control.check()  # nothing reported yet: a read
    control.progress(42.7)
    control.check()  # moved: a write
    control.check()  # unchanged: a read
    assert progress_writes(statements) == 1
    assert db_progress(db, job_id) == 42
    assert not control.should_stop()


def test_a_cancel_seen_once_stays_seen_without_more_queries(
    db: Database, statements: list[Statement]
) -> None:
    store = JobStore(db, max_attempts=3)
    job_id = make_job(db)
    control = JobControl(store, store.claim(job_id, redelivered=False))
    store.cancel(job_id)
    control.check()
    assert control.should_stop()
    statements.clear()
    assert all(control.should_stop() for _ in range(5))
    assert statements == []


def test_an_unreachable_database_neither_fails_the_steps_nor_stops_the_watcher(db: Database) -> None:
    from sqlalchemy.exc import OperationalError

    store = JobStore(db, max_attempts=3)
    job_id = make_job(db)
    control = JobControl(store, store.claim(job_id, redelivered=False), interval=0.05)
    real = store.cancel_requested
    calls = 0

    def down_then_up(asked: str) -> bool:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise OperationalError("SELECT", {}, Exception("could not connect to server: Connection refused"))
        return real(asked)

    store.cancel_requested = down_then_up  # type: ignore[method-assign]
    store.cancel(job_id)
    with control:
        deadline = time.monotonic() + 10
        while not control.should_stop() and time.monotonic() < deadline:
            time.sleep(0.01)
    assert control.should_stop() and calls > 3


def db_progress(db: Database, job_id: str) -> int:
    from models.jobs import Job

    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return int(job.progress)


def test_a_running_generation_sends_no_query_from_its_steps_and_stops_within_an_interval_of_a_cancel(
    db: Database, statements: list[Statement], tmp_path
) -> None:
    import torch

    from inference.base import Cancelled
    from inference.diffusion import DiffusionModels, ImageGenerator
    from inference.model_cache import ModelCache
    from inference.model_store import ModelStore
    from tests.inference.tiny_diffusion import save_tiny_sd

    models_store = ModelStore(tmp_path)
    models_store.add(save_tiny_sd(tmp_path / "tiny-sd"), id="tiny-sd")
    models = DiffusionModels(models_store, ModelCache(512 * 2**20), device="cpu")
    generate = ImageGenerator(models)
    generate("a cat", width=64, height=64, steps=1)  # loaded before the clock matters
    entry, info = models.resolve("tiny-sd", "generate")
    with models.hold(entry, info) as loaded:
        unet = loaded.pipe.unet

    store = JobStore(db, max_attempts=3)
    job_id = make_job(db, task="generate", engine_task="generate", queue="gpu.diffusion")
    control = JobControl(store, store.claim(job_id, redelivered=False))
    checks = count_checks(control)
    unet_calls = 0
    cancelled_at = 0.0
    cancelled_in: int | None = None
    writes_seen = 0

    def cancel_right_after_a_progress_write(module, args) -> None:  # noqa: ANN001
        # The API's cancel, in the first step after a progress write: the moment the watcher's
        # next look is furthest away.
        nonlocal unet_calls, cancelled_in, writes_seen, cancelled_at
        unet_calls += 1
        # Steps of at least 10 ms: 100 of them outlast the progress interval on any machine, so a
        # progress write always comes (a fast, quiet machine ran the tiny model's 100 steps in
        # under 0.5 s and never wrote one, and no cancel was ever sent).
        time.sleep(0.01)
        writes = progress_writes(statements)
        if cancelled_in is None and unet_calls >= 3 and writes > writes_seen:
            api_cancel(store, job_id)
            cancelled_in = unet_calls
            cancelled_at = time.monotonic()
        writes_seen = writes

    hook = unet.register_forward_pre_hook(cancel_right_after_a_progress_write)
    statements.clear()
    started = time.monotonic()
    try:
        with torch.no_grad(), pytest.raises(Cancelled), control:
            generate("a cat", width=64, height=64, steps=100, control=control)
    finally:
        hook.remove()
    stopped_at = time.monotonic()
    elapsed = stopped_at - started
    assert cancelled_in is not None and unet_calls < 100
    assert len([t for t in checks if cancelled_at < t < stopped_at]) <= 1, (checks, cancelled_at)
    assert stopped_at - cancelled_at <= PROGRESS_INTERVAL + 2.0
    # The generation's own thread sent nothing: no query per step.
    assert from_this_thread(statements) == []
    assert progress_writes(statements) <= 2 + elapsed / PROGRESS_INTERVAL


def test_what_a_run_reports_beside_its_percentage_is_written_with_it_and_carried_by_its_event(
    db: Database, statements: list[Statement]
) -> None:
    from sqlalchemy import select

    from models.jobs import JobEvent
    from models.public import job_object

    store = JobStore(db, max_attempts=3)
    job_id = make_job(db)
    control = JobControl(store, store.claim(job_id, redelivered=False))
    control.progress(40, {"step": 40, "steps": 100, "loss": 0.25})
    control.check()
    control.progress(40, {"step": 41, "steps": 100, "loss": 0.24})  # the percentage alone did not move
    control.check()
    assert progress_writes(statements) == 2
    job = store.get(job_id)
    assert job is not None and job_object(job)["progress_detail"] == {"step": 41, "steps": 100, "loss": 0.24}
    with db.session() as session:
        events = session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.type == "job.progress")
            .order_by(JobEvent.seq)
        ).all()
        assert [e.data["progress_detail"]["step"] for e in events] == [40, 41]


def test_runs_share_one_watcher_thread_and_one_let_go_is_never_looked_at_again(db: Database) -> None:
    store = JobStore(db, max_attempts=3)
    claims = [store.claim(make_job(db), redelivered=False) for _ in range(3)]
    with JobControl(store, claims[0], interval=5):
        pass  # the process's watcher is running from here on
    threads = threading.active_count()
    looks: list[list[float]] = []
    controls = [JobControl(store, claim, interval=0.02) for claim in claims]
    for control in controls:
        looks.append(count_checks(control))
    with contextlib.ExitStack() as running:
        for control in controls:
            running.enter_context(control)
        time.sleep(0.3)
        assert threading.active_count() == threads  # no thread per run
    let_go = time.monotonic()
    counts = [len(seen) for seen in looks]
    assert all(n >= 3 for n in counts), counts  # each looked at about every 20 ms meanwhile
    time.sleep(0.2)
    assert [len(seen) for seen in looks] == counts  # and never after the run took it back
    assert all(t < let_go for seen in looks for t in seen)
