"""Remote providers on the cpu queue: submit a job to the route's first available backend, then poll.

``prepare_job`` publishes ``submit_remote`` instead of ``run_job`` when a job's route starts with a
provider. The flow, with every fact a later step needs kept in Postgres rather than in memory:

1. ``submit_remote`` claims the job (status ``running``, an attempt counted, a fencing token), and
   tries the route's backends in order. A retryable failure (timeout, 5xx, rate limit) falls
   through to the next; a content refusal ends the job ``rejected``; any other error fails it; a
   ``local`` backend hands the job to ``run_job`` on its GPU queue. When every backend is
   unavailable the submit is retried later (backing off) until the job's deadline.
2. The provider's id and name are stored on the job (``remote_id``, ``backend``) *before* the first
   poll, so a worker killed at any point resumes polling instead of submitting twice.
3. ``poll_remote`` asks the provider once and re-publishes itself with a countdown (it never sleeps
   in a worker slot), backing off, until the remote job is final or the deadline passes
   (``failed`` / ``provider_timeout``). Outputs are downloaded with a size cap, checked like
   inputs, and stored through the same code as local outputs, so clients get our own URLs.

Zhinian can push a signed webhook instead of waiting for the next poll; ``handle_zhinian_webhook``
verifies it and triggers one immediate poll (the provider's answer to an authenticated poll is what
finishes the job, and the download happens on a worker, never in the API process).
"""

from __future__ import annotations

import io
import logging
from datetime import timedelta
from typing import Any

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init
from kombu.exceptions import OperationalError
from PIL import Image
from sqlalchemy import select, update

from config import Settings
from config.logs import bind_job
from config.routes import DEFAULT_MAX_POLL_INTERVAL, DEFAULT_POLL_INTERVAL, DEFAULT_TIMEOUT, Route
from inference.base import ContentRejected, EngineError, EngineResult, InvalidInput, OutputImage
from inference.remote import (
    InvalidWebhookSignature,
    ProviderError,
    ProviderRetryableError,
    RemoteProvider,
    RemoteResult,
    RemoteStatus,
    build_client,
    idempotency_key_for_job,
)
from models.db import Database, utcnow
from models.jobs import Job, StoredFile
from models.jobstore import Claim, ClaimRefused
from models.state import JobStatus
from tasks import catalog
from tasks.celery_app import RUN, publish
from tasks.inputs import InputProblem, check_image
from tasks.jobs import JobTask, Runtime, _limits, _publish_finish, _store_outputs

log = logging.getLogger("aiorch.remote")

SUBMIT_REMOTE = "aiorch.submit_remote"
POLL_REMOTE = "aiorch.poll_remote"
ZHINIAN_WEBHOOK_PATH = "/v1/providers/zhinian/webhook"
# Providers that draw the payload's ``watermark`` themselves (SenseTime's watermark_config,
# Volcengine's logo_info, an upstream aiorch); for the others it is drawn here, as for local jobs.
PROVIDER_DRAWS_WATERMARK = {"sensetime", "volcengine", "upstream"}
# A poll of a job still running waits a little longer each time; an error backs off faster.
POLL_GROWTH = 1.5
ERROR_GROWTH = 2.0
# Output meta worth keeping from a provider (the rest, e.g. its URLs, is not ours to publish).
KEPT_OUTPUT_META = ("index", "seed", "asset_id")

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
        _clients[key] = build_client(provider.kind, **provider.client_kwargs())
    return _clients[key]


def route_of(settings: Settings, job: Job) -> Route | None:
    return settings.routes.for_task(job.task, job.engine_task)


def deadline_passed(job: Job, route: Route | None) -> bool:
    timeout = route.timeout if route is not None else DEFAULT_TIMEOUT
    started = job.started_at or job.queued_at
    return utcnow() > started + timedelta(seconds=timeout)


# -- submit -----------------------------------------------------------------------------------------


@shared_task(bind=True, base=JobTask, name=SUBMIT_REMOTE, queue="cpu", soft_time_limit=150, time_limit=180)
def submit_remote(self: JobTask, job_id: str, token: str | None = None, retry: int = 0) -> None:
    """Claim the job and hand it to the first backend of its route that accepts it."""
    rt = self.runtime
    if token is None:
        redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
        try:
            claim = rt.store.claim(job_id, redelivered=redelivered)
        except ClaimRefused as refused:
            log.info("not submitting %s: %s", job_id, refused.reason)
            if refused.finalized:
                rt.storage.remove_inputs(job_id)
                _publish_finish(self.app, job_id)
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
        _submit(self.app, rt, job, claim, retry)


