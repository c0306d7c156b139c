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
3. ``poll_remote`` asks the provider and re-publishes itself with a countdown (it never sleeps in a
   worker slot), backing off, until the remote job is final or the deadline passes (``failed`` /
   ``provider_timeout``). One poll task also looks up every other job of the same provider that is
   due (``next_poll_at``), in one batch call where the provider has one (SenseTime's ``/results``,
   50 ids); the other jobs' own poll chains then find themselves polled and wait for their next
   turn. Every poll touches the job row, so the sweep can tell a quiet remote job from a lost one.
   Outputs are downloaded with a size cap, checked like inputs, and stored through the same code
   as local outputs, so clients get our own URLs. A video task's (``ahv_video``) are probed like
   video inputs and stored as MP4; its route skips the backends that cannot make video.

Providers never see the client's raw inputs: ``prepare`` already fetched and checked them into
storage, and the provider gets those bytes, inline where it takes base64 (Volcengine) and as a
public URL of ours (``<public_url>/files/<name>``) everywhere else, so ``data:`` and ``asset://``
inputs work at providers that fetch URLs themselves.

The sweep (``tasks.jobs.sweep``) hands a silent remote job back here (``resume_remote``,
``republish_remote``): it is polled or submitted again, never run on a local engine.

Zhinian can push a signed webhook instead of waiting for the next poll; ``handle_zhinian_webhook``
verifies it and triggers one immediate poll (the provider's answer to an authenticated poll is what
finishes the job, and the download happens on a worker, never in the API process).
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import time
from datetime import datetime, timedelta
from typing import Any

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init
from kombu.exceptions import OperationalError
from PIL import Image
from sqlalchemy import or_, select

from config import Settings
from config.logs import bind_job
from config.routes import (
    DEFAULT_MAX_POLL_INTERVAL,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_TIMEOUT,
    LOCAL,
    Route,
    RouteStep,
)
from inference.base import (
    ContentRejected,
    EngineError,
    EngineResult,
    InvalidInput,
    OutputFile,
    OutputImage,
)
from inference.remote import (
    InvalidWebhookSignature,
    ProviderError,
    ProviderRetryableError,
    RemoteOutput,
    RemoteProvider,
    RemoteResult,
    RemoteStatus,
    build_client,
    idempotency_key_for_job,
)
from models.assets import OUTPUT
from models.db import Database, utcnow
from models.jobs import Job, StoredFile
from models.jobstore import Claim, ClaimRefused, fenced_update, new_id
from models.state import JobStatus
from tasks import catalog
from tasks.celery_app import RUN, publish
from tasks.inputs import InputProblem, check_image, check_video
from tasks.jobs import JobTask, Runtime, _publish_finish, _store_outputs
from tasks.outbound import tls_context
from tasks.storage import encode_image

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
# Output meta worth keeping from a provider (the rest, e.g. its URLs, is not ours to publish),
# under the name the result shows: a provider's asset id is not ours (``result.asset_id``).
KEPT_OUTPUT_META = {"index": "index", "seed": "seed", "asset_id": "provider_asset_id"}
# Providers that take input images inline as base64 (Volcengine's binary_data_base64); the others
# fetch a public URL of ours.
INLINE_INPUTS = {"volcengine"}
# Formats a public copy keeps as they are; anything else (BMP, TIFF, GIF) is sent as PNG.
PUBLIC_FORMATS = {"jpg", "png", "webp"}
# A public input copy outlives the route's deadline by this much, then the retention sweep
# deletes it (it is deleted at once when the job finishes).
PUBLIC_COPY_GRACE = 3600.0

SUBMIT_SOFT_LIMIT = 150
SUBMIT_TIME_LIMIT = 180
# Seconds of the soft limit kept back for recording the remote id and publishing the poll.
SUBMIT_RESERVE = 15.0
# A backend is not tried with less than this left of the task's budget: the submit goes on from
# that backend in a fresh task instead of starting a request that the time limit would cut off.
MIN_ATTEMPT_SECONDS = 3.0

