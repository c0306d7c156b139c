"""What Flower shows of a job's tasks, on the run's Postgres: a task ends in FAILURE (``JobFailed``,
"<code>: <message>") only when it ended its own job failed or rejected; its Celery id starts with
the job's id; a revoke of one of the job's pipeline tasks ends the job ``cancelled``
(``revoked_by_operator``), whoever holds its claim, and nothing runs or re-publishes it after."""

from __future__ import annotations

import base64
import io
import pickle
from typing import Any

import pytest
from billiard.einfo import ExceptionInfo
from celery import Celery
from celery.app.task import Context
from celery.app.trace import get_log_policy, log_policy_expected
from celery.signals import task_revoked
from celery.worker.control import Panel
from PIL import Image

from config import Settings
from models.db import Database
from models.failures import JobFailure
from models.jobstore import ClaimRefused, JobStore
from models.state import JobStatus
from tasks import revocation
from tasks.celery_app import DELIVER, POLL_REMOTE, PREPARE, RUN, SUBMIT_REMOTE, create_celery, task_message
from tasks.consumer import Consumer
from tasks.outputs import record_outcome
from tasks.prepare import prepare_job
from tasks.run import JobControl, run_job
from tasks.runtime import JobFailed, JobTask, Runtime
from tests.support.factories import make_job

DEBUG = dict(task="debug_sleep", engine_task="debug_sleep", queue="gpu.diffusion")


@pytest.fixture()
def app(settings: Settings) -> Celery:
    return create_celery(settings)  # the app the tasks run under (its settings)


def png_data_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def job_row(db: Database, job_id: str) -> Any:
    job = JobStore(db).get(job_id)
    assert job is not None
    return job


def test_a_workers_monitoring_events_go_without_a_confirm_and_its_jobs_messages_with_one(app: Celery) -> None:
    """The worker's event connection (``tasks.consumer``, the consumer Celery builds for this app)
    asks for no publisher confirm; every other connection of the app keeps the one it has."""
    assert app.conf.worker_consumer == "tasks.consumer:Consumer"
    consumer = Consumer.__new__(Consumer)  # what its Events bootstep asks of it needs no more
    consumer.app = app
    consumer.ensure_connected = lambda conn: conn  # type: ignore[method-assign]
    events = consumer.connection_for_write()
    jobs = app.connection_for_write()
    try:
        assert events.transport_options.get("confirm_publish") is False
        assert jobs.transport_options.get("confirm_publish") is True  # RabbitMQ: each job's message
        assert {k: v for k, v in events.transport_options.items() if k != "confirm_publish"} == {
            k: v for k, v in jobs.transport_options.items() if k != "confirm_publish"
        }
    finally:
        events.release()
        jobs.release()


# -- task ids ----------------------------------------------------------------------------------------


def test_a_messages_task_id_starts_with_its_job_id_and_step_and_is_unique(app: Celery) -> None:
    ids = set()
    for name, step in ((PREPARE, "prepare"), (RUN, "run"), (SUBMIT_REMOTE, "submit"), (POLL_REMOTE, "poll")):
        task_id, (headers, _, _, _) = task_message(app, name, "a" * 32)
        job, shown_step, suffix = task_id.split(".")
        assert (job, shown_step, len(suffix)) == ("a" * 32, step, 12)
        assert headers["id"] == task_id and headers["argsrepr"] == repr(["a" * 32])
        ids.add(task_id)
    ids.update(task_message(app, RUN, "a" * 32)[0] for _ in range(50))
    assert len(ids) == 54  # a re-published step is another message, with another id


# -- a failed job is a failed task -------------------------------------------------------------------


def test_job_failed_is_an_expected_error_to_celery_and_crosses_the_pool_as_it_is() -> None:
    failed = JobFailed.of(JobFailure("input_not_image", "image_url is not an image"))
    assert str(failed) == "input_not_image: image_url is not an image"
    assert "input_not_image" in repr(failed)  # the task-failed event's ``exception``, as Flower shows it
    try:
        raise failed
    except JobFailed:
        einfo = ExceptionInfo()
    # Logged at INFO without a traceback, never as a crash, for every task of the platform.
    assert get_log_policy(run_job, einfo, failed) is log_policy_expected
    assert get_log_policy(prepare_job, einfo, failed) is log_policy_expected
    assert str(pickle.loads(pickle.dumps(failed))) == str(failed)  # from a pool child to the worker