def _submit(app: Any, rt: Runtime, job: Job, claim: Claim, retry: int) -> None:
    route = route_of(rt.settings, job)
    providers = rt.settings.routes.providers
    if job.remote_id and job.backend in providers:
        # This claim follows a worker that died after the provider accepted the job: the remote
        # job exists, so poll it rather than submit (and maybe pay for) a second one.
        log.info("resuming the poll of %s at %s", job.remote_id, job.backend)
        _schedule_poll(app, job, claim.token, route.poll_interval if route else DEFAULT_POLL_INTERVAL)
        return
    if route is None or not route.remote_first:
        # The routes changed since the job was prepared: it runs where they now say.
        _run_locally(app, rt, job)
        return
    if deadline_passed(job, route):
        _finish(
            app,
            rt,
            claim,
            JobStatus.FAILED,
            {
                "code": "provider_timeout",
                "message": f"No provider accepted the job within {route.timeout:g} s.",
            },
        )
        return
    unavailable: list[str] = []
    wait: float | None = None
    for step in route.steps:
        if step.is_local:
            log.info("every provider of the route is unavailable; running locally")
            _run_locally(app, rt, job)
            return
        provider = providers[step.backend]
        options = dict(step.options)
        if provider.kind == "zhinian" and "webhook_secret" in provider.credentials:
            options.setdefault("webhook_url", rt.settings.public_url + ZHINIAN_WEBHOOK_PATH)
        try:
            remote_id = client_for(rt.settings, step.backend).submit(
                step.task or job.engine_task,
                job.payload,
                idempotency_key=idempotency_key_for_job(job.id, step.backend),
                options=options,
            )
        except ProviderRetryableError as exc:
            log.warning("provider %s unavailable, falling through: %s", step.backend, exc)
            unavailable.append(f"{step.backend}: {exc}")
            if exc.retry_after is not None:
                wait = exc.retry_after if wait is None else min(wait, exc.retry_after)
            continue
        except ContentRejected as exc:
            # A refusal is about the content, not the provider: another backend must not try it.
            _finish(app, rt, claim, JobStatus.REJECTED, {"code": exc.code, "message": str(exc)})
            return
        except EngineError as exc:
            _finish(app, rt, claim, JobStatus.FAILED, _engine_error(exc))
            return
        except Exception as exc:  # a client bug fails this job; the worker goes on with the next
            log.exception("submit to %s crashed", step.backend)
            error = {"code": "provider_error", "message": f"{type(exc).__name__}: {exc}"[:500]}
            _finish(app, rt, claim, JobStatus.FAILED, error)
            return
        if not _record_remote(rt, claim, step.backend, remote_id):
            # Fenced off (re-claimed elsewhere) between claim and now: that run owns the job.
            log.warning("claim of %s lost after submitting %s", job.id, remote_id)
            return
        log.info("submitted to %s as %s", step.backend, remote_id)
        _schedule_poll(app, job, claim.token, route.poll_interval)
        return
    # Every backend is remote and unavailable now: try the route again later, until the deadline.
    countdown = min(route.max_poll_interval, route.poll_interval * ERROR_GROWTH ** (retry + 1))
    countdown = max(countdown, min(wait or 0.0, route.max_poll_interval))
    log.warning("no provider available (%s); submitting again in %.1f s", "; ".join(unavailable), countdown)
    publish(
        app,
        SUBMIT_REMOTE,
        job.id,
        "cpu",
        job.priority,
        task_kwargs={"token": claim.token, "retry": retry + 1},
        countdown=countdown,
    )


def _run_locally(app: Any, rt: Runtime, job: Job) -> None:
    """Hand a claimed job to ``run_job`` on its GPU queue.

    The job is already ``running`` under our claim, so the run takes it over the way it recovers a
    job whose worker vanished (``recovered``): a fresh claim fences ours off. That counts one more
    attempt against ``AIORCH_MAX_ATTEMPTS``.
    """
    spec = catalog.TASKS[job.engine_task]
    publish(app, RUN, job.id, job.queue, job.priority, task_kwargs={"recovered": True}, **_limits(spec))


def _record_remote(rt: Runtime, claim: Claim, backend: str, remote_id: str) -> bool:
    with rt.db.session() as session:
        done = session.execute(
            update(Job)
            .where(
                Job.id == claim.job_id,
                Job.claim_token == claim.token,
                Job.status == JobStatus.RUNNING.value,
            )
            .values(backend=backend, remote_id=remote_id, updated_at=utcnow())
        )
        return bool(done.rowcount)


