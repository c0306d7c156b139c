"""What the remote steps share: the providers' clients, a job's route and deadline, the time
limits of the submit and poll tasks, the poll schedule, and the end of a remote job."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from celery.signals import worker_process_init

from config import Settings
from config.routes import DEFAULT_TIMEOUT, Route
from inference.remote import RemoteProvider, build_client
from models.db import utcnow
from models.failures import JobFailure
from models.jobs import Job, StoredFile
from models.jobstore import Claim
from tasks.celery_app import POLL_REMOTE, publish
from tasks.outbound import tls_context
from tasks.outputs import record_outcome
from tasks.remote.provider_inputs import delete_public_copies
from tasks.runtime import Runtime

log = logging.getLogger("aiorch.remote")

SUBMIT_SOFT_LIMIT = 150
SUBMIT_TIME_LIMIT = 180
POLL_SOFT_LIMIT = 150
POLL_TIME_LIMIT = 180
# While one poll task has a job in its batch, the job's next poll is pushed this far out, so a
# second poll task does not ask about it too; it is set properly once the answer is handled.
POLL_LEASE = 60.0
# A poll of a job still running waits a little longer each time; an error backs off faster.
POLL_GROWTH = 1.5
ERROR_GROWTH = 2.0

_clients: dict[tuple[int, str], RemoteProvider] = {}


@worker_process_init.connect
def _forget_parent_clients(**_: Any) -> None:
    # A forked child must not share the parent's HTTP connection pools.
    _clients.clear()


def client_for(settings: Settings, provider_name: str) -> RemoteProvider:
    """The process's client of a configured provider (one HTTP session each, reused)."""
    key = (id(settings), provider_name)
    if key not in _clients:
        provider = settings.routes.providers[provider_name]
        # AIORCH_CA_BUNDLE: a provider behind a private CA is trusted like inputs and webhooks.
        context = tls_context(settings)
        _clients[key] = build_client(provider.kind, **provider.client_kwargs(), ssl_context=context)
    return _clients[key]


def route_of(settings: Settings, job: Job) -> Route | None:
    return settings.routes.for_task(job.task, job.engine_task)


def deadline_passed(job: Job, route: Route | None) -> bool:
    timeout = route.timeout if route is not None else DEFAULT_TIMEOUT
    started = job.started_at or job.queued_at
    return utcnow() > started + timedelta(seconds=timeout)


def schedule_poll(
    app: Any,
    job: Job,
    token: str,
    delay: float,
    *,
    follow_up: bool = True,
    countdown: float | None = None,
) -> None:
    """Publish one ``poll_remote`` of the job's current claim ``token``, ``delay`` seconds out
    (or ``countdown``). ``follow_up=False``: a nudge that polls once and schedules nothing."""
    publish(
        app,
        POLL_REMOTE,
        job.id,
        "cpu",
        job.priority,
        task_kwargs={"token": token, "delay": delay, "follow_up": follow_up},
        countdown=delay if countdown is None else countdown,
    )


def poll_again(app: Any, rt: Runtime, job: Job, claim: Claim, delay: float) -> None:
    """The job's next regular poll, ``delay`` seconds from now (recorded for batch look-ups)."""
    set_next_poll(rt, job.id, claim.token, utcnow() + timedelta(seconds=delay))
    schedule_poll(app, job, claim.token, delay)


def set_next_poll(rt: Runtime, job_id: str, token: str, when: datetime | None) -> None:
    """When the job is next due (a touch of its row: the sweep reads it as a sign of life)."""
    rt.store.set_next_poll(job_id, token, when)


def finish_remote(
    rt: Runtime,
    claim: Claim,
    failure: JobFailure | None,
    *,
    result: dict[str, Any] | None = None,
    files: list[StoredFile] | None = None,
    backend: str | None = None,
) -> None:
    """End a remote job: succeeded with ``result`` and ``files``, or as ``failure`` says; then
    the provider has no more use for the public copies of its inputs."""
    if not record_outcome(rt, claim, failure, result=result, files=files or [], backend=backend):
        return
    delete_public_copies(rt, claim.job_id)
    rt.storage.remove_inputs(claim.job_id)