def test_a_run_that_fails_its_job_fails_and_one_that_ends_it_otherwise_does_not(
    app: Celery, db: Database
) -> None:
    failing = make_job(db, **DEBUG, payload={"seconds": 0, "crash": "raise"})
    with pytest.raises(JobFailed, match="^engine_error: "):
        run_job(failing)
    assert job_row(db, failing).status == "failed"  # written before the task failed
    # A second copy of the message finds the job final: it did not end it, so it does not fail.
    assert run_job(failing) is None
    fine = make_job(db, **DEBUG, payload={"seconds": 0})
    assert run_job(fine) is None and job_row(db, fine).status == "succeeded"


def test_a_rejected_job_fails_its_task_and_a_cancelled_one_does_not(app: Celery, db: Database) -> None:
    # Any task that makes a claimed job's final write (a local run, a provider's submit or poll)
    # makes it through record_outcome: a refused prompt ends the job rejected, a cancel cancelled.
    rt = Runtime(app.aiorch_settings)  # type: ignore[attr-defined]
    for status, raises in ((JobStatus.REJECTED, True), (JobStatus.CANCELLED, False)):
        job_id = make_job(db, **DEBUG)
        claim = rt.store.claim(job_id, redelivered=False)
        failure = JobFailure("content_rejected", "no", status=status)

        @app.task(bind=True, base=JobTask, name=f"test.end_{status.value}", shared=False)
        def end(self: Any, job_id: str, claim: Any = claim, failure: JobFailure = failure) -> None:
            assert record_outcome(rt, claim, failure, result=None, files=[], backend=None)

        if raises:
            with pytest.raises(JobFailed, match="^content_rejected: no$"):
                end(job_id)
        else:
            assert end(job_id) is None
        assert job_row(db, job_id).status == status.value


def test_prepare_fails_when_it_refuses_an_input_and_not_when_it_hands_the_job_on(
    app: Celery, db: Database
) -> None:
    bad = make_job(db, stage="prepare", payload={"image_url": "data:image/png;base64,bm90IGFuIGltYWdl"})
    with pytest.raises(JobFailed, match=r"^input_\w+: "):
        prepare_job(bad)
    assert job_row(db, bad).status == "failed"
    good = make_job(db, stage="prepare", payload={"image_url": png_data_uri(), "scale": 2})
    assert prepare_job(good) is None  # prepared and sent to its run queue: the job goes on
    assert (job_row(db, good).status, job_row(db, good).stage) == ("queued", "run")


def test_a_batch_leader_fails_only_for_its_own_job(app: Celery, db: Database) -> None:
    rt = Runtime(app.aiorch_settings)  # type: ignore[attr-defined]
    own, other = make_job(db, **DEBUG), make_job(db, **DEBUG)
    claims = {job_id: rt.store.claim(job_id, redelivered=False) for job_id in (own, other)}
    failure = JobFailure("engine_error", "boom")

    @app.task(bind=True, base=JobTask, name="test.batch_leader", shared=False)
    def leader(self: Any, job_id: str, fail_own: bool) -> None:
        record_outcome(rt, claims[other], failure, result=None, files=[], backend=None)
        if fail_own:
            record_outcome(rt, claims[job_id], failure, result=None, files=[], backend=None)

    assert leader(own, False) is None  # a partner's failure is not this task's
    with pytest.raises(JobFailed):
        leader(own, True)


# -- a revoke cancels the job ------------------------------------------------------------------------


def test_the_worker_answers_revoke_with_the_command_that_also_ends_a_running_job() -> None:
    import tasks.worker  # noqa: F401  (what a worker loads)

    assert Panel.data["revoke"] is revocation.revoke
    assert revocation._celery_revoke is not revocation.revoke


