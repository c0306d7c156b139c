"""The periodic sweep (beat, every 30 s, on the cpu queue): what no message is left to do.

It expires jobs queued past their TTL; sends on queued jobs whose message was lost (through
``tasks.next_step``, the same decision as the API's and the prepare task's); fills free slots of
local engine queues with waiting jobs (``tasks.scheduling``: normally a run's end does); recovers running
jobs whose worker vanished (a local run is published again, a job at a provider resumes its poll
or submit, ``tasks.remote.recovery``); deletes files past their retention; dispatches the events
whose kick was lost (``tasks.events``); sends parked webhook retries; and prunes the event log.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery import shared_task
from kombu.exceptions import OperationalError

from models import dispatch, outbox
from models.db import utcnow
from models.state import JobStatus
from tasks import catalog
from tasks.celery_app import RUN, SWEEP, publish
from tasks.events import dispatch_left_over, unattempted_events
from tasks.next_step import send_next, sendable
from tasks.remote.recovery import resume_remote
from tasks.runtime import JobTask, Runtime
from tasks.scheduling import fill_slots
from tasks.webhooks import due_deliveries

# An event still pending this long after its move lost its kick: the sweep dispatches it (sooner
# where AIORCH_REPUBLISH_AFTER is shorter). The kick and the sweep never both get one event.
DISPATCH_GRACE = 30.0
PRUNE_BATCHES = 5  # at most this many batches of old events deleted per sweep


@shared_task(bind=True, base=JobTask, name=SWEEP, queue="cpu", soft_time_limit=120, time_limit=150)
def sweep_jobs(self: JobTask) -> dict[str, int]:
    """Periodic: expire, re-send, recover, delete expired files, dispatch left-over events, prune."""
    return sweep(self.runtime, self.app)


def sweep(rt: Runtime, app: Any) -> dict[str, int]:
    expired = rt.store.expire_queued(rt.settings.job_ttl)
    for job_id in expired:
        rt.storage.remove_inputs(job_id)
    republished = _republish(rt, app)
    with rt.db.session() as session:
        waiting = dispatch.queues_waiting(session)
    filled = sum(fill_slots(rt, app, queue) for queue in waiting)  # a safety net: see scheduling
    recovered = _recover(rt, app)
    removed = rt.store.expired_files()  # outputs and uploads
    rt.storage.delete_files(removed)
    dispatched = dispatch_left_over(rt, app, min(DISPATCH_GRACE, rt.settings.republish_after))
    retried = due_deliveries(rt, app)
    resent = unattempted_events(rt, app)
    return {
        "expired": len(expired),
        "republished": republished,
        "slots_filled": filled,
        "recovered": recovered,
        "files_removed": len(removed),
        "events_dispatched": dispatched,
        "events_pruned": prune_events(rt),
        "webhooks_retried": retried,
        "webhooks_resent": resent,
    }


def _republish(rt: Runtime, app: Any) -> int:
    """Queued jobs whose message may be lost (never dispatched, or long ago) are sent on again;
    the claim's conditional UPDATE makes a duplicate message harmless."""
    republished = 0
    for job_id, *_ in rt.store.stuck_jobs(rt.settings.republish_after):
        job = rt.store.get(job_id)
        if job is None or job.status != JobStatus.QUEUED.value:
            continue  # deleted, or on its way, since stuck_jobs listed it
        if not sendable(rt.store, [job]):
            # Its engine left this installation after the job was accepted: it ended with a clear
            # error instead of stopping the sweep (and every other job's re-publish) here.
            continue
        try:
            send_next(app, rt.settings, job)
        except OperationalError:
            break
        rt.store.mark_dispatched(job_id)
        republished += 1
    return republished


def _recover(rt: Runtime, app: Any) -> int:
    recovered = 0
    for job_id, queue, priority, engine_task, silent_for in rt.store.running_silence():
        spec = catalog.TASKS.get(engine_task)
        if spec is None:
            continue  # an engine no longer installed: nothing here could run it again
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
    return recovered


def prune_events(rt: Runtime) -> int:
    """Delete events older than ``AIORCH_EVENT_RETENTION``, a few batches per sweep."""
    before = utcnow() - timedelta(seconds=rt.settings.event_retention)
    pruned = 0
    for _ in range(PRUNE_BATCHES):
        with rt.db.session() as session:
            deleted = outbox.prune(session, before)
        pruned += deleted
        if deleted < outbox.PRUNE_BATCH:
            break
    return pruned