POLL_SOFT_LIMIT = 150
POLL_TIME_LIMIT = 180
# While one poll task has a job in its batch, the job's next poll is pushed this far out, so a
# second poll task does not ask about it too; it is set properly once the answer is handled.
POLL_LEASE = 60.0
# A chain whose job was polled by someone else's batch polls again unless that poll is at most
# this close (seconds): the broker's countdowns and the database clock are not exact.
DUE_SLACK = 0.25

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


# -- submit -----------------------------------------------------------------------------------------


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
        _submit(self.app, rt, job, claim, retry, step)


def _submit(app: Any, rt: Runtime, job: Job, claim: Claim, retry: int, first_step: int = 0) -> None:
    # Every backend's requests must end before the soft time limit, with time left to record.
    budget_ends = time.monotonic() + SUBMIT_SOFT_LIMIT - SUBMIT_RESERVE
    route = route_of(rt.settings, job)
    providers = rt.settings.routes.providers
    if job.remote_id and job.backend in providers:
        # This claim follows a worker that died after the provider accepted the job: the remote
        # job exists, so poll it rather than submit (and maybe pay for) a second one.
        log.info("resuming the poll of %s at %s", job.remote_id, job.backend)
        delay = route.poll_interval if route else DEFAULT_POLL_INTERVAL
        _again(app, rt, job, claim, delay)
        return
    if route is None or not route.remote_first:
        if catalog.TASKS[job.engine_task].remote_only:
            # The routes changed since the job was prepared, and this task has no local engine.
            _finish(
                app,
                rt,
                claim,
                JobStatus.FAILED,
                {
                    "code": "task_not_installed",
                    "message": f"Task {job.task!r} no longer has a remote provider route.",
                },
            )
            return
        # The routes changed since the job was prepared: it runs where they now say.
        _run_locally(app, rt, job, claim)
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
    video = catalog.TASKS[job.engine_task].output == "video"
    if video and not any(_makes_video(rt, step) for step in route.steps):
        names = ", ".join(step.backend for step in route.steps)
        _finish(
            app,
            rt,
            claim,
            JobStatus.FAILED,
            {
                "code": "no_video_provider",
                "message": f"No backend of the route for {job.task!r} can generate video ({names}).",
            },
        )
        return
    unavailable: list[str] = []
    wait: float | None = None
    index = first_step
    try:
        for index in range(first_step, len(route.steps)):
            step = route.steps[index]
            # Each attempt is a heartbeat (the sweep tells a live submit from a lost one by it) and
            # reads the cancel flag, so a cancel that came during a backoff is honoured before
            # anything is sent (and maybe paid for).
            if rt.store.report_progress(claim, job.progress or 0):
                _finish(
                    app,
                    rt,
                    claim,
                    JobStatus.CANCELLED,
                    {"code": "cancelled", "message": "The job was cancelled before a provider accepted it."},
                )
                return
            if video and not _makes_video(rt, step):
                # No local engine generates video, and this provider cannot either: the route goes
                # on to the next backend (one of them can, as checked above).
                log.info("%s cannot generate video; skipping it", step.backend)
                continue
            if step.is_local:
                log.info("every provider of the route is unavailable; running locally")
                _run_locally(app, rt, job, claim)
                return
            left = budget_ends - time.monotonic()
            if left < MIN_ATTEMPT_SECONDS:
                log.warning("no time left in this submit for %s; going on in a fresh task", step.backend)
                _submit_later(app, job, claim, retry, index, 0.0)
                return
            provider = providers[step.backend]
            options = dict(step.options)
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
            except ContentRejected as exc:
                # A refusal is about the content, not the provider: another backend must not try it.
                _finish(app, rt, claim, JobStatus.REJECTED, {"code": exc.code, "message": str(exc)})
                return
            except EngineError as exc:
                _finish(app, rt, claim, JobStatus.FAILED, _engine_error(exc))
                return
            except InputProblem as exc:
                _finish(app, rt, claim, JobStatus.FAILED, exc.as_error())
                return
            except ClaimRefused:
                log.warning("claim of %s lost before submitting it", job.id)
                return
            except SoftTimeLimitExceeded:
                raise
            except Exception as exc:  # a client bug fails this job; the worker goes on with the next
                log.exception("submit to %s crashed", step.backend)
                error = {"code": "provider_error", "message": f"{type(exc).__name__}: {exc}"[:500]}
                _finish(app, rt, claim, JobStatus.FAILED, error)
                return
            if not _record_remote(rt, claim, step.backend, remote_id, route.poll_interval):
                # Fenced off (re-claimed elsewhere) between claim and now: that run owns the job.
                log.warning("claim of %s lost after submitting %s", job.id, remote_id)
                return
            log.info("submitted to %s as %s", step.backend, remote_id)
            _schedule_poll(app, job, claim.token, route.poll_interval)
            return
    except SoftTimeLimitExceeded:
        # The budget above keeps requests inside the limit, so this is a backend that kept us
        # waiting some other way. It counts as unavailable: the route goes on from the next one
        # in a fresh task (a submit that reached the provider anyway is found by its remote id).
        log.warning(
            "submit hit its time limit at %s; going on from the next backend", route.steps[index].backend
        )
        if index + 1 < len(route.steps):
            _submit_later(app, job, claim, retry, index + 1, 0.0)
        else:
            _submit_later(app, job, claim, retry + 1, 0, _backoff(route, retry, None))
        return
    # Every backend is remote and unavailable now: try the route again later, until the deadline.
    countdown = _backoff(route, retry, wait)
    log.warning("no provider available (%s); submitting again in %.1f s", "; ".join(unavailable), countdown)
    _submit_later(app, job, claim, retry + 1, 0, countdown)


