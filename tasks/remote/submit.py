"""Submit a prepared job to the first backend of its route that accepts it (cpu queue).

``submit_remote`` claims the job (status ``running``, an attempt counted, a fencing token) and tries
the route's backends in order. A retryable failure (timeout, 5xx, rate limit) falls through to the
next; a content refusal ends the job ``rejected``; any other error fails it; a ``local`` backend
hands the job to ``run_job`` on its GPU queue. When every backend is unavailable the submit is
retried later, backing off, until the job's deadline. The provider's id and name are stored on the
job (``remote_id``, ``backend``) *before* the first poll, so a worker killed at any point resumes
polling instead of submitting twice.
"""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import timedelta
from typing import Any

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from config.logs import bind_job
from config.routes import DEFAULT_POLL_INTERVAL, LOCAL, Route, RouteStep
from inference.base import ContentRejected, EngineError
from inference.remote import INPUT_SIZES, ProviderRetryableError, idempotency_key_for_job
from inference.safety import check_prompt
from models.db import utcnow
from models.failures import JobFailure
from models.jobs import Job
from models.jobstore import Claim, ClaimRefused
from models.state import JobStatus
from tasks import catalog
from tasks.celery_app import RUN, SUBMIT_REMOTE, publish
from tasks.failures import failure_of
from tasks.inputs import InputProblem
from tasks.outputs import note_refusal_end
from tasks.remote.backend_limits import backend_refusal, input_sizes
from tasks.remote.common import (
    ERROR_GROWTH,
    SUBMIT_SOFT_LIMIT,
    SUBMIT_TIME_LIMIT,
    client_for,
    deadline_passed,
    finish_remote,
    poll_again,
    route_of,
    schedule_poll,
)
from tasks.remote.provider_inputs import provider_payload
from tasks.runtime import JobTask, Runtime

log = logging.getLogger("aiorch.remote")

ZHINIAN_WEBHOOK_PATH = "/v1/providers/zhinian/webhook"
# Seconds of the soft limit kept back for recording the remote id and publishing the poll.
SUBMIT_RESERVE = 15.0
# A backend is not tried with less than this left of the task's budget: the submit goes on from
# that backend in a fresh task instead of starting a request that the time limit would cut off.
MIN_ATTEMPT_SECONDS = 3.0


@shared_task(
    bind=True,
    base=JobTask,
    name=SUBMIT_REMOTE,
    queue="cpu",
    soft_time_limit=SUBMIT_SOFT_LIMIT,
    time_limit=SUBMIT_TIME_LIMIT,
)
def submit_remote(
    self: JobTask, job_id: str, token: str | None = None, retry: int = 0, step: int = 0
) -> None:
    """Claim the job and hand it to the first backend of its route that accepts it.

    ``step`` is the backend to start from: a submit that ran out of its time limit mid-route goes
    on from the next backend in a fresh task instead of failing the job.
    """
    rt = self.runtime
    if token is None:
        redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
        try:
            claim = rt.store.claim(job_id, redelivered=redelivered, remote=True)
        except ClaimRefused as refused:
            log.info("not submitting %s: %s", job_id, refused.reason)
            if refused.finalized:
                rt.storage.remove_inputs(job_id)
                note_refusal_end(rt, job_id)
            return
    job = rt.store.get(job_id)
    if job is None:
        return
    if token is not None:
        # A submit retried later (every backend was unavailable) keeps the claim it made.
        if job.status != JobStatus.RUNNING.value or job.claim_token != token:
            return
        claim = Claim(job_id, token, job.attempts)
    with bind_job(job_id=job_id, task=job.task, worker=self.request.hostname or ""):
        submit_to_route(self.app, rt, job, claim, retry, step)


