"""The job pipeline as Celery tasks: prepare (cpu) -> run (the task's queue) -> finish (cpu).

Each task takes a job id, never an object; loads the row; moves it through ``models.jobstore``
(conditional UPDATEs, so a redelivered or duplicated message cannot run a finished job); calls one
engine; and holds no database session while the engine works.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init
from kombu.exceptions import OperationalError
from marshmallow import ValidationError
from PIL import Image

from config import Settings
from config.logs import bind_job
from inference.base import Cancelled, ContentRejected, EngineError, EngineResult
from inference.watermark import add_label
from models.assets import AssetStore, output_asset
from models.db import Database
from models.jobs import StoredFile
from models.jobstore import Claim, ClaimRefused, JobStore
from models.state import JobStatus
from tasks import catalog
from tasks.batching import BatchControl, claim_partners
from tasks.celery_app import FINISH, PREPARE, RUN, SWEEP, publish
from tasks.engines import BATCH_ENGINES, ENGINES, EngineCall
from tasks.inputs import FetchCancelled, Fetcher, InputProblem, TransientFetchError, decode_image
from tasks.storage import SavedFile, Storage, default_format, encode_image, write_private

log = logging.getLogger("aiorch.tasks")

PROGRESS_INTERVAL = 0.5  # seconds between progress writes: never a database write per step


class Runtime:
    """What a worker process needs, built lazily in the process that uses it (after fork)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.db = Database(settings)
        self.store = JobStore(self.db, settings.max_attempts)
        self.storage = Storage(settings)
        self.assets = AssetStore(self.db)
        self.fetcher = Fetcher(settings, resolve_asset=self._asset_path)

    def _asset_path(self, asset_id: str, client_id: str) -> Path | None:
        """The file of ``asset://<asset_id>`` for a job of ``client_id``: looked up by id AND
        owner, so another client's asset is missing exactly like a deleted one."""
        row = self.assets.get(client_id, asset_id)
        return None if row is None else self.storage.asset_path(row.kind, row.name)


_runtimes: dict[int, Runtime] = {}


@worker_process_init.connect
def _forget_parent_runtime(**_: Any) -> None:
    # A forked child must not reuse the parent's database connections.
    _runtimes.clear()


class JobTask(Task):
    """Base for the pipeline tasks: late acks, requeue when the worker process dies."""

    abstract = True
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True

    @property
    def runtime(self) -> Runtime:
        settings: Settings = self.app.aiorch_settings  # type: ignore[attr-defined]
        key = id(settings)
        if key not in _runtimes:
            _runtimes[key] = Runtime(settings)
        return _runtimes[key]


class JobControl:
    """The ``RunControl`` engines see: throttled progress writes and a per-call cancel check.

    Progress writes are throttled to one per ``PROGRESS_INTERVAL``, counted from the claim (which
    already wrote ``running``), so a job shorter than that writes no progress row at all: a tiny
    upscale costs two fewer round trips to the database. The cancel flag is read on
    every ``should_stop`` (one primary-key SELECT, well under a millisecond next to a diffusion
    step), so a cancel is seen at the next step; a progress write reads the flag too, and the
    ``should_stop`` right after it reuses that answer instead of asking again.
    """

    def __init__(self, store: JobStore, claim: Claim, on_progress: Any = None):
        self.store = store
        self.claim = claim
        self.on_progress = on_progress
        self._last_write = time.monotonic()
        self._flag_fresh = False  # the last progress write already read the cancel flag
        self._stop = False

    def progress(self, percent: float) -> None:
        now = time.monotonic()
        if now - self._last_write >= PROGRESS_INTERVAL:
            self._last_write = now
            self._stop = self.store.report_progress(self.claim, int(percent)) or self._stop
            self._flag_fresh = True
            if self.on_progress is not None:
                self.on_progress()

    def should_stop(self) -> bool:
        if not self._stop and not self._flag_fresh:
            self._stop = self.store.cancel_requested(self.claim.job_id)
        self._flag_fresh = False
        return self._stop