def _makes_video(rt: Runtime, step: RouteStep) -> bool:
    return not step.is_local and bool(getattr(client_for(rt.settings, step.backend), "makes_video", False))


def _backoff(route: Route, retry: int, wait: float | None) -> float:
    countdown = min(route.max_poll_interval, route.poll_interval * ERROR_GROWTH ** (retry + 1))
    return max(countdown, min(wait or 0.0, route.max_poll_interval))


def _submit_later(app: Any, job: Job, claim: Claim, retry: int, step: int, countdown: float) -> None:
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
    rt.store.update_claimed(claim.job_id, claim.token, backend=LOCAL, remote_id=None)
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
    now = utcnow()
    return rt.store.update_claimed(
        claim.job_id,
        claim.token,
        running=True,
        backend=backend,
        remote_id=remote_id,
        next_poll_at=now + timedelta(seconds=first_poll),
        updated_at=now,
    )


# -- the inputs a provider sees ---------------------------------------------------------------------


def provider_payload(rt: Runtime, job: Job, claim: Claim, kind: str, route: Route | None) -> dict[str, Any]:
    """The job's payload as a provider gets it: every input replaced by our own checked copy.

    ``prepare`` fetched and checked each input into storage; the provider gets those bytes, inline
    as a base64 ``data:`` URI where it takes base64 (Volcengine), else as a public URL of ours. So
    an ``asset://`` id, a ``data:`` URI or a URL only we can reach works at every provider, and
    what the provider sees is exactly what we validated.
    """
    payload = dict(job.payload)
    inputs = job.inputs or {}
    if not inputs:
        return payload
    if kind in INLINE_INPUTS:
        for field, entry in inputs.items():
            refs = [_data_uri(e) for e in (entry if isinstance(entry, list) else [entry])]
            payload[field] = refs if isinstance(entry, list) else refs[0]
        return payload
    names = _public_copies(rt, job, claim, route)
    for field, entry in inputs.items():
        refs = [rt.storage.url_for(names[e["path"]]) for e in (entry if isinstance(entry, list) else [entry])]
        payload[field] = refs if isinstance(entry, list) else refs[0]
    return payload


