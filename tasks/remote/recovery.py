"""The sweep's remote side: a silent job at a provider resumes its poll or its submit, never a
local engine, and is never submitted twice."""

from __future__ import annotations

import logging
from typing import Any

from config.routes import DEFAULT_MAX_POLL_INTERVAL, Route
from models.jobs import Job
from models.jobstore import new_id
from models.state import REMOTE_STATES, JobStatus
from tasks.remote.common import POLL_LEASE, POLL_TIME_LIMIT, SUBMIT_TIME_LIMIT, poll_again, route_of
from tasks.remote.submit import submit_later
from tasks.runtime import Runtime

log = logging.getLogger("aiorch.remote")


def remote_silence_limit(route: Route | None) -> float:
    """Seconds a live remote job can go without a write to its row.

    Every poll and every submit attempt touches the row; between two of them lies at most the
    longest poll interval (or a batch lease), then one whole task.
    """
    longest_wait = max(route.max_poll_interval if route else DEFAULT_MAX_POLL_INTERVAL, POLL_LEASE)
    return longest_wait + max(SUBMIT_TIME_LIMIT, POLL_TIME_LIMIT) + 60.0


def at_remote_stage(job: Job) -> bool:
    """Whether a running job is a remote provider's business (submitting or polling), not a GPU's."""
    return job.stage in {state.phase.value for state in REMOTE_STATES}


def resume_remote(rt: Runtime, app: Any, job_id: str, silent_for: float) -> bool | None:
    """The sweep's recovery of a silent running job at a remote provider.

    Returns None when the job is not at a remote stage (the sweep recovers it as a local run),
    False when it is but is not silent for long enough (or changed meanwhile), and True when its
    poll, or its submit, was published again. Polling resumes from the stored remote id, never a
    second remote submit, and never a local engine. A fresh token fences off any chain of the old
    one that is only late rather than lost, so exactly one chain goes on.
    """
    job = rt.store.get(job_id)
    if job is None or job.status != JobStatus.RUNNING.value:
        return False
    if not at_remote_stage(job):
        return None
    route = route_of(rt.settings, job)
    if silent_for < remote_silence_limit(route):
        return False
    claim = rt.store.resume(job, new_id())
    if claim is None:
        return False  # it spoke up meanwhile
    if job.remote_id and job.backend in rt.settings.routes.providers:
        log.warning("resuming the silent poll of %s at %s", job.id, job.backend)
        poll_again(app, rt, job, claim, 0.0)
    else:
        log.warning("resuming the silent submit of %s", job.id)
        submit_later(app, job, claim, 0, 0, 0.0)
    return True
