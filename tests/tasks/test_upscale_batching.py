"""Which waiting upscale jobs a worker takes into one batch, on the run's Postgres."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

import tasks.run  # noqa: F401  (registers the run task)
from config import Settings
from config.settings import SettingsError
from models.db import Database, utcnow
from models.jobs import Job
from models.jobstore import ClaimRefused
from tasks.batching import batch_key, claim_partners
from tasks.celery_app import RUN, create_celery
from tasks.runtime import Runtime
from tests.models.test_state_machine import make_job


@pytest.fixture
def queue() -> str:
    # A queue of its own per test, so jobs other tests left queued never join these batches.
    return f"gpu.batch-{uuid.uuid4().hex[:8]}"


def upscale_job(db: Database, queue: str, width: int = 96, height: int = 96, **payload: object) -> str:
    return make_job(
        db,
        queue=queue,
        payload={"image_url": "http://x/a.png", "scale": 2, **payload},
        inputs={"image_url": {"path": "/nowhere.png", "ext": "png", "width": width, "height": height}},
    )


def runtime(settings: Settings, **overrides: object) -> Runtime:
    return Runtime(settings.with_overrides(**overrides))


def get(db: Database, job_id: str) -> Job:
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_a_claimed_small_job_takes_waiting_jobs_with_the_same_model_size_and_scale_class(
    settings: Settings, db: Database, queue: str
) -> None:
    rt = runtime(settings, upscale_max_batch=3, upscale_batch_wait_ms=0)
    leader = upscale_job(db, queue)
    same = [upscale_job(db, queue) for _ in range(3)]
    others = [
        upscale_job(db, queue, width=97),
        upscale_job(db, queue, model="RealESRGAN_x2plus"),
        upscale_job(db, queue, scale=4),
        upscale_job(db, queue, face_enhance=True),
    ]
    # Still downloading on the prepare queue: not ready, and not the batch's to fetch.
    preparing = make_job(
        db, queue=queue, stage="prepare", payload={"image_url": "http://x/b.png", "scale": 2}
    )
    rt.store.claim(leader, redelivered=False)

    partners = claim_partners(rt, get(db, leader))

    assert [job.id for _claim, job in partners] == same[:2]  # oldest first, up to max_batch - 1
    assert {get(db, job_id).status for job_id in same[:2]} == {"running"}
    for job_id in [same[2], *others, preparing]:
        assert get(db, job_id).status == "queued"
    # The partners' own messages, when they arrive, find them taken and are dropped.
    with pytest.raises(ClaimRefused) as refused:
        rt.store.claim(same[0], redelivered=False)
    assert not refused.value.finalized


def test_the_batch_waits_for_a_job_that_becomes_ready_within_the_wait(
    settings: Settings, db: Database, queue: str
) -> None:
    rt = runtime(settings, upscale_max_batch=2, upscale_batch_wait_ms=3000)
    leader = upscale_job(db, queue)
    late = upscale_job(db, queue)
    with db.session() as session:
        session.get(Job, late).stage = "prepare"  # type: ignore[union-attr]
    rt.store.claim(leader, redelivered=False)

    def finish_fetching() -> None:
        time.sleep(0.2)
        rt.store.set_prepared(late, get(db, late).inputs or {})

    thread = threading.Thread(target=finish_fetching)
    thread.start()
    started = time.monotonic()
    partners = claim_partners(rt, get(db, leader))
    elapsed = time.monotonic() - started
    thread.join()

    assert [job.id for _claim, job in partners] == [late]
    assert 0.15 < elapsed < 2.0  # waited for it, and returned as soon as the batch was full


def test_a_job_alone_on_its_queue_starts_without_waiting(
    settings: Settings, db: Database, queue: str
) -> None:
    rt = runtime(settings, upscale_max_batch=8, upscale_batch_wait_ms=5000)
    leader = upscale_job(db, queue)
    rt.store.claim(leader, redelivered=False)
    started = time.monotonic()
    assert claim_partners(rt, get(db, leader)) == []
    assert time.monotonic() - started < 1.0


def test_batching_is_off_with_a_max_batch_of_one(settings: Settings, db: Database, queue: str) -> None:
    rt = runtime(settings, upscale_max_batch=1)
    leader, other = upscale_job(db, queue), upscale_job(db, queue)
    rt.store.claim(leader, redelivered=False)
    assert claim_partners(rt, get(db, leader)) == []
    assert get(db, other).status == "queued"


def test_large_inputs_and_other_tasks_run_alone(db: Database, queue: str) -> None:
    assert batch_key(get(db, upscale_job(db, queue, width=513))) is None
    assert batch_key(get(db, make_job(db, engine_task="scan_objects", queue=queue))) is None
    assert batch_key(get(db, upscale_job(db, queue, width=512, height=300))) is not None


def test_upscale_settings_come_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "AIORCH_UPSCALE_MAX_BATCH": "4",
            "AIORCH_UPSCALE_BATCH_WAIT_MS": "35",
            "AIORCH_MAX_OUTPUT_SIDE": "4096",
        }
    )
    assert (settings.upscale_max_batch, settings.upscale_batch_wait_ms, settings.max_output_side) == (
        4,
        35,
        4096,
    )
    defaults = Settings.from_env({})
    assert (defaults.upscale_max_batch, defaults.upscale_batch_wait_ms, defaults.max_output_side) == (
        8,
        20,
        8192,
    )
    for name, value in (("AIORCH_UPSCALE_MAX_BATCH", "0"), ("AIORCH_UPSCALE_BATCH_WAIT_MS", "soon")):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: value})


def png_uri(side: int) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_waiting_jobs_sent_straight_to_the_run_queue_are_checked_and_claimed_by_the_batch(
    settings: Settings, db: Database, queue: str
) -> None:
    """The API sends a job whose inputs are data: URIs to the run queue at stage ``prepare``; a
    batching worker checks its inputs itself (as the job's own run task would) and takes it."""
    rt = runtime(settings, upscale_max_batch=4, upscale_batch_wait_ms=0)
    leader = make_job(
        db,
        queue=queue,
        payload={"image_url": png_uri(24), "scale": 2},
        inputs={"image_url": {"path": "/nowhere.png", "ext": "png", "width": 24, "height": 24}},
    )
    direct = make_job(db, queue=queue, stage="prepare", payload={"image_url": png_uri(24), "scale": 2})
    other_size = make_job(db, queue=queue, stage="prepare", payload={"image_url": png_uri(40), "scale": 2})
    rt.store.claim(leader, redelivered=False)

    partners = claim_partners(rt, get(db, leader))

    assert [job.id for _claim, job in partners] == [direct]
    taken = get(db, direct)
    assert (taken.status, taken.stage) == ("running", "local")
    checked = partners[0][1].inputs["image_url"]
    assert (checked["width"], checked["height"]) == (24, 24)
    with open(checked["path"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    # Checked but of another size: recorded as prepared, so its own run task does not redo it.
    skipped = get(db, other_size)
    assert (skipped.status, skipped.stage, skipped.inputs["image_url"]["width"]) == ("queued", "run", 40)


def test_a_long_stuck_preparing_job_does_not_make_the_batch_wait(
    settings: Settings, db: Database, queue: str
) -> None:
    """A row at stage prepare dispatched minutes ago (a slow download, or a message the sweep has
    yet to re-publish) is not about to join: the leader starts at once."""
    from datetime import timedelta

    from models.db import utcnow

    rt = runtime(settings, upscale_max_batch=8, upscale_batch_wait_ms=3000)
    leader = upscale_job(db, queue)
    long_ago = utcnow() - timedelta(minutes=5)
    make_job(
        db,
        queue=queue,
        stage="prepare",
        payload={"image_url": "http://x/c.png", "scale": 2},
        queued_at=long_ago,
        dispatched_at=long_ago,
    )
    rt.store.claim(leader, redelivered=False)
    started = time.monotonic()
    assert claim_partners(rt, get(db, leader)) == []
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("waiting", [0, 2], ids=["alone", "leading a batch"])
def test_a_run_that_checks_its_own_inputs_keeps_them_in_memory(
    settings: Settings, db: Database, queue: str, waiting: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job the API sent straight to the run queue (stage ``prepare``) runs from the inputs its
    run checked, held in memory: nothing goes to storage and back for it, alone or at the head of
    a batch (whose other members were checked for the batch and so are stored, as before)."""
    app = create_celery(settings.with_overrides(upscale_max_batch=4, upscale_batch_wait_ms=0))
    task = app.tasks[RUN]
    stored: list[str] = []
    save_input = task.runtime.storage.save_input
    monkeypatch.setattr(
        task.runtime.storage, "save_input", lambda job_id, *a: stored.append(job_id) or save_input(job_id, *a)
    )
    payload = {"image_url": png_uri(24), "scale": 2}
    lead = make_job(db, queue=queue, stage="prepare", payload=payload, dispatched_at=utcnow())
    others = [make_job(db, queue=queue, stage="prepare", payload=payload) for _ in range(waiting)]

    task.apply(args=(lead,), kwargs={"prepare": True})

    for job_id in [lead, *others]:
        job = get(db, job_id)
        assert (job.status, job.result["meta"]["width"]) == ("succeeded", 48), job.error
        assert job.result["meta"].get("batch_id") == (lead if waiting else None)  # one batch, led by it
    assert lead not in stored and sorted(stored) == sorted(others)
    assert not (task.runtime.storage.inputs_dir / lead).exists()