def _data_uri(entry: dict[str, Any]) -> str:
    with open(entry["path"], "rb") as handle:
        data = handle.read()
    mime = {"jpg": "jpeg"}.get(entry["ext"], entry["ext"])
    return f"data:image/{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _public_copies(rt: Runtime, job: Job, claim: Claim, route: Route | None) -> dict[str, str]:
    """Public copies (``/files/<name>``, 128 random bits) of the job's inputs: stored path -> name.

    Made once per job: the names are kept in ``jobs.inputs``, so a submit retried later (or at the
    next backend) sends the same URLs. Each copy is a stored file of the job, so deleting the job
    deletes it, and it expires after the route's deadline in case the job never finishes here.
    """
    inputs = job.inputs or {}
    entries = [e for value in inputs.values() for e in (value if isinstance(value, list) else [value])]
    names: dict[str, str] = {}
    missing = []
    for entry in entries:
        name = entry.get("public_name")
        path = rt.storage.path_for(name) if name else None
        if path is not None and path.is_file():
            names[entry["path"]] = name
        else:
            missing.append(entry)
    if not missing:
        return names
    timeout = route.timeout if route is not None else DEFAULT_TIMEOUT
    expires = utcnow() + timedelta(seconds=timeout + PUBLIC_COPY_GRACE)
    rows = []
    for entry in missing:
        with open(entry["path"], "rb") as handle:
            data = handle.read()
        ext = entry["ext"]
        if ext not in PUBLIC_FORMATS:
            with Image.open(io.BytesIO(data)) as image:
                data, ext = (
                    encode_image(image.convert("RGBA" if "A" in image.getbands() else "RGB"), "png"),
                    "png",
                )
        saved = rt.storage.save_output(data, ext)
        entry["public_name"] = saved.name
        names[entry["path"]] = saved.name
        rows.append(
            # Served at /files like an output, but no asset of the client (no asset_id): a copy
            # of its input for the provider's eyes only, deleted when the job finishes.
            StoredFile(
                name=saved.name,
                kind=OUTPUT,
                job_id=job.id,
                client_id=job.client_id,
                content_type=saved.content_type,
                size=saved.size,
                expires_at=expires,
            )
        )
    with rt.db.session() as session:
        if not fenced_update(session, job.id, claim.token, inputs=dict(inputs)):
            # Fenced off meanwhile: the copies are nobody's.
            rt.storage.delete_outputs([row.name for row in rows])
            raise ClaimRefused("the claim was lost while copying the inputs")
        session.add_all(rows)
    return names


def _delete_public_copies(rt: Runtime, job_id: str) -> None:
    job = rt.store.get(job_id)
    inputs = (job.inputs if job is not None else None) or {}
    names = [
        e["public_name"]
        for value in inputs.values()
        for e in (value if isinstance(value, list) else [value])
        if isinstance(e, dict) and e.get("public_name")
    ]
    if not names:
        return
    with rt.db.session() as session:
        session.query(StoredFile).filter(StoredFile.name.in_(names)).delete()
    rt.storage.delete_outputs(names)


def _schedule_poll(
    app: Any,
    job: Job,
    token: str,
    delay: float,
    *,
    follow_up: bool = True,
    countdown: float | None = None,
) -> None:
    publish(
        app,
        POLL_REMOTE,
        job.id,
        "cpu",
        job.priority,
        task_kwargs={"token": token, "delay": delay, "follow_up": follow_up},
        countdown=delay if countdown is None else countdown,
    )


def _again(app: Any, rt: Runtime, job: Job, claim: Claim, delay: float) -> None:
    """The job's next regular poll, ``delay`` seconds from now (recorded for batch look-ups)."""
    _set_next_poll(rt, job.id, claim.token, utcnow() + timedelta(seconds=delay))
    _schedule_poll(app, job, claim.token, delay)


def _set_next_poll(rt: Runtime, job_id: str, token: str, when: datetime | None) -> None:
    rt.store.update_claimed(job_id, token, next_poll_at=when)


# -- poll -------------------------------------------------------------------------------------------