def submit_to_route(app: Any, rt: Runtime, job: Job, claim: Claim, retry: int, first_step: int = 0) -> None:
    """Try the backends of the job's route from ``first_step`` on, under the claim (see the
    module's docstring); every outcome ends the job, schedules its poll, or schedules this again."""
    # Every backend's requests must end before the soft time limit, with time left to record.
    budget_ends = time.monotonic() + SUBMIT_SOFT_LIMIT - SUBMIT_RESERVE
    route = route_of(rt.settings, job)
    providers = rt.settings.routes.providers
    if job.remote_id and job.backend in providers:
        # This claim follows a worker that died after the provider accepted the job: the remote
        # job exists, so poll it rather than submit (and maybe pay for) a second one.
        log.info("resuming the poll of %s at %s", job.remote_id, job.backend)
        delay = route.poll_interval if route else DEFAULT_POLL_INTERVAL
        poll_again(app, rt, job, claim, delay)
        return
    if route is None or not route.remote_first:
        if catalog.TASKS[job.engine_task].remote_only:
            # The routes changed since the job was prepared, and this task has no local engine.
            message = f"Task {job.task!r} no longer has a remote provider route."
            finish_remote(rt, claim, JobFailure("task_not_installed", message))
            return
        # The routes changed since the job was prepared: it runs where they now say.
        _run_locally(app, rt, job, claim)
        return
    if deadline_passed(job, route):
        message = f"No provider accepted the job within {route.timeout:g} s."
        finish_remote(rt, claim, JobFailure("provider_timeout", message))
        return
    try:
        # The blocklist a local engine applies (AIORCH_PROMPT_BLOCKLIST), before any provider sees
        # the prompt: the job ends rejected, prompt_blocked, wherever its route would send it.
        check_prompt([job.payload.get("prompt")], rt.settings.prompt_blocklist)
    except ContentRejected as exc:
        finish_remote(rt, claim, failure_of(exc))
        return
    video = catalog.TASKS[job.engine_task].output == "video"
    if video and not any(_makes_video(rt, step) for step in route.steps):
        names = ", ".join(step.backend for step in route.steps)
        message = f"No backend of the route for {job.task!r} can generate video ({names})."
        finish_remote(rt, claim, JobFailure("no_video_provider", message))
        return
    unavailable: list[str] = []
    # Backends whose own limits refuse the payload (the API refuses a payload no backend takes,
    # but the routes may have changed since): skipped, and the first refusal fails the job when
    # no other backend is left to try.
    refused: list[EngineError] = []
    # What some limits need besides the payload (a free outpaint's output size): known from here on.
    sizes = input_sizes(job.inputs)
    wait: float | None = None
    index = first_step
    try:
        for index in range(first_step, len(route.steps)):
            step = route.steps[index]
            # Each attempt is a heartbeat (the sweep tells a live submit from a lost one by it) and
            # reads the cancel flag, so a cancel that came during a backoff is honoured before
            # anything is sent (and maybe paid for). A lost claim stops here too (the fenced
            # finish below then writes nothing).
            if not rt.store.heartbeat(claim):
                cancelled = JobFailure.cancelled("The job was cancelled before a provider accepted it.")
                finish_remote(rt, claim, cancelled)
                return
            if video and not _makes_video(rt, step):
                # No local engine generates video, and this provider cannot either: the route goes
                # on to the next backend (one of them can, as checked above).
                log.info("%s cannot generate video; skipping it", step.backend)
                continue
            if step.is_local:
                log.info("no provider of the route took the job; running locally")
                _run_locally(app, rt, job, claim)
                return
            refusal = backend_refusal(rt.settings.routes, step, job.engine_task, job.payload, sizes)
            if refusal is not None:
                log.info("%s cannot take the job (%s); skipping it", step.backend, refusal)
                refused.append(refusal)
                continue
            left = budget_ends - time.monotonic()
            if left < MIN_ATTEMPT_SECONDS:
                log.warning("no time left in this submit for %s; going on in a fresh task", step.backend)
                submit_later(app, job, claim, retry, index, 0.0)
                return
            provider = providers[step.backend]
            options = dict(step.options)
            if sizes:
                options[INPUT_SIZES] = sizes
            if provider.kind == "zhinian" and "webhook_secret" in provider.credentials:
                options.setdefault("webhook_url", rt.settings.public_url + ZHINIAN_WEBHOOK_PATH)
            client = client_for(rt.settings, step.backend)
            try:
                payload = provider_payload(rt, job, claim, provider.kind, route)
                # The backend's own timeouts, cut to what is left, so the route fits in the limit.
                budget = getattr(client, "time_budget", None)
                with budget(left) if budget is not None else contextlib.nullcontext():
                    remote_id = client.submit(
                        step.task or job.engine_task,
                        payload,
                        idempotency_key=idempotency_key_for_job(job.id, step.backend),
                        options=options,
                    )
            except ProviderRetryableError as exc:
                log.warning("provider %s unavailable, falling through: %s", step.backend, exc)
                unavailable.append(f"{step.backend}: {exc}")
                if exc.retry_after is not None:
                    wait = exc.retry_after if wait is None else min(wait, exc.retry_after)
                continue
            except ClaimRefused:
                log.warning("claim of %s lost before submitting it", job.id)
                return
            except SoftTimeLimitExceeded:
                raise
            except (ContentRejected, EngineError, InputProblem) as exc:
                # A refusal or a permanent error is about this job: another backend must not try it.
                finish_remote(rt, claim, failure_of(exc))
                return
            except Exception as exc:  # a client bug fails this job; the worker goes on with the next
                finish_remote(rt, claim, failure_of(exc, provider=step.backend))
                return
            if not _record_remote(rt, claim, step.backend, remote_id, route.poll_interval):
                # Fenced off (re-claimed elsewhere) between claim and now: that run owns the job.
                log.warning("claim of %s lost after submitting %s", job.id, remote_id)
                return
            log.info("submitted to %s as %s", step.backend, remote_id)
            schedule_poll(app, job, claim.token, route.poll_interval)
            return
    except SoftTimeLimitExceeded:
        # The budget above keeps requests inside the limit, so this is a backend that kept us
        # waiting some other way. It counts as unavailable: the route goes on from the next one
        # in a fresh task (a submit that reached the provider anyway is found by its remote id).
        log.warning(
            "submit hit its time limit at %s; going on from the next backend", route.steps[index].backend
        )
        if index + 1 < len(route.steps):
            submit_later(app, job, claim, retry, index + 1, 0.0)
        else:
            submit_later(app, job, claim, retry + 1, 0, _backoff(route, retry, None))
        return
    if refused and not unavailable:
        # Every backend refused the payload for its own limits: no later try can change that.
        finish_remote(rt, claim, failure_of(refused[0]))
        return
    # Every backend is remote and unavailable now: try the route again later, until the deadline.
    countdown = _backoff(route, retry, wait)
    log.warning("no provider available (%s); submitting again in %.1f s", "; ".join(unavailable), countdown)
    submit_later(app, job, claim, retry + 1, 0, countdown)