def validate_payload(spec: catalog.TaskSpec, payload: dict[str, Any], settings: Settings) -> dict[str, Any]:
    return catalog.payload_schema(spec, settings).load(payload)


# -- prepare ----------------------------------------------------------------------------------------


@shared_task(
    bind=True, base=JobTask, name=PREPARE, queue="cpu", soft_time_limit=180, time_limit=210, max_retries=4
)
def prepare_job(self: JobTask, job_id: str) -> None:
    """Fetch and check the job's inputs into storage, then publish it to its run queue."""
    rt = self.runtime
    job = rt.store.get(job_id)
    if job is None or job.status != JobStatus.QUEUED.value or job.stage != "prepare":
        return
    with bind_job(job_id=job_id, task=job.task, worker=self.request.hostname or ""):
        spec = catalog.TASKS[job.engine_task]
        try:
            inputs = checked_inputs(rt, self.app, job)
        except TransientFetchError as exc:
            if self.request.retries >= self.max_retries:
                _fail_before_run(rt, self.app, job_id, {"code": "input_unreachable", "message": str(exc)})
                return
            log.warning("input fetch failed, retrying: %s", exc)
            raise self.retry(countdown=min(30, 2**self.request.retries), exc=exc) from None
        if inputs is None:
            return
        if not rt.store.set_prepared(job_id, inputs):
            # Cancelled (or expired) while the inputs were downloading: it stays that way.
            rt.storage.remove_inputs(job_id)
            return
        if rt.settings.routes.remote_first(job.task, job.engine_task):
            # A remote provider serves it: submit and poll on the cpu queue (tasks/remote.py), which
            # hands the job back to RUN if the route falls through to "local".
            from tasks.remote import SUBMIT_REMOTE

            publish(self.app, SUBMIT_REMOTE, job_id, "cpu", job.priority)
            return
        publish(self.app, RUN, job_id, job.queue, job.priority, **catalog.time_limits(spec))


def checked_inputs(rt: Runtime, app: Any, job: Any) -> dict[str, Any] | None:
    """The ``inputs`` a queued job runs with (``load_inputs``), or None when it ended here: a
    bad payload or input fails it and publishes its finish; a cancel while downloading leaves it
    cancelled. A network failure worth retrying raises ``TransientFetchError``."""
    try:
        return load_inputs(rt, job)
    except (ValidationError, InputProblem) as exc:
        _fail_before_run(rt, app, job.id, input_error(exc))
    except FetchCancelled:
        rt.storage.remove_inputs(job.id)
    return None


def load_inputs(rt: Runtime, job: Any) -> dict[str, Any]:
    """Validate the stored payload, then fetch and check its inputs into storage."""
    spec = catalog.TASKS[job.engine_task]
    payload = validate_payload(spec, job.payload, rt.settings)
    return _fetch_inputs(rt, job.id, job.client_id, spec, payload)


def input_error(exc: ValidationError | InputProblem) -> dict[str, Any]:
    if isinstance(exc, ValidationError):
        return {"code": "invalid_payload", "message": "The payload is invalid.", "details": exc.messages}
    log.info("input refused: %s", exc.message)
    return exc.as_error()


