"""The pipeline's run step, on the task's own queue: claim the job, run its engine, store its
outputs, write its final status.

The task takes a job id, never an object; the claim is a conditional UPDATE (a lifecycle move), so
a redelivered or duplicated message cannot run a finished job; no database session stays open
while the engine works. Every exception the engine raises ends this one job, its error made by
``tasks.failures.failure_of``, and the worker goes on with the next. Notifications are no task's
business: each move writes its event, and the store kicks the dispatcher (``tasks.events``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from celery import shared_task
from marshmallow import ValidationError
from PIL import Image

from config.logs import bind_job
from inference.base import Cancelled, EngineResult
from models.db import database_unreachable
from models.failures import JobFailure
from models.jobs import Job, StoredFile
from models.jobstore import Claim, ClaimRefused, JobStore
from models.state import is_final
from tasks import catalog
from tasks.batching import BatchControl, claim_partners
from tasks.celery_app import RUN
from tasks.engines import BATCH_ENGINES, ENGINES, EngineCall
from tasks.failures import failure_of
from tasks.inputs import FetchCancelled, InputProblem, TransientFetchError, decode_image
from tasks.next_step import SLOTTED
from tasks.outputs import note_refusal_end, record_outcome, store_outputs
from tasks.prepare import load_inputs, validate_payload
from tasks.runtime import JobTask, Runtime
from tasks.scheduling import fill_slots

log = logging.getLogger("aiorch.tasks")

PROGRESS_INTERVAL = 0.5  # seconds between progress writes: never a database write per step


class JobControl:
    """The ``RunControl`` engines see: throttled progress writes and a per-call cancel check.

    Progress writes are throttled to one per ``PROGRESS_INTERVAL``, counted from the claim (which
    already wrote ``running``), so a job shorter than that writes no progress row at all: a tiny
    upscale costs two fewer round trips to the database. The cancel flag is read on
    every ``should_stop`` (one primary-key SELECT, well under a millisecond next to a diffusion
    step), so a cancel is seen at the next step; a progress write reads the flag too, and the
    ``should_stop`` right after it reuses that answer instead of asking again. Each write is a
    ``progress`` move, so its event reaches a webhook that asked for ``job.progress``. Neither
    fails the engine while the database is unreachable: the run goes on, and its final write is
    what waits for the database (``JobTask``).
    """

    def __init__(self, store: JobStore, claim: Claim):
        self.store = store
        self.claim = claim
        self._last_write = time.monotonic()
        self._flag_fresh = False  # the last progress write already read the cancel flag
        self._stop = False

    def progress(self, percent: float) -> None:
        now = time.monotonic()
        if now - self._last_write >= PROGRESS_INTERVAL:
            self._last_write = now
            try:
                self._stop = self.store.report_progress(self.claim, int(percent)) or self._stop
            except Exception as exc:  # the engine goes on; the final write waits for the database
                if not database_unreachable(exc):
                    raise
                log.warning("progress of %s not written: database unreachable", self.claim.job_id)
                return
            self._flag_fresh = True

    def should_stop(self) -> bool:
        if not self._stop and not self._flag_fresh:
            try:
                self._stop = self.store.cancel_requested(self.claim.job_id)
            except Exception as exc:  # asked again at the next step
                if not database_unreachable(exc):
                    raise
        self._flag_fresh = False
        return self._stop


@shared_task(bind=True, base=JobTask, name=RUN, soft_time_limit=600, time_limit=660)
def run_job(self: JobTask, job_id: str, recovered: bool = False, prepare: bool = False) -> None:
    """Claim the job, run its engine, store the outputs and the final status.

    ``prepare``: the job was sent here straight from PREPARING, because none of its inputs needs
    the network (``tasks.next_step``). The claim takes it from there and its inputs are checked
    right after, with the same rules and errors as on the prepare queue (a bad input ends the
    claimed job ``failed``).

    Whatever became of the job, its slot is free afterwards: the waiting jobs of the queue get it
    in fair order (``tasks.scheduling``).
    """
    try:
        _run_job(self, job_id, recovered, prepare)
    finally:
        queue = (self.request.delivery_info or {}).get("routing_key")
        if queue in SLOTTED:
            fill_slots(self.runtime, self.app, queue)


def _run_job(self: JobTask, job_id: str, recovered: bool, prepare: bool) -> None:
    rt = self.runtime
    redelivered = bool((self.request.delivery_info or {}).get("redelivered")) or recovered
    try:
        claim, job = rt.store.claim_job(job_id, redelivered=redelivered, from_prepare=prepare)
    except ClaimRefused as refused:
        log.info("not running %s: %s", job_id, refused.reason)
        if refused.finalized:
            rt.storage.remove_inputs(job_id)
            note_refusal_end(rt, job_id)
        return
    spec = catalog.TASKS[job.engine_task]
    if job.inputs is None and spec.inputs:
        # Claimed straight from PREPARING (or re-claimed after its worker died before the inputs
        # were recorded): check them now.
        with bind_job(job_id=job_id, task=job.task, worker=self.request.hostname or ""):
            try:
                job.inputs = load_inputs(rt, job)
            except (ValidationError, InputProblem, TransientFetchError, FetchCancelled) as exc:
                rt.storage.remove_inputs(claim.job_id)
                record_outcome(rt, claim, failure_of(exc), result=None, files=[], backend=None)
                return
    if spec.engine in BATCH_ENGINES and claim.neighbours:
        partners = claim_partners(rt, job)
        if partners:
            _run_batch(self, rt, spec, [(claim, job), *partners])
            return
    _run_claimed(self, rt, spec, claim, job)


def _run_claimed(
    task: JobTask,
    rt: Runtime,
    spec: catalog.TaskSpec,
    claim: Claim,
    job: Job,
    prepared: tuple[EngineCall, EngineResult | Exception] | None = None,
) -> None:
    """Run one claimed job to its final status and store its outputs.

    ``prepared``: the job's call and outcome from a batched engine run (``_run_batch``), which
    then only needs storing and finishing here, through the same failure mapping.
    """
    job_id = job.id
    with bind_job(job_id=job_id, task=job.task, worker=task.request.hostname or ""):
        backend = None
        result: dict[str, Any] | None = None
        failure: JobFailure | None = None
        files: list[StoredFile] = []
        try:
            if prepared is None:
                payload = validate_payload(spec, job.payload, rt.settings)
                images = _open_inputs(job.inputs or {})
                control = JobControl(rt.store, claim)
                call = EngineCall(job.engine_task, payload, images, control, claim.attempt, rt.settings)
                outcome = ENGINES[spec.engine or ""](call)
            else:
                payload, outcome = prepared[0].payload, _batched_outcome(rt, job_id, prepared[1])
            backend = outcome.backend
            result, files = store_outputs(rt, job_id, job.client_id, outcome, payload, job.inputs or {})
        except Exception as exc:  # it fails this job (the mapping says how); the worker goes on
            if database_unreachable(exc):
                raise  # not the job's fault: the task waits for the database (``JobTask``)
            failure = failure_of(exc, time_limit=spec.soft_time_limit)
        if record_outcome(rt, claim, failure, result=result, files=files, backend=backend):
            rt.storage.remove_inputs(job_id)
        elif _ended_elsewhere(rt, job_id):
            # Fenced off because the job ended without this run (an operator's revoke): nobody
            # else will run it, so its inputs go now. A job re-claimed by another run keeps them.
            rt.storage.remove_inputs(job_id)


def _ended_elsewhere(rt: Runtime, job_id: str) -> bool:
    job = rt.store.get(job_id)
    return job is None or is_final(job.status)


def _run_batch(task: JobTask, rt: Runtime, spec: catalog.TaskSpec, members: list[tuple[Claim, Job]]) -> None:
    """Run claimed jobs that share a batch key (tasks/batching.py) in one engine call, then store
    and finish each one on its own."""
    calls: list[EngineCall] = []
    batched: list[tuple[Claim, Job]] = []
    for claim, job in members:
        try:
            payload = validate_payload(spec, job.payload, rt.settings)
            images = _open_inputs(job.inputs or {})
        except Exception:
            # Bad payload or unreadable input: the single path fails it with its usual error.
            _run_claimed(task, rt, spec, claim, job)
            continue
        control = JobControl(rt.store, claim)
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