def _makes_video(rt: Runtime, step: RouteStep) -> bool:
    return not step.is_local and bool(getattr(client_for(rt.settings, step.backend), "makes_video", False))


def _backoff(route: Route, retry: int, wait: float | None) -> float:
    countdown = min(route.max_poll_interval, route.poll_interval * ERROR_GROWTH ** (retry + 1))
    return max(countdown, min(wait or 0.0, route.max_poll_interval))


def submit_later(app: Any, job: Job, claim: Claim, retry: int, step: int, countdown: float) -> None:
    """Publish the submit of the claimed job again, from backend ``step``, ``countdown`` s out."""
    publish(
        app,
        SUBMIT_REMOTE,
        job.id,
        "cpu",
        job.priority,
        task_kwargs={"token": claim.token, "retry": retry, "step": step},
        countdown=countdown,
    )


def _run_locally(app: Any, rt: Runtime, job: Job, claim: Claim) -> None:
    """Hand a claimed job to ``run_job`` on its GPU queue.

    The job is already ``running`` under our claim, so the run takes it over the way it recovers a
    job whose worker vanished (``recovered``): a fresh claim fences ours off. That counts one more
    attempt against ``AIORCH_MAX_ATTEMPTS``. ``backend`` says ``local`` meanwhile, so the sweep
    treats a silent job as the local run it now is, not as a lost submit.
    """
    if not rt.store.run_locally(claim, LOCAL):
        log.warning("claim of %s lost before handing it to a local engine", job.id)
        return
    spec = catalog.TASKS[job.engine_task]
    publish(
        app,
        RUN,
        job.id,
        job.queue,
        job.priority,
        task_kwargs={"recovered": True},
        **catalog.time_limits(spec),
    )


def _record_remote(rt: Runtime, claim: Claim, backend: str, remote_id: str, first_poll: float) -> bool:
    # One write with the first poll's time: the shorter the gap between the provider accepting
    # the job and this task's ack, the rarer a redelivered submit (which costs an attempt).
    return rt.store.record_remote(claim, backend, remote_id, utcnow() + timedelta(seconds=first_poll))