def _fetch_inputs(
    rt: Runtime, job_id: str, client_id: str, spec: catalog.TaskSpec, payload: dict[str, Any]
) -> dict[str, Any]:
    folder = rt.storage.input_dir(job_id)
    stored: dict[str, Any] = {}

    def should_stop() -> bool:
        return rt.store.cancel_requested(job_id)

    for field in spec.inputs:
        value = payload.get(field)
        if value is None:
            continue
        refs = value if isinstance(value, list) else [value]
        paths = []
        for index, ref in enumerate(refs):
            label = f"{field}[{index}]" if isinstance(value, list) else field
            is_video = field in spec.videos
            load = rt.fetcher.load_video if is_video else rt.fetcher.load
            checked = load(ref, label, should_stop, owner=client_id)
            path = folder / f"{field}_{index}.{checked.ext}"
            # Written aside and renamed: two workers may prepare the same job at once (its own
            # run message and a batching neighbour), and neither may read half a file.
            write_private(path, checked.data)
            paths.append(
                {"path": str(path), "ext": checked.ext, "width": checked.width, "height": checked.height}
            )
            if is_video:
                paths[-1]["kind"] = "video"  # the engine reads the file itself, frame by frame
        stored[field] = paths if isinstance(value, list) else paths[0]
    return stored


def _fail_before_run(rt: Runtime, app: Any, job_id: str, error: dict[str, Any]) -> None:
    rt.storage.remove_inputs(job_id)
    if rt.store.fail_unclaimed(job_id, JobStatus.FAILED, error):
        _publish_finish(app, job_id)


def _publish_finish(app: Any, job_id: str, job: Any = None) -> None:
    """Queue the finish task, which delivers ``job.finished``; given the ``job`` and it has no
    webhook, there is nothing to deliver and no message is sent (nor a cpu worker's time spent
    while its client polls for the result)."""
    if job is not None and not job.webhook_url:
        return
    try:
        publish(app, FINISH, job_id, "cpu")
    except OperationalError:
        # The job's outcome is already in the database; only the notification waits for the
        # sweep to find it.
        log.warning("could not publish finish for %s", job_id)


# -- run --------------------------------------------------------------------------------------------


@shared_task(bind=True, base=JobTask, name=RUN, soft_time_limit=600, time_limit=660)
def run_job(self: JobTask, job_id: str, recovered: bool = False, prepare: bool = False) -> None:
    """Claim the job, run its engine, store the outputs and the final status.

    ``prepare``: the API sent the job here directly, skipping the prepare task, because none of
    its inputs needs the network (``catalog.fetch_free``). The claim takes it from stage
    ``prepare`` and its inputs are checked right after, with the same rules and errors as on the
    prepare queue (a bad input ends the claimed job ``failed``).
    """
    rt = self.runtime
    redelivered = bool((self.request.delivery_info or {}).get("redelivered")) or recovered
    try:
        claim, job = rt.store.claim_job(job_id, redelivered=redelivered, from_prepare=prepare)
    except ClaimRefused as refused:
        log.info("not running %s: %s", job_id, refused.reason)
        if refused.finalized:
            rt.storage.remove_inputs(job_id)
            _publish_finish(self.app, job_id)
        return
    spec = catalog.TASKS[job.engine_task]
    if job.inputs is None and spec.inputs:
        # Claimed straight from the API's message (or re-claimed after its worker died before
        # the inputs were recorded): check them now.
        with bind_job(job_id=job_id, task=job.task, worker=self.request.hostname or ""):
            try:
                job.inputs = load_inputs(rt, job)
            except (ValidationError, InputProblem, TransientFetchError, FetchCancelled) as exc:
                _end_claimed(self.app, rt, claim, job, exc)
                return
    if spec.engine in BATCH_ENGINES and claim.neighbours:
        partners = claim_partners(rt, self.app, job)
        if partners:
            _run_batch(self, rt, spec, [(claim, job), *partners])
            return
    _run_claimed(self, rt, spec, claim, job)


def _end_claimed(app: Any, rt: Runtime, claim: Claim, job: Any, exc: Exception) -> None:
    """A claimed job whose inputs did not pass: failed (or cancelled) through the fenced finish."""
    if isinstance(exc, FetchCancelled):
        status, error = JobStatus.CANCELLED, {"code": "cancelled", "message": "The job was cancelled."}
    elif isinstance(exc, (ValidationError, InputProblem)):
        status, error = JobStatus.FAILED, input_error(exc)
    else:
        status, error = JobStatus.FAILED, {"code": "input_unreachable", "message": str(exc)}
    rt.storage.remove_inputs(claim.job_id)
    if rt.store.finish(claim, status, error=error):
        _publish_finish(app, claim.job_id, job)


