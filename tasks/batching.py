"""Batching of small upscale jobs: one worker runs several waiting jobs as one forward pass.

Like Ray Serve's ``max_batch_size`` / ``batch_wait_timeout_s``, with Postgres as the queue of
record. A job whose inputs are fetched is a ``queued`` row at phase DISPATCHED before its message
reaches a GPU worker, so the worker that claims one small upscale job looks in the table for more
rows with the same batch key (model, input size, scale class) and claims up to
``AIORCH_UPSCALE_MAX_BATCH - 1`` of them with the same conditional UPDATE every claim uses,
waiting at most ``AIORCH_UPSCALE_BATCH_WAIT_MS`` for them to appear. Each claimed job keeps its
own claim token, status, result and webhook. When the claimed jobs' own messages arrive later,
their claim is refused (the job is already running or finished) and they are acked as no-ops.

A worker that dies mid-batch leaves its claimed jobs ``running``: the ones whose messages it had
prefetched are redelivered and re-claimed as for any dead worker, the others are recovered by
the sweep once they have been silent past the task's time limit.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import select

from inference.base import RunControl
from models.db import utcnow
from models.jobs import Job
from models.jobstore import Claim, ClaimRefused
from models.state import JobStatus, Phase
from tasks.catalog import TASKS, fetch_free
from tasks.prepare import checked_inputs
from tasks.runtime import Runtime

log = logging.getLogger("aiorch.tasks")

# Inputs up to this side fit in one tile of the Upscaler (its default tile size), so same-size
# ones stack into one tensor. Larger images keep the device busy on their own.
BATCH_MAX_SIDE = 512
POLL_SECONDS = 0.005
# A job on the prepare queue dispatched longer ago than this is not about to join a batch (a slow
# download, or a row whose message was lost and awaits the sweep): nobody waits for it.
FETCH_RECENT_SECONDS = 2.0


def batch_key(job: Job) -> tuple[Any, ...] | None:
    """What jobs must share to run in one batch, or None when this job runs alone."""
    if job.engine_task != "upscale":
        return None
    payload = job.payload or {}
    image = (job.inputs or {}).get("image_url")
    if payload.get("face_enhance") or not isinstance(image, dict):
        return None
    width, height = image.get("width"), image.get("height")
    if not width or not height or max(width, height) > BATCH_MAX_SIDE:
        return None
    try:
        scale = float(payload.get("scale", 2.0))
    except (TypeError, ValueError):
        return None  # invalid: the single path fails it with the validation error
    # The default model depends on the scale class (the x2 model serves scale <= 2), so jobs of
    # different classes may run different models.
    return (job.queue, payload.get("model"), width, height, scale <= 2)


def claim_partners(rt: Runtime, job: Job) -> list[tuple[Claim, Job]]:
    """Claim up to ``upscale_max_batch - 1`` waiting jobs that can run in one batch with ``job``.

    A waiting job the API sent straight to the run queue (inputs that need no network) is still at
    stage ``prepare``: it is prepared here, as its own run task would, and claimed if it fits.
    Waits up to ``upscale_batch_wait_ms`` for the batch to fill, but only while a job of the task
    is being fetched on the prepare queue right now: a job alone on the queue, or next to jobs
    whose messages are long gone, starts at once.
    """
    settings = rt.settings
    wanted = settings.upscale_max_batch - 1
    key = batch_key(job)
    if wanted <= 0 or key is None:
        return []
    deadline = time.monotonic() + settings.upscale_batch_wait_ms / 1000
    partners: list[tuple[Claim, Job]] = []
    seen = {job.id}
    while True:
        waiting = _queued(rt, job, seen, limit=4 * settings.upscale_max_batch)
        fetching = False
        for candidate in waiting:
            if candidate.cancel_requested:
                continue
            preparing = candidate.stage != Phase.DISPATCHED.value
            if preparing and not fetch_free(TASKS[candidate.engine_task], candidate.payload or {}):
                # On the prepare queue: worth waiting for if it was dispatched just now.
                fetching = fetching or _recent(candidate, FETCH_RECENT_SECONDS)
                continue
            seen.add(candidate.id)
            inputs = None
            if preparing:
                inputs = checked_inputs(rt, candidate)
                if inputs is None:
                    continue  # failed (bad input) or cancelled: ended by checked_inputs
                candidate.inputs = inputs
            if batch_key(candidate) != key:
                if inputs is not None:
                    # Checked for nothing: record it, so its own run task does not check it again.
                    rt.store.set_prepared(candidate.id, inputs)
                continue
            try:
                claim, claimed = rt.store.claim_job(
                    candidate.id, redelivered=False, from_prepare=inputs is not None
                )
            except ClaimRefused:
                continue  # another worker took it, or it was cancelled meanwhile
            if inputs is not None:
                claimed.inputs = inputs  # checked here; the run needs them, the row need not keep them
            partners.append((claim, claimed))
            if len(partners) >= wanted:
                return partners
        left = deadline - time.monotonic()
        if left <= 0 or not fetching:
            return partners  # nothing of the task is on its way: don't wait for it
        time.sleep(min(POLL_SECONDS, left))


def _recent(job: Job, seconds: float) -> bool:
    sent = job.dispatched_at or job.queued_at
    return sent is not None and (utcnow() - sent).total_seconds() < seconds


def _queued(rt: Runtime, job: Job, seen: set[str], limit: int) -> list[Job]:
    """Queued jobs of the same task and queue not looked at yet, ready or still fetching their
    inputs, oldest first: one query tells both which can join now and whether to wait."""
    with rt.db.session() as session:
        return list(
            session.scalars(
                select(Job)
                .where(
                    Job.status == JobStatus.QUEUED.value,
                    Job.engine_task == job.engine_task,
                    Job.queue == job.queue,
                    Job.id.not_in(seen),
                )
                .order_by(Job.priority.desc(), Job.queued_at)
                .limit(limit)
            )
        )


class BatchControl:
    """One ``RunControl`` over a batch: progress goes to every job's control; the batch stops only
    when every job in it was cancelled. A job cancelled alone ends ``cancelled`` after the batch
    (its output is dropped), so its neighbours are not thrown away with it."""

    def __init__(self, controls: list[RunControl]):
        self.controls = controls

    def progress(self, percent: float, detail: dict[str, Any] | None = None) -> None:
        for control in self.controls:
            control.progress(percent, detail)

    def should_stop(self) -> bool:
        return all(control.should_stop() for control in self.controls)
