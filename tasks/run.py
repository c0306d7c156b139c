"""The pipeline's run step, on the task's own queue: claim the job, run its engine, store its
outputs, write its final status.

The task takes a job id, never an object; the claim is a conditional UPDATE (a lifecycle move), so
a redelivered or duplicated message cannot run a finished job; no database session stays open
while the engine works. Every exception the engine raises ends this one job, its error made by
``tasks.failures.failure_of``, and the worker goes on with the next. Notifications are no task's
business: each move writes its event, and the store kicks the dispatcher (``tasks.events``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from celery import shared_task
from marshmallow import ValidationError
from PIL import Image

from config.logs import bind_job
from inference import devices, runtime
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
from tasks.runtime import JobTask, Runtime, note_device_fault
from tasks.scheduling import fill_slots
from tasks.storage import input_name

log = logging.getLogger("aiorch.tasks")

PROGRESS_INTERVAL = 0.5  # seconds between the watcher's checks: never a database query per step


class JobControl:
    """The ``RunControl`` engines see, with nothing on the engine's step path but memory.

    ``progress`` stores a number and ``should_stop`` reads a flag: a diffusion step on a GPU never
    waits for the database. The process's watcher thread (``_Watcher``; ``with control:`` hands
    the control to it and takes it back) does the talking, once every ``PROGRESS_INTERVAL``
    counted from the claim (which already wrote ``running``): when the progress (or the detail
    reported with it) moved it writes it (a ``progress`` move, fenced by the claim, whose answer
    carries the cancel flag too), else it reads the cancel flag; a flag it finds set is what the
    next ``should_stop`` returns. So a job shorter than the interval sends no query at all, and a
    cancel is seen within one interval. The watcher never fails the engine: while the database is
    unreachable the run goes on, and its final write is what waits for it (``JobTask``).
    """

    def __init__(self, store: JobStore, claim: Claim, interval: float = PROGRESS_INTERVAL):
        self.store = store
        self.claim = claim
        self.interval = interval
        self._report: tuple[int, dict[str, Any] | None] | None = None  # the engine's latest
        self._written: tuple[int, dict[str, Any] | None] | None = None  # what the database holds
        self._stop = threading.Event()
        self._looking = threading.Lock()  # held by the watcher while it looks at this run

    def progress(self, percent: float, detail: dict[str, Any] | None = None) -> None:
        self._report = (int(percent), detail)

    def should_stop(self) -> bool:
        return self._stop.is_set()

    @property
    def detail(self) -> dict[str, Any] | None:
        """The last detail the engine reported (stored with the final write)."""
        return None if self._report is None else self._report[1]

    def __enter__(self) -> JobControl:
        _WATCHER.watch(self)
        return self

    def __exit__(self, *_: object) -> None:
        _WATCHER.let_go(self)

    def check(self) -> None:
        """One look at the database: write the progress if it moved, else read the cancel flag."""
        report = self._report
        try:
            if report is not None and report != self._written:
                stop = self.store.report_progress(self.claim, *report)
                self._written = report
            else:
                stop = self.store.cancel_requested(self.claim.job_id)
        except Exception as exc:  # looked at again after the next interval
            if database_unreachable(exc):
                log.warning("progress of %s not written: database unreachable", self.claim.job_id)
            else:
                log.exception("watching %s failed", self.claim.job_id)
            return
        if stop:
            self._stop.set()


class _Watcher:
    """One thread per process that looks at each running job's ``JobControl`` once per its
    interval, the next look counted from the end of the last. Handing a run to it and taking it
    back costs a dictionary entry: a thread of its own per run cost a start and a join on the path
    of every job's final write (0.14 ms on an idle machine, more beside a busy database). A run
    taken back is never looked at again: ``let_go`` waits for a look under way."""

    def __init__(self) -> None:
        self._pid = 0
        self._wake = threading.Condition()
        self._due: dict[JobControl, float] = {}
        self._thread: threading.Thread | None = None

    def watch(self, control: JobControl) -> None:
        with self._wake:
            if self._pid != os.getpid() or self._thread is None or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="aiorch-watch", daemon=True)
                self._thread.start()
            self._due[control] = time.monotonic() + control.interval
            self._wake.notify()

    def let_go(self, control: JobControl) -> None:
        with self._wake:
            self._due.pop(control, None)
        with control._looking:  # a look that began before is over
            pass

    def _watched(self, control: JobControl) -> bool:
        with self._wake:
            return control in self._due

    def _run(self) -> None:
        while True:
            with self._wake:
                now = time.monotonic()
                due = [control for control, at in self._due.items() if at <= now]
                if not due:
                    self._wake.wait(min(self._due.values(), default=now + 60.0) - now)
                    continue
                for control in due:  # not picked again before its look has ended
                    self._due[control] = float("inf")
            for control in due:
                with control._looking:
                    if not self._watched(control):
                        continue
                    control.check()
                with self._wake:
                    if control in self._due:
                        self._due[control] = time.monotonic() + control.interval


_WATCHER = _Watcher()


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
    kept: dict[str, bytes] = {}  # inputs checked here, for this run only (``load_inputs``)
    if job.inputs is None and spec.inputs:
        # Claimed straight from PREPARING (or re-claimed after its worker died before the inputs
        # were recorded): check them now.
        with bind_job(job_id=job_id, task=job.task, worker=self.request.hostname or ""):
            try:
                job.inputs = load_inputs(rt, job, kept)
            except (ValidationError, InputProblem, TransientFetchError, FetchCancelled) as exc:
                rt.storage.remove_inputs(claim.job_id)
                record_outcome(rt, claim, failure_of(exc), result=None, files=[], backend=None)
                return
    if spec.engine in BATCH_ENGINES and claim.neighbours:
        partners = claim_partners(rt, job)
        if partners:
            _run_batch(self, rt, spec, [(claim, job), *partners], kept)
            return
    _run_claimed(self, rt, spec, claim, job, kept=kept)


def _run_claimed(
    task: JobTask,
    rt: Runtime,
    spec: catalog.TaskSpec,
    claim: Claim,
    job: Job,
    prepared: tuple[EngineCall, EngineResult | Exception] | None = None,
    kept: dict[str, bytes] | None = None,
) -> None:
    """Run one claimed job to its final status and store its outputs.

    ``prepared``: the job's call and outcome from a batched engine run (``_run_batch``), which
    then only needs storing and finishing here, through the same failure mapping. ``kept``: the
    inputs this run checked itself, in memory (``load_inputs``).
    """
    job_id = job.id
    with bind_job(job_id=job_id, task=job.task, worker=task.request.hostname or ""):
        backend = None
        result: dict[str, Any] | None = None
        failure: JobFailure | None = None
        files: list[StoredFile] = []
        gpu_fault = oom = False
        detail: dict[str, Any] | None = None
        try:
            if prepared is None:
                payload = validate_payload(spec, job.payload, rt.settings)
                images = _open_inputs(rt, job_id, job.inputs or {}, kept)
                with JobControl(rt.store, claim) as control:
                    call = engine_call(job, payload, images, control, claim.attempt, rt)
                    try:
                        outcome = ENGINES[spec.engine or ""](call)
                    finally:
                        detail = control.detail
            else:
                payload, outcome = prepared[0].payload, _batched_outcome(rt, job_id, prepared[1])
            backend = outcome.backend
            result, files = store_outputs(rt, job_id, job.client_id, outcome, payload, job.inputs or {})
        except Exception as exc:  # it fails this job (the mapping says how); the worker goes on
            if database_unreachable(exc):
                raise  # not the job's fault: the task waits for the database (``JobTask``)
            failure = failure_of(exc, time_limit=spec.soft_time_limit)
            oom, gpu_fault = devices.is_out_of_memory(exc), devices.is_device_fault(exc)
        if oom or gpu_fault:
            # Outside the except block: until it ends, the traceback pins what filled the device.
            runtime.release_memory()
        if gpu_fault:
            note_device_fault(job_id)  # its process is replaced once the task is done
        if record_outcome(
            rt, claim, failure, result=result, files=files, backend=backend, progress_detail=detail
        ):
            rt.storage.remove_inputs(job_id)
        elif _ended_elsewhere(rt, job_id):
            # Fenced off because the job ended without this run (an operator's revoke): nobody
            # else will run it, so its inputs go now. A job re-claimed by another run keeps them.
            rt.storage.remove_inputs(job_id)


def engine_call(
    job: Job, payload: dict[str, Any], images: dict[str, Any], control: JobControl, attempt: int, rt: Runtime
) -> EngineCall:
    return EngineCall(
        job.engine_task, payload, images, control, attempt, rt.settings, job_id=job.id, owner=job.client_id
    )


def _ended_elsewhere(rt: Runtime, job_id: str) -> bool:
    job = rt.store.get(job_id)
    return job is None or is_final(job.status)


def _run_batch(
    task: JobTask,
    rt: Runtime,
    spec: catalog.TaskSpec,
    members: list[tuple[Claim, Job]],
    kept: dict[str, bytes],
) -> None:
    """Run claimed jobs that share a batch key (tasks/batching.py) in one engine call, then store
    and finish each one on its own. ``kept``: the first member's inputs, if its run checked them."""
    calls: list[EngineCall] = []
    controls: list[JobControl] = []
    batched: list[tuple[Claim, Job]] = []
    for index, (claim, job) in enumerate(members):
        own = kept if index == 0 else None
        try:
            payload = validate_payload(spec, job.payload, rt.settings)
            images = _open_inputs(rt, job.id, job.inputs or {}, own)
        except Exception:
            # Bad payload or unreadable input: the single path fails it with its usual error.
            _run_claimed(task, rt, spec, claim, job, kept=own)
            continue
        control = JobControl(rt.store, claim)
        controls.append(control)
        calls.append(engine_call(job, payload, images, control, claim.attempt, rt))
        batched.append((claim, job))
    if not calls:
        return
    leader = batched[0][1]
    with bind_job(job_id=leader.id, task=leader.task, worker=task.request.hostname or ""):
        log.info("running %d %s jobs as one batch", len(calls), spec.name)
        try:
            with contextlib.ExitStack() as watching:
                for control in controls:
                    watching.enter_context(control)
                outcomes = BATCH_ENGINES[spec.engine or ""](calls, BatchControl(list(controls)))
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


def _open_inputs(
    rt: Runtime, job_id: str, inputs: dict[str, Any], kept: dict[str, bytes] | None = None
) -> dict[str, Any]:
    """The checked inputs from storage (prepared on whichever host), or from ``kept`` when this
    run checked them itself: images decoded, a video as a local file the engine reads itself."""

    def open_one(entry: dict[str, Any]) -> Image.Image | Path:
        if entry.get("kind") == "video":
            return rt.storage.local_input(job_id, entry)
        data = (kept or {}).get(input_name(entry))
        return decode_image(rt.storage.read_input(job_id, entry) if data is None else data)

    return {
        field: [open_one(e) for e in value] if isinstance(value, list) else open_one(value)
        for field, value in inputs.items()
    }