def _run_claimed(
    task: JobTask,
    rt: Runtime,
    spec: catalog.TaskSpec,
    claim: Claim,
    job: Any,
    prepared: tuple[EngineCall, EngineResult | Exception] | None = None,
) -> None:
    """Run one claimed job to its final status and store its outputs.

    ``prepared``: the job's call and outcome from a batched engine run (``_run_batch``), which
    then only needs storing and finishing here, through the same error mapping.
    """
    job_id = job.id
    with bind_job(job_id=job_id, task=job.task, worker=task.request.hostname or ""):
        if prepared is None:
            control = JobControl(rt.store, claim, _progress_events(rt, task.app, job))
        status, backend = JobStatus.FAILED, None
        result: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        files: list[StoredFile] = []
        try:
            if prepared is None:
                payload = validate_payload(spec, job.payload, rt.settings)
                images = _open_inputs(job.inputs or {})
                call = EngineCall(job.engine_task, payload, images, control, claim.attempt, rt.settings)
                outcome = ENGINES[spec.engine or ""](call)
            else:
                payload, outcome = prepared[0].payload, _batched_outcome(rt, job_id, prepared[1])
            backend = outcome.backend
            result, files = _store_outputs(rt, job_id, job.client_id, outcome, payload, job.inputs or {})
            status = JobStatus.SUCCEEDED
        except Cancelled:
            status, error = (
                JobStatus.CANCELLED,
                {"code": "cancelled", "message": "The job was cancelled while running."},
            )
        except ContentRejected as exc:
            status, error = JobStatus.REJECTED, {"code": exc.code, "message": str(exc)}
        except EngineError as exc:
            error = {"code": exc.code, "message": str(exc)}
            if exc.field:
                error["details"] = {"field": exc.field}
        except SoftTimeLimitExceeded:
            error = {"code": "timeout", "message": f"The job ran longer than {spec.soft_time_limit} s."}
        except Exception as exc:  # an engine bug fails this job; the worker goes on with the next
            log.exception("engine crashed")
            error = {"code": "engine_error", "message": f"{type(exc).__name__}: {exc}"[:500]}
        if not rt.store.finish(
            claim,
            status,
            result=result,
            error=error,
            backend=backend,
            files=files,
            retention=rt.settings.result_retention,
        ):
            # Fenced off: cancelled or re-claimed meanwhile. Our outputs are not the job's.
            rt.storage.delete_outputs([f.name for f in files])
            return
        rt.storage.remove_inputs(job_id)
        _publish_finish(task.app, job_id, job)


def _run_batch(task: JobTask, rt: Runtime, spec: catalog.TaskSpec, members: list[tuple[Claim, Any]]) -> None:
    """Run claimed jobs that share a batch key (tasks/batching.py) in one engine call, then store
    and finish each one on its own."""
    calls: list[EngineCall] = []
    batched: list[tuple[Claim, Any]] = []
    for claim, job in members:
        try:
            payload = validate_payload(spec, job.payload, rt.settings)
            images = _open_inputs(job.inputs or {})
        except Exception:
            # Bad payload or unreadable input: the single path fails it with its usual error.
            _run_claimed(task, rt, spec, claim, job)
            continue
        control = JobControl(rt.store, claim, _progress_events(rt, task.app, job))
        calls.append(EngineCall(job.engine_task, payload, images, control, claim.attempt, rt.settings))
        batched.append((claim, job))
    if not calls:
        return
    leader = batched[0][1]
    with bind_job(job_id=leader.id, task=leader.task, worker=task.request.hostname or ""):
        log.info("running %d %s jobs as one batch", len(calls), spec.name)
        try:
            outcomes = BATCH_ENGINES[spec.engine or ""](calls, BatchControl([c.control for c in calls]))
        except Exception as exc:  # Cancelled, a time limit, a crash: it ends every job of the batch
            outcomes = [exc] * len(calls)
    for (claim, job), call, outcome in zip(batched, calls, outcomes, strict=True):
        if isinstance(outcome, EngineResult):
            for output in outcome.images:
                # Which batch it ran in, so a client or an operator can see batching happen.
                output.meta["batch_id"] = leader.id
        _run_claimed(task, rt, spec, claim, job, prepared=(call, outcome))