@shared_task(
    bind=True,
    base=JobTask,
    name=POLL_REMOTE,
    queue="cpu",
    soft_time_limit=POLL_SOFT_LIMIT,
    time_limit=POLL_TIME_LIMIT,
)
def poll_remote(
    self: JobTask, job_id: str, token: str, delay: float = DEFAULT_POLL_INTERVAL, follow_up: bool = True
) -> None:
    """Ask the provider about the job (and its due neighbours); finish it, or poll again later.

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
    now = utcnow()
    if follow_up and job.next_poll_at is not None and job.next_poll_at > now + timedelta(seconds=DUE_SLACK):
        # Another job's poll task looked this one up in its batch (or holds it in one now): this
        # chain waits for the job's next turn instead of asking the provider again.
        _schedule_poll(app, job, claim.token, delay, countdown=(job.next_poll_at - now).total_seconds())
        return
    batch = [job]
    if follow_up and client.max_batch > 1:
        interval = route.poll_interval if route else DEFAULT_POLL_INTERVAL
        batch += _lease_due(rt, job, client.max_batch - 1, now, now + timedelta(seconds=interval))
    if follow_up:
        _touch(rt, claim, now + timedelta(seconds=POLL_LEASE))
    else:
        # A nudge leaves the regular chain's schedule alone: it only says the job is alive.
        _touch(rt, claim, job.next_poll_at)
    companions = batch[1:]
    try:
        if companions:
            answers = client.poll_many([j.remote_id or "" for j in batch])
        else:
            answers = {remote_id: client.poll(remote_id)}
    except (ProviderRetryableError, SoftTimeLimitExceeded) as exc:
        wait = getattr(exc, "retry_after", None) or 0.0
        log.warning("polling %s failed, trying again: %s", provider.name, exc or "soft time limit")
        # The neighbours' own chains take them back at once.
        _release(rt, companions, now)
        if follow_up:
            _again(app, rt, job, claim, min(max_delay, max(delay * ERROR_GROWTH, wait)))
        return
    except Exception as exc:
        if not companions:
            _settle_error(app, rt, job, claim, provider.name, exc)
            return
        # A permanent error of a batch call is nobody's in particular (one bad remote id can
        # spoil it): each job is asked alone below, so only the one at fault fails.
        log.warning("batch poll at %s failed (%s); polling the jobs one by one", provider.name, exc)
        answers = {}
    next_delay = min(max_delay, delay * POLL_GROWTH)
    try:
        for member in batch:
            mine = member.id == job.id
            member_claim = claim if mine else Claim(member.id, member.claim_token or "", member.attempts)
            outcome = _answer_and_settle(app, rt, member, member_claim, provider, client, answers)
            if outcome == "final":
                continue
            wait = {"running": next_delay, "stop": 0.0}.get(outcome, min(max_delay, delay * ERROR_GROWTH))
            if mine:
                if follow_up:
                    # A cancel seen here is acted on at the next poll, right away.
                    _again(app, rt, job, claim, wait)
            else:
                _set_next_poll(rt, member.id, member_claim.token, utcnow() + timedelta(seconds=wait))
    except SoftTimeLimitExceeded:
        # Downloads ran long. Neighbours not reached keep their lease and are polled again by their
        # own chains when it ends; this job polls again soon.
        log.warning("poll of %s ran into its time limit", provider.name)
        if follow_up:
            _again(app, rt, job, claim, delay)


def _answer_and_settle(
    app: Any,
    rt: Runtime,
    job: Job,
    claim: Claim,
    provider: Any,
    client: RemoteProvider,
    answers: dict[str, RemoteResult],
) -> str:
    """Settle one job of a batch from its answer, asking the provider alone when the batch had none."""
    remote_id = job.remote_id or ""
    answer = answers.get(remote_id)
    if answer is None:
        try:
            answer = client.poll(remote_id)
        except ProviderRetryableError as exc:
            log.warning("polling %s at %s failed, trying again: %s", job.id, provider.name, exc)
            return "retry"
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:
            _settle_error(app, rt, job, claim, provider.name, exc)
            return "final"
    return _settle(app, rt, job, claim, provider, client, answer)


def _lease_due(rt: Runtime, job: Job, limit: int, now: datetime, due_by: datetime) -> list[Job]:
    """Other running jobs at the job's provider due to be polled by ``due_by``, leased to this task.

    The lease (``next_poll_at`` pushed ``POLL_LEASE`` out, a conditional UPDATE per job) keeps a
    second poll task running at the same time from asking about the same jobs.
    """
    if limit <= 0:
        return []
    due = or_(Job.next_poll_at.is_(None), Job.next_poll_at <= due_by)
    with rt.db.session() as session:
        candidates = list(
            session.scalars(
                select(Job)
                .where(
                    Job.backend == job.backend,
                    Job.id != job.id,
                    Job.status == JobStatus.RUNNING.value,
                    Job.remote_id.is_not(None),
                    Job.claim_token.is_not(None),
                    Job.cancel_requested.is_(False),
                    due,
                )
                .order_by(Job.next_poll_at)
                .limit(limit)
            )
        )
        leased = []
        for candidate in candidates:
            if fenced_update(
                session,
                candidate.id,
                candidate.claim_token,
                due,
                running=True,
                next_poll_at=now + timedelta(seconds=POLL_LEASE),
                updated_at=now,
            ):
                leased.append(candidate)
        session.expunge_all()
    return leased


def _touch(rt: Runtime, claim: Claim, next_poll: datetime | None) -> None:
    """The poll's heartbeat: the sweep measures a remote job's silence from ``updated_at``."""
    _set_next_poll(rt, claim.job_id, claim.token, next_poll)


def _release(rt: Runtime, jobs: list[Job], now: datetime) -> None:
    for member in jobs:
        _set_next_poll(rt, member.id, member.claim_token or "", now)


def _settle(
    app: Any,
    rt: Runtime,
    job: Job,
    claim: Claim,
    provider: Any,
    client: RemoteProvider,
    result: RemoteResult,
) -> str:
    """Act on one poll answer: ``final`` (the job ended), ``running``, ``stop`` (cancel pending:
    poll again at once) or ``retry`` (a transient failure: poll again, backing off)."""
    if not result.final:
        stop = rt.store.report_progress(claim, int(result.progress or job.progress or 0))
        return "stop" if stop else "running"
    try:
        status, outcome, error = _outcome(rt, job, client, provider.kind, provider.name, result)
    except ProviderRetryableError as exc:
        log.warning("downloading the outputs of %s failed, trying again: %s", job.id, exc)
        return "retry"
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:
        _settle_error(app, rt, job, claim, provider.name, exc)
        return "final"
    files: list[StoredFile] = []
    result_doc = None
    if outcome is not None:
        payload = dict(job.payload)
        if provider.kind in PROVIDER_DRAWS_WATERMARK:
            payload.pop("watermark", None)
        result_doc, files = _store_outputs(rt, job.id, job.client_id, outcome, payload, job.inputs or {})
    _finish(app, rt, claim, status, error, result=result_doc, files=files, backend=job.backend)
    return "final"


def _settle_error(app: Any, rt: Runtime, job: Job, claim: Claim, provider: str, exc: Exception) -> None:
    """Fail the job for an error of its poll or its outputs (never leave it running forever)."""
    if isinstance(exc, EngineError):
        error = _engine_error(exc)
    elif isinstance(exc, InputProblem):
        error = {
            "code": "remote_output_invalid",
            "message": f"{provider} returned an unusable output: {exc.message}",
            "details": {"problem": exc.code},
        }
    else:  # a client bug fails this job rather than leaving it running forever
        log.error("poll of %s at %s crashed", job.id, provider, exc_info=exc)
        error = {"code": "provider_error", "message": f"{type(exc).__name__}: {exc}"[:500]}
    _finish(app, rt, claim, JobStatus.FAILED, error, backend=job.backend)


def _outcome(
    rt: Runtime, job: Job, client: RemoteProvider, kind: str, name: str, result: RemoteResult
) -> tuple[JobStatus, EngineResult | None, dict[str, Any] | None]:
    """A final remote result as our status, the outputs to store, and the error."""
    if result.status is RemoteStatus.SUCCEEDED and catalog.TASKS[job.engine_task].output == "video":
        files = [_video_output(rt, job, client, index, output) for index, output in enumerate(result.outputs)]
        return JobStatus.SUCCEEDED, EngineResult(backend=f"{kind}:{name}", files=files), None
    if result.status is RemoteStatus.SUCCEEDED:
        images = []
        for index, output in enumerate(result.outputs):
            raw = client.fetch_output(output, max_bytes=rt.settings.max_input_bytes)
            checked = check_image(raw, f"output[{index}]", rt.settings)
            image = Image.open(io.BytesIO(checked.data))
            image.load()
            meta = _kept_meta(output)
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
    if result.status is RemoteStatus.EXPIRED:
        # The provider dropped the job after its own lifetime (Volcengine's ``not_found`` after
        # 12 h): the job ran out of time, it did not fail.
        error["code"] = JobStatus.EXPIRED.value
        return JobStatus.EXPIRED, None, error
    # A provider-side cancel (not ours) or failure is a failure of this job.
    return JobStatus.FAILED, None, error


def _kept_meta(output: RemoteOutput) -> dict[str, Any]:
    return {ours: output.meta[theirs] for theirs, ours in KEPT_OUTPUT_META.items() if theirs in output.meta}


def _video_output(
    rt: Runtime, job: Job, client: RemoteProvider, index: int, output: RemoteOutput
) -> OutputFile:
    """One video output, downloaded and checked like a video input, as a scratch MP4 to store.

    The same probe as inputs (``check_video``: container, byte size, pixels, frame count from the
    header), so a provider cannot hand clients a file we would refuse from them. Only MP4 is kept:
    that is what ``ahv_video`` promises, and what storage serves as ``video/mp4``.
    """
    field = f"output[{index}]"
    raw = client.fetch_output(output, max_bytes=rt.settings.max_video_bytes)
    checked = check_video(raw, field, rt.settings)
    if checked.ext != "mp4":
        raise InputProblem("output_not_mp4", f"the video is {checked.ext}, not MP4", field)
    path = rt.storage.input_dir(job.id) / f"remote_output_{index}.mp4"
    path.write_bytes(checked.data)
    meta = _kept_meta(output)
    meta.update(
        width=checked.width,
        height=checked.height,
        frames=checked.frames,
        duration=round(checked.duration, 3),
        has_audio=checked.has_audio,
    )
    return OutputFile(path, "mp4", meta)


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
    # The provider has no more use for the public copies of the inputs.
    _delete_public_copies(rt, claim.job_id)
    rt.storage.remove_inputs(claim.job_id)
    _publish_finish(app, claim.job_id)


# -- the sweep's remote side ------------------------------------------------------------------------


def remote_silence_limit(route: Route | None) -> float:
    """Seconds a live remote job can go without a write to its row.

    Every poll and every submit attempt touches the row; between two of them lies at most the
    longest poll interval (or a batch lease), then one whole task.
    """
    longest_wait = max(route.max_poll_interval if route else DEFAULT_MAX_POLL_INTERVAL, POLL_LEASE)
    return longest_wait + max(SUBMIT_TIME_LIMIT, POLL_TIME_LIMIT) + 60.0


def at_remote_stage(settings: Settings, job: Job) -> bool:
    """Whether a running job is a remote provider's business (polling or submitting), not a GPU's."""
    if job.remote_id:
        return True
    if job.backend == LOCAL:
        return False  # the route fell through to a local engine: run_job has it
    route = route_of(settings, job)
    return route is not None and route.remote_first


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
    if not at_remote_stage(rt.settings, job):
        return None
    route = route_of(rt.settings, job)
    if silent_for < remote_silence_limit(route):
        return False
    token = new_id()
    if not rt.store.update_claimed(
        job.id,
        job.claim_token,
        Job.updated_at <= job.updated_at,
        running=True,
        claim_token=token,
        next_poll_at=None,
    ):
        return False  # it spoke up meanwhile
    claim = Claim(job.id, token, job.attempts)
    if job.remote_id and job.backend in rt.settings.routes.providers:
        log.warning("resuming the silent poll of %s at %s", job.id, job.backend)
        _again(app, rt, job, claim, 0.0)
    else:
        log.warning("resuming the silent submit of %s", job.id)
        _submit_later(app, job, claim, 0, 0, 0.0)
    return True


def republish_remote(rt: Runtime, app: Any, job_id: str, priority: int) -> bool:
    """Re-send a prepared job's lost SUBMIT_REMOTE; False when its route does not start remote."""
    job = rt.store.get(job_id)
    if job is None:
        return False
    route = route_of(rt.settings, job)
    if route is None or not route.remote_first:
        return False
    publish(app, SUBMIT_REMOTE, job_id, "cpu", priority)
    return True


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