def test_a_revoked_queued_job_ends_cancelled_by_the_operator_with_its_inputs_removed(
    app: Celery, db: Database
) -> None:
    rt = Runtime(app.aiorch_settings)  # type: ignore[attr-defined]
    job_id = make_job(db, stage="prepare")
    (rt.storage.input_dir(job_id) / "image_url_0.png").write_bytes(b"x")
    # What a worker does when it discards the revoked message: Celery's own signal.
    task_revoked.send(sender=app.tasks[PREPARE], request=Context(args=[job_id]), terminated=False)
    job = job_row(db, job_id)
    assert (job.status, job.stage) == ("cancelled", "done") and job.finished_at is not None
    assert job.error == JobFailure.revoked().as_error() and job.error["code"] == "revoked_by_operator"
    assert not (rt.storage.inputs_dir / job_id).exists()
    # Nothing sends it on again: the sweep only re-publishes queued jobs, recovers running ones.
    assert job_id not in [row[0] for row in rt.store.stuck_jobs(-3600)]
    assert revocation.cancel_revoked(app, job_id) is False  # final: a second revoke changes nothing


def test_a_terminated_run_ends_its_job_and_the_lost_claim_can_write_nothing(
    app: Celery, db: Database
) -> None:
    rt = Runtime(app.aiorch_settings)  # type: ignore[attr-defined]
    job_id = make_job(db, **DEBUG)
    claim = rt.store.claim(job_id, redelivered=False)
    task_revoked.send(sender=app.tasks[RUN], request=Context(args=[job_id]), terminated=True, signum=15)
    assert job_row(db, job_id).error["code"] == "revoked_by_operator"
    # Had the run gone on, its engine stops at the watcher's next look and its finish is fenced off.
    control = JobControl(rt.store, claim)
    control.check()
    assert control.should_stop()
    assert not record_outcome(rt, claim, None, result={"ok": True}, files=[], backend="debug")
    assert job_row(db, job_id).status == "cancelled"
    with pytest.raises(ClaimRefused):  # a redelivered copy of the message cannot run it again
        rt.store.claim_job(job_id, redelivered=True)
    assert job_id not in [row[0] for row in rt.store.running_silence()]


def test_a_revoke_running_here_without_terminate_leaves_the_inputs_to_the_run(
    app: Celery, db: Database
) -> None:
    rt = Runtime(app.aiorch_settings)  # type: ignore[attr-defined]
    job_id = make_job(db, **DEBUG)
    rt.store.claim(job_id, redelivered=False)
    (rt.storage.input_dir(job_id) / "image_url_0.png").write_bytes(b"x")
    assert revocation.cancel_revoked(app, job_id, still_running=True)
    assert job_row(db, job_id).status == "cancelled"
    assert (rt.storage.inputs_dir / job_id).exists()


@pytest.mark.parametrize(
    ("name", "expired"), [(DELIVER, False), (RUN, True)], ids=["a webhook delivery", "an expired message"]
)
def test_a_revoke_that_is_not_an_operators_of_a_pipeline_task_ends_nothing(
    app: Celery, db: Database, name: str, expired: bool
) -> None:
    job_id = make_job(db, **DEBUG)
    task_revoked.send(
        sender=app.tasks[name], request=Context(args=[job_id]), terminated=False, expired=expired
    )
    assert job_row(db, job_id).status == "queued"


def test_a_revoked_job_at_a_provider_ends_cancelled_and_its_public_input_copies_go(
    app: Celery, db: Database
) -> None:
    rt = Runtime(app.aiorch_settings)  # type: ignore[attr-defined]
    public = rt.storage.save_output(b"copy", "png")  # a public copy made for the provider
    inputs = {"image_url": {"path": "/nowhere.png", "ext": "png", "public_name": public.name}}
    job_id = make_job(db, stage="poll", status="running", backend="gone", remote_id="r-1", inputs=inputs)
    assert public.path.exists()
    task_revoked.send(sender=app.tasks[POLL_REMOTE], request=Context(args=[job_id]), terminated=False)
    assert job_row(db, job_id).error["code"] == "revoked_by_operator"
    assert not public.path.exists()
