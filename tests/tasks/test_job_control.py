"""JobControl, the RunControl a worker hands its engine, on the run's Postgres: progress writes are
throttled, the cancel flag is read on every step."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import event

from models.db import Database
from models.jobstore import JobStore
from tasks.run import PROGRESS_INTERVAL, JobControl
from tests.models.test_state_machine import make_job


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
    # ~1 s of steps: one write per PROGRESS_INTERVAL counted from the claim, not one per step.
    writes = progress_writes(statements)
    assert 1 <= writes <= elapsed / PROGRESS_INTERVAL, (writes, elapsed)
    assert writes < stopped_at / 10


def test_a_job_shorter_than_the_progress_interval_writes_no_progress(
    db: Database, statements: list[str]
) -> None:
    store = JobStore(db, max_attempts=3)
    control = JobControl(store, store.claim(make_job(db), redelivered=False))
    statements.clear()
    for step in range(10):
        control.progress(10 * step)
        assert not control.should_stop()
    assert progress_writes(statements) == 0


def test_a_cancel_seen_once_stays_seen_without_more_queries(db: Database, statements: list[str]) -> None:
    store = JobStore(db, max_attempts=3)
    job_id = make_job(db)
    control = JobControl(store, store.claim(job_id, redelivered=False))
    store.cancel(job_id)
    assert control.should_stop()
    statements.clear()
    assert all(control.should_stop() for _ in range(5))
    assert statements == []


def test_a_running_generation_stops_at_the_end_of_the_step_the_cancel_came_in(
    db: Database, statements: list[str], tmp_path
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
    unet_calls = 0
    cancelled_in: int | None = None
    writes_seen = 0

    def cancel_right_after_a_progress_write(module, args) -> None:  # noqa: ANN001
        # The API's cancel, in the first step after a progress write: the moment a flag read
        # piggybacking on the throttled writes would take longest to notice it.
        nonlocal unet_calls, cancelled_in, writes_seen
        unet_calls += 1
        # Steps of at least 10 ms: 100 of them outlast the progress interval on any machine, so a
        # progress write always comes (a fast, quiet machine ran the tiny model's 100 steps in
        # under 0.5 s and never wrote one, and no cancel was ever sent).
        time.sleep(0.01)
        writes = progress_writes(statements)
        if cancelled_in is None and unet_calls >= 3 and writes > writes_seen:
            store.cancel(job_id)
            cancelled_in = unet_calls
        writes_seen = writes

    hook = unet.register_forward_pre_hook(cancel_right_after_a_progress_write)
    statements.clear()
    started = time.monotonic()
    try:
        with torch.no_grad(), pytest.raises(Cancelled):
            generate("a cat", width=64, height=64, steps=100, control=control)
    finally:
        hook.remove()
    elapsed = time.monotonic() - started
    # The callback of the step the cancel came in read the flag: no further step ran.
    assert cancelled_in is not None and unet_calls == cancelled_in
    assert progress_writes(statements) <= 2 + elapsed / PROGRESS_INTERVAL
