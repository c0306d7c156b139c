"""The pipeline's first step, on the cpu queue: fetch and check a job's inputs into storage, then
send the job on (``tasks.next_step``).

A bad payload or input fails the job here, before any engine or provider sees it; a network
failure worth retrying retries the task, backing off, and fails the job (``input_unreachable``)
only when the retries are spent. The same checks run on the run queue for a job the API sent
there directly (``load_inputs``), and for a batching neighbour (``checked_inputs``).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from marshmallow import ValidationError

from config import Settings
from config.logs import bind_job
from models.failures import JobFailure
from models.jobs import Job
from models.state import JobStatus, Phase
from tasks import catalog, payloads
from tasks.celery_app import PREPARE
from tasks.failures import failure_of
from tasks.inputs import FetchCancelled, InputProblem, TransientFetchError
from tasks.next_step import send_next
from tasks.runtime import JobTask, Runtime, note_ended
from tasks.scheduling import fill_slots

log = logging.getLogger("aiorch.tasks")


@shared_task(
    bind=True, base=JobTask, name=PREPARE, queue="cpu", soft_time_limit=180, time_limit=210, max_retries=4
)
def prepare_job(self: JobTask, job_id: str) -> None:
    """Fetch and check the job's inputs into storage, then publish its next step."""
    rt = self.runtime
    job = rt.store.get(job_id)
    if job is None or job.status != JobStatus.QUEUED.value or job.stage != Phase.PREPARING.value:
        return
    with bind_job(job_id=job_id, task=job.task, worker=self.request.hostname or ""):
        try:
            inputs = load_inputs(rt, job)
        except FetchCancelled:
            rt.storage.remove_inputs(job_id)
            fill_slots(rt, self.app, job.queue)  # it held a slot of its queue: free now
            return
        except (ValidationError, InputProblem, TransientFetchError) as exc:
            failure = failure_of(exc)
            if failure.retryable and self.request.retries < self.max_retries:
                log.warning("input fetch failed, retrying: %s", failure.message)
                raise self.retry(countdown=min(30, 2**self.request.retries), exc=exc) from None
            fail_before_run(rt, job_id, failure)
            fill_slots(rt, self.app, job.queue)
            return
        prepared = rt.store.set_prepared(job_id, inputs)
        if prepared is None:
            # Cancelled (or expired) while the inputs were downloading: it stays that way.
            rt.storage.remove_inputs(job_id)
            fill_slots(rt, self.app, job.queue)
            return
        send_next(self.app, rt.settings, prepared)


def checked_inputs(rt: Runtime, job: Job) -> dict[str, Any] | None:
    """The ``inputs`` a queued job runs with (``load_inputs``), or None when it ended here: a
    bad payload or input fails it; a cancel while downloading leaves it cancelled. A network
    failure worth retrying raises ``TransientFetchError``."""
    try:
        return load_inputs(rt, job)
    except (ValidationError, InputProblem) as exc:
        fail_before_run(rt, job.id, failure_of(exc))
    except FetchCancelled:
        rt.storage.remove_inputs(job.id)
    return None


def validate_payload(spec: catalog.TaskSpec, payload: dict[str, Any], settings: Settings) -> dict[str, Any]:
    return catalog.payload_schema(spec, settings).load(payload)


def load_inputs(rt: Runtime, job: Job, kept: dict[str, bytes] | None = None) -> dict[str, Any]:
    """Validate the stored payload, then fetch and check its inputs into storage.

    ``kept``: the run that checks them is the one that uses them (a job claimed straight from
    PREPARING, ``tasks.run``): its images stay in this dict, by stored name, instead of going
    to storage and back (a PUT, a GET and a DELETE per input on a bucket). Nothing else reads
    them: such a run records no ``inputs``, and a run of it after a crash checks them again. A
    video still goes to storage (its engine reads a file)."""
    spec = catalog.TASKS[job.engine_task]
    payload = validate_payload(spec, job.payload, rt.settings)
    return _fetch_inputs(rt, job.id, job.client_id, spec, payload, kept)


def _fetch_inputs(
    rt: Runtime,
    job_id: str,
    client_id: str,
    spec: catalog.TaskSpec,
    payload: dict[str, Any],
    kept: dict[str, bytes] | None = None,
) -> dict[str, Any]:
    stored: dict[str, Any] = {}

    def should_stop() -> bool:
        return rt.store.cancel_requested(job_id)

    for field in spec.inputs:
        value = payload.get(field)
        if value is None:
            continue
        paths = []
        # A reference, a list of them, or a list of objects holding one each (controlnets).
        for index, (label, ref) in enumerate(payloads.input_refs(field, value)):
            is_video = field in spec.videos
            load = rt.fetcher.load_video if is_video else rt.fetcher.load
            checked = load(ref, label, should_stop, owner=client_id)
            name = f"{field}_{index}.{checked.ext}"
            if kept is not None and not is_video:
                kept[name] = checked.data
                saved: dict[str, Any] = {"name": name}
            else:
                # Into storage (a bucket, with several hosts): the run step may be on another host.
                saved = rt.storage.save_input(job_id, name, checked.data)
            paths.append({**saved, "ext": checked.ext, "width": checked.width, "height": checked.height})
            if is_video:
                paths[-1]["kind"] = "video"  # the engine reads the file itself, frame by frame
        stored[field] = paths if isinstance(value, list) else paths[0]
    return stored


def fail_before_run(rt: Runtime, job_id: str, failure: JobFailure) -> None:
    """End a job that never ran (a bad payload or input), its fetched inputs removed."""
    log.info("input refused: %s (%s)", failure.message, failure.code)
    rt.storage.remove_inputs(job_id)
    if rt.store.fail_unclaimed(job_id, failure):
        note_ended(job_id, failure)
