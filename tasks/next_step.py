"""Where a queued job goes next: one decision, made for the API's submit, the prepare task and the
sweep alike, so the three can never disagree.

- A job at PREPARING (its inputs not fetched yet) goes to ``prepare_job`` on the cpu queue, unless
  none of its inputs needs the network (``catalog.fetch_free``) and it runs on a local engine:
  then straight to ``run_job`` on its own queue, which checks the inputs itself (one hop fewer).
  A job for a remote provider is always prepared first: the provider gets our checked copies.
- A prepared job (DISPATCHED) goes to ``submit_remote`` on the cpu queue when its route starts
  with a remote provider, else to ``run_job`` on its queue, with its task's time limits.

A running job is no longer this module's business: a provider route that falls through to a
local engine hands it over itself (``tasks.remote.submit``), and the sweep recovers silent runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from config import QUEUES, Settings
from models.failures import JobFailure
from models.jobs import Job
from models.jobstore import JobStore
from models.state import Phase
from tasks import catalog
from tasks.celery_app import PREPARE, RUN, SUBMIT_REMOTE, publish

# The queues of local engines: a job for one takes a slot of its queue when it is first sent, and
# waits in the database for one until then (fair share: models/dispatch.py, tasks/scheduling.py).
SLOTTED = frozenset(q for q in QUEUES if q != "cpu")


def waits_for_slot(settings: Settings, job: Job) -> bool:
    """Whether the job goes to a local engine's queue, dispatched by slots (a job whose route
    starts with a remote provider does not: the provider queues it)."""
    return job.queue in SLOTTED and not settings.routes.remote_first(job.task, job.engine_task)


def sendable(store: JobStore, jobs: list[Job]) -> list[Job]:
    """The ``jobs`` whose engine is installed here. Each other one's engine left this installation
    while it waited: it ends ``task_not_installed`` now instead of being sent (the dispatcher,
    a batch's dispatch and the sweep all meet such jobs)."""
    here = []
    for job in jobs:
        if job.engine_task in catalog.TASKS:
            here.append(job)
        else:
            store.fail_unclaimed(job.id, JobFailure.uninstalled(job.engine_task))
    return here


@dataclass(frozen=True)
class Step:
    """One message: the task it names, its queue, its keyword arguments and time limits."""

    task: str
    queue: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    soft_time_limit: float | None = None
    time_limit: float | None = None


def next_step(settings: Settings, job: Job) -> Step:
    """The step a queued job takes next (see the module's docstring)."""
    spec = catalog.TASKS[job.engine_task]
    remote = settings.routes.remote_first(job.task, job.engine_task)
    if job.stage == Phase.PREPARING.value and (remote or not catalog.fetch_free(spec, job.payload or {})):
        return Step(PREPARE, "cpu")
    if remote:
        return Step(SUBMIT_REMOTE, "cpu")
    # ``prepare``: the run claims the job straight from PREPARING and checks its inputs itself.
    kwargs = {"prepare": True} if job.stage == Phase.PREPARING.value else {}
    return Step(RUN, job.queue, kwargs, spec.soft_time_limit, spec.time_limit)


def send_next(app: Any, settings: Settings, job: Job) -> Step:
    """Publish the job's next step; raises kombu's ``OperationalError`` when the broker is down."""
    step = next_step(settings, job)
    publish(
        app,
        step.task,
        job.id,
        step.queue,
        job.priority,
        step.kwargs or None,
        soft_time_limit=step.soft_time_limit,
        time_limit=step.time_limit,
    )
    return step