def _schedule_poll(app: Any, job: Job, token: str, delay: float, *, follow_up: bool = True) -> None:
    publish(
        app,
        POLL_REMOTE,
        job.id,
        "cpu",
        job.priority,
        task_kwargs={"token": token, "delay": delay, "follow_up": follow_up},
        countdown=delay,
    )


# -- poll -------------------------------------------------------------------------------------------


@shared_task(bind=True, base=JobTask, name=POLL_REMOTE, queue="cpu", soft_time_limit=150, time_limit=180)
def poll_remote(
    self: JobTask, job_id: str, token: str, delay: float = DEFAULT_POLL_INTERVAL, follow_up: bool = True
) -> None:
    """Ask the provider about the job once; finish it, or poll again later with a countdown.

    ``follow_up=False`` (a webhook's nudge) polls once and never schedules another, so a nudge
    cannot start a second chain of polls beside the regular one.
    """
    rt = self.runtime
    job = rt.store.get(job_id)
    # Only the chain of the current claim goes on; a stale copy (re-claimed, finished) stops here.
    if job is None or job.status != JobStatus.RUNNING.value or job.claim_token != token or not job.remote_id:
        return
    claim = Claim(job_id, token, job.attempts)
    with bind_job(job_id=job_id, task=job.task, worker=self.request.hostname or ""):
        _poll(self.app, rt, job, claim, delay, follow_up)


def _poll(app: Any, rt: Runtime, job: Job, claim: Claim, delay: float, follow_up: bool) -> None:
    route = route_of(rt.settings, job)
    provider = rt.settings.routes.providers.get(job.backend or "")
    if provider is None:
        _finish(
            app,
            rt,
            claim,
            JobStatus.FAILED,
            {
                "code": "provider_misconfigured",
                "message": f"Provider {job.backend!r} is no longer configured.",
            },
        )
        return
    client = client_for(rt.settings, provider.name)
    remote_id = job.remote_id or ""
    max_delay = route.max_poll_interval if route else DEFAULT_MAX_POLL_INTERVAL
    if job.cancel_requested:
        _cancel_remote(client, remote_id)
        _finish(
            app,
            rt,
            claim,
            JobStatus.CANCELLED,
            {"code": "cancelled", "message": "The job was cancelled while the provider ran it."},
        )
        return
    if deadline_passed(job, route):
        _cancel_remote(client, remote_id)
        timeout = route.timeout if route else DEFAULT_TIMEOUT
        _finish(
            app,
            rt,
            claim,
            JobStatus.FAILED,
            {
                "code": "provider_timeout",
                "message": f"{provider.name} did not finish the job within {timeout:g} s.",
            },
        )
        return
    try:
        result = client.poll(remote_id)
        if not result.final:
            stop = rt.store.report_progress(claim, int(result.progress or job.progress or 0))
            if follow_up:
                # A cancel seen here is acted on at the next poll, right away.
                _again(app, job, claim, 0.0 if stop else min(max_delay, delay * POLL_GROWTH))
            return
        status, outcome, error = _outcome(rt, client, provider.kind, provider.name, result)
    except (ProviderRetryableError, SoftTimeLimitExceeded) as exc:
        wait = getattr(exc, "retry_after", None) or 0.0
        log.warning("polling %s failed, trying again: %s", provider.name, exc or "soft time limit")
        if follow_up:
            _again(app, job, claim, min(max_delay, max(delay * ERROR_GROWTH, wait)))
        return
    except EngineError as exc:
        status, outcome, error = JobStatus.FAILED, None, _engine_error(exc)
    except InputProblem as exc:
        status, outcome = JobStatus.FAILED, None
        error = {
            "code": "remote_output_invalid",
            "message": f"{provider.name} returned an unusable output: {exc.message}",
            "details": {"problem": exc.code},
        }
    except Exception as exc:  # a client bug fails this job rather than leaving it running forever
        log.exception("poll of %s crashed", provider.name)
        status, outcome = JobStatus.FAILED, None
        error = {"code": "provider_error", "message": f"{type(exc).__name__}: {exc}"[:500]}
    files: list[StoredFile] = []
    result_doc = None
    if outcome is not None:
        payload = dict(job.payload)
        if provider.kind in PROVIDER_DRAWS_WATERMARK:
            payload.pop("watermark", None)
        result_doc, files = _store_outputs(rt, job.id, job.client_id, outcome, payload, job.inputs or {})
    _finish(app, rt, claim, status, error, result=result_doc, files=files, backend=job.backend)