def _batched_outcome(rt: Runtime, job_id: str, outcome: EngineResult | Exception) -> EngineResult:
    if isinstance(outcome, Exception):
        raise outcome
    if rt.store.cancel_requested(job_id):
        # Cancelled while its batch ran on: the output exists but the client no longer wants it.
        raise Cancelled()
    return outcome


def _progress_events(rt: Runtime, app: Any, job: Any) -> Any:
    """Opt-in ``job.started`` now and a ``job.progress`` callback (throttled by JobControl)."""
    wanted = set(job.webhook_events or ()) if job.webhook_url else set()
    if not wanted:
        return None
    from tasks.webhooks import schedule_event

    def send(event: str) -> None:
        current = rt.store.get(job.id)
        if current is not None:
            try:
                schedule_event(rt.db, app, current, event)
            except OperationalError:
                log.warning("progress event for %s not published", job.id)

    send("job.started")
    return (lambda: send("job.progress")) if "job.progress" in wanted else None


def _open_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    def open_one(entry: dict[str, Any]) -> Image.Image | Path:
        if entry.get("kind") == "video":
            return Path(entry["path"])
        with open(entry["path"], "rb") as handle:
            return decode_image(handle.read())

    return {
        field: [open_one(e) for e in value] if isinstance(value, list) else open_one(value)
        for field, value in inputs.items()
    }


def _store_outputs(
    rt: Runtime,
    job_id: str,
    client_id: str,
    outcome: EngineResult,
    payload: dict[str, Any],
    inputs: dict[str, Any],
) -> tuple[dict[str, Any], list[StoredFile]]:
    # The picture the output is made from sets its default format: a face swap's target, not
    # its first source.
    first_input = inputs.get("target_url") or next(iter(inputs.values()), None)
    input_ext = first_input.get("ext") if isinstance(first_input, dict) else None
    watermark = payload.get("watermark")
    outputs: list[dict[str, Any]] = []
    rows: list[StoredFile] = []

    def keep(saved: SavedFile, meta: dict[str, Any], width: Any, height: Any) -> None:
        # Every output is also an asset of the job's client (result.asset_id, files[].asset_id).
        row = output_asset(saved.name, job_id, client_id, saved.content_type, saved.size, width, height)
        rows.append(row)
        entry = {"url": rt.storage.url_for(saved.name), "filename": saved.name, "asset_id": row.asset_id}
        outputs.append({**entry, "meta": meta})

    for output in outcome.images:
        image = output.image
        if watermark:
            image = add_label(image, **watermark)
        fmt = payload.get("format") or default_format(image, input_ext)
        saved = rt.storage.save_output(encode_image(image, fmt), fmt)
        meta = {
            **output.meta,
            "width": image.width,
            "height": image.height,
            "backend": outcome.backend,
            "format": fmt,
        }
        keep(saved, meta, image.width, image.height)
    for produced in outcome.files:
        # A video the engine wrote to a scratch file: stored under its own random name.
        try:
            saved = rt.storage.save_output(produced.path.read_bytes(), produced.ext)
        finally:
            produced.path.unlink(missing_ok=True)
        meta = {**produced.meta, "backend": outcome.backend, "format": produced.ext}
        keep(saved, meta, meta.get("width"), meta.get("height"))
    result: dict[str, Any] = {"ok": True, "status": JobStatus.SUCCEEDED.value}
    if outputs:
        result.update(outputs[0])
    else:
        result["meta"] = {"backend": outcome.backend}
    if len(outputs) > 1:
        result["files"] = outputs
    if outcome.data:
        result.update(outcome.data)
    return result, rows


# -- finish -----------------------------------------------------------------------------------------


@shared_task(bind=True, base=JobTask, name=FINISH, queue="cpu", soft_time_limit=60, time_limit=90)
def finish_job(self: JobTask, job_id: str) -> None:
    """After a job reached a final status: notify its webhook (delivery has its own retries)."""
    rt = self.runtime
    job = rt.store.get(job_id)
    if job is None:
        return
    rt.storage.remove_inputs(job_id)
    from tasks.webhooks import schedule_event

    # This task already runs on the cpu queue, where deliveries run: the first attempt is made
    # here rather than queued (under the same per-receiver breaker and timeouts).
    schedule_event(rt.db, self.app, job, now=True)


# -- sweeps -----------------------------------------------------------------------------------------


@shared_task(bind=True, base=JobTask, name=SWEEP, queue="cpu", soft_time_limit=120, time_limit=150)
def sweep_jobs(self: JobTask) -> dict[str, int]:
    """Periodic: expire jobs past their TTL, re-publish jobs whose message was lost, recover runs
    whose worker vanished, and delete output files past their retention."""
    rt = self.runtime
    return sweep(rt, self.app)


def sweep(rt: Runtime, app: Any) -> dict[str, int]:
    expired = rt.store.expire_queued(rt.settings.job_ttl)
    for job_id in expired:
        rt.storage.remove_inputs(job_id)
        _publish_finish(app, job_id)
    # Remote jobs go back to their submit or poll task on cpu (tasks/remote.py), never to RUN.
    from tasks.remote import republish_remote, resume_remote

    republished = 0
    for job_id, stage, queue, priority in rt.store.stuck_jobs(rt.settings.republish_after):
        try:
            if stage == "prepare":
                publish(app, PREPARE, job_id, "cpu", priority)
            elif not republish_remote(rt, app, job_id, priority):
                job = rt.store.get(job_id)
                if job is None:
                    continue  # deleted since stuck_jobs listed it
                publish(
                    app, RUN, job_id, queue, priority, **catalog.time_limits(catalog.TASKS[job.engine_task])
                )
        except OperationalError:
            break
        rt.store.mark_dispatched(job_id)
        republished += 1
    recovered = 0
    for job_id, queue, priority, engine_task, silent_for in rt.store.running_silence():
        spec = catalog.TASKS[engine_task]
        try:
            # A job at a provider is quiet between polls, not dead: it resumes its poll (or
            # submit) once silent past the longest poll wait, and never runs on a local engine.
            resumed = resume_remote(rt, app, job_id, silent_for)
        except OperationalError:
            break
        if resumed is not None:
            recovered += int(resumed)
            continue
        # A running job silent past its hard time limit lost its worker (progress writes
        # refresh updated_at); on the embedded transport its message died with the worker.
        if silent_for < spec.time_limit + 60:
            continue
        try:
            publish(
                app,
                RUN,
                job_id,
                queue,
                priority,
                task_kwargs={"recovered": True},
                **catalog.time_limits(spec),
            )
        except OperationalError:
            break
        recovered += 1
    removed = rt.store.expired_files()  # outputs and uploads
    rt.storage.delete_files(removed)
    from tasks.webhooks import due_deliveries, lost_finishes

    retried = due_deliveries(rt, app)
    resent = lost_finishes(rt, app)
    return {
        "expired": len(expired),
        "republished": republished,
        "recovered": recovered,
        "files_removed": len(removed),
        "webhooks_retried": retried,
        "webhooks_resent": resent,
    }