def _outcome(
    rt: Runtime, client: RemoteProvider, kind: str, name: str, result: RemoteResult
) -> tuple[JobStatus, EngineResult | None, dict[str, Any] | None]:
    """A final remote result as our status, the outputs to store, and the error."""
    if result.status is RemoteStatus.SUCCEEDED:
        images = []
        for index, output in enumerate(result.outputs):
            raw = client.fetch_output(output, max_bytes=rt.settings.max_input_bytes)
            checked = check_image(raw, f"output[{index}]", rt.settings)
            image = Image.open(io.BytesIO(checked.data))
            image.load()
            meta = {key: output.meta[key] for key in KEPT_OUTPUT_META if key in output.meta}
            images.append(OutputImage(image, meta))
        data = dict(result.data) if result.data else None
        return JobStatus.SUCCEEDED, EngineResult(backend=f"{kind}:{name}", images=images, data=data), None
    error: dict[str, Any] = {
        "code": result.error_code or f"remote_{result.status.value}",
        "message": result.error_message or f"The job ended {result.status.value} at {name}.",
    }
    if result.provider_code:
        error["details"] = {"provider": name, "provider_code": result.provider_code}
    if result.status is RemoteStatus.REJECTED:
        return JobStatus.REJECTED, None, error
    # A provider-side expiry or cancel is a failure of this job: ``running -> expired`` is not a
    # transition of ours (expired means "waited too long in our queue"), so the code tells it.
    return JobStatus.FAILED, None, error


def _again(app: Any, job: Job, claim: Claim, delay: float) -> None:
    _schedule_poll(app, job, claim.token, delay)


def _cancel_remote(client: RemoteProvider, remote_id: str) -> None:
    try:
        client.cancel(remote_id)
    except Exception as exc:  # best effort: the job ends here whatever the provider answers
        log.warning("provider cancel of %s failed: %s", remote_id, exc)


def _engine_error(exc: EngineError) -> dict[str, Any]:
    error: dict[str, Any] = {"code": exc.code, "message": str(exc)}
    if isinstance(exc, InvalidInput) and exc.field:
        error["details"] = {"field": exc.field}
    elif isinstance(exc, ProviderError) and exc.provider_code:
        error["details"] = {"provider": exc.provider, "provider_code": exc.provider_code}
    return error


def _finish(
    app: Any,
    rt: Runtime,
    claim: Claim,
    status: JobStatus,
    error: dict[str, Any] | None,
    *,
    result: dict[str, Any] | None = None,
    files: list[StoredFile] | None = None,
    backend: str | None = None,
) -> None:
    files = files or []
    if not rt.store.finish(
        claim,
        status,
        result=result,
        error=error,
        backend=backend,
        files=files,
        retention=rt.settings.result_retention,
    ):
        # Fenced off (a webhook's poll or a cancel got there first): these outputs are not the job's.
        rt.storage.delete_outputs([f.name for f in files])
        return
    rt.storage.remove_inputs(claim.job_id)
    _publish_finish(app, claim.job_id)


# -- webhooks ---------------------------------------------------------------------------------------


class WebhookRefused(Exception):
    """A provider webhook that is not acted on; ``status`` is the HTTP answer."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def handle_zhinian_webhook(
    settings: Settings, db: Database, app: Any, raw_body: bytes, signature: str | None
) -> str:
    """Verify a Zhinian webhook and poll its job now; returns ``scheduled`` or ``ignored``.

    The body is tried against the webhook secret of every configured Zhinian provider; the one
    whose secret verifies it is the provider the job must be at. Raises ``WebhookRefused``.
    """
    candidates = [
        p
        for p in settings.routes.providers.values()
        if p.kind == "zhinian" and "webhook_secret" in p.credentials
    ]
    for provider in candidates:
        client = client_for(settings, provider.name)
        try:
            _event, result = client.parse_webhook(raw_body, signature)  # type: ignore[attr-defined]
        except InvalidWebhookSignature:
            continue
        except ValueError as exc:
            raise WebhookRefused(400, "invalid_webhook", str(exc)) from None
        with db.session() as session:
            job = session.scalar(
                select(Job).where(
                    Job.backend == provider.name,
                    Job.remote_id == result.remote_id,
                    Job.status == JobStatus.RUNNING.value,
                )
            )
        if job is None or job.claim_token is None:
            # Finished already (by a poll), deleted, or not ours: nothing to do, and a 2xx stops
            # the provider from retrying.
            return "ignored"
        try:
            _schedule_poll(app, job, job.claim_token, 0.0, follow_up=False)
        except OperationalError:
            raise WebhookRefused(503, "broker_unavailable", "The job queue is unreachable.") from None
        return "scheduled"
    raise WebhookRefused(401, "invalid_signature", "The webhook signature does not verify.")
