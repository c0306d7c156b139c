"""Poll a provider about its jobs (cpu queue) until each is final, then store its outputs.

``poll_remote`` asks the provider and re-publishes itself with a countdown (it never sleeps in a
worker slot), backing off, until the remote job is final or the deadline passes (``failed`` /
``provider_timeout``). One poll task also looks up every other job of the same provider that is
due (``next_poll_at``), in one batch call where the provider has one (SenseTime's ``/results``,
50 ids); the other jobs' own poll chains then find themselves polled and wait for their next turn.
Every poll touches the job row, so the sweep can tell a quiet remote job from a lost one. Outputs
are downloaded with a size cap, checked like inputs, and stored through the same code as local
outputs (``tasks.outputs``), so clients get our own URLs. A video task's (``ahv_video``) are probed
like video inputs and stored as MP4.
"""

from __future__ import annotations

import io
import logging
from datetime import datetime, timedelta
from typing import Any

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image

from config.logs import bind_job
from config.routes import DEFAULT_MAX_POLL_INTERVAL, DEFAULT_POLL_INTERVAL, DEFAULT_TIMEOUT
from inference.base import EngineResult, OutputFile, OutputImage
from inference.remote import ProviderRetryableError, RemoteOutput, RemoteProvider, RemoteResult, RemoteStatus
from models.db import utcnow
from models.failures import JobFailure
from models.jobs import Job
from models.jobstore import Claim
from models.state import JobStatus
from tasks import catalog
from tasks.celery_app import POLL_REMOTE
from tasks.failures import failure_of
from tasks.inputs import InputProblem, check_image, check_video
from tasks.outputs import store_outputs
from tasks.remote.common import (
    ERROR_GROWTH,
    POLL_GROWTH,
    POLL_LEASE,
    POLL_SOFT_LIMIT,
    POLL_TIME_LIMIT,
    client_for,
    deadline_passed,
    finish_remote,
    poll_again,
    route_of,
    schedule_poll,
    set_next_poll,
)
from tasks.runtime import JobTask, Runtime

log = logging.getLogger("aiorch.remote")

# Output meta worth keeping from a provider (the rest, e.g. its URLs, is not ours to publish),
# under the name the result shows: a provider's asset id is not ours (``result.asset_id``).
KEPT_OUTPUT_META = {"index": "index", "seed": "seed", "asset_id": "provider_asset_id"}
# A chain whose job was polled by someone else's batch polls again unless that poll is at most
# this close (seconds): the broker's countdowns and the database clock are not exact.
DUE_SLACK = 0.25


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
        message = f"Provider {job.backend!r} is no longer configured."
        finish_remote(rt, claim, JobFailure("provider_misconfigured", message))
        return
    client = client_for(rt.settings, provider.name)
    remote_id = job.remote_id or ""
    max_delay = route.max_poll_interval if route else DEFAULT_MAX_POLL_INTERVAL
    if job.cancel_requested:
        _cancel_remote(client, remote_id)
        finish_remote(rt, claim, JobFailure.cancelled("The job was cancelled while the provider ran it."))
        return
    if deadline_passed(job, route):
        _cancel_remote(client, remote_id)
        timeout = route.timeout if route else DEFAULT_TIMEOUT
        message = f"{provider.name} did not finish the job within {timeout:g} s."
        finish_remote(rt, claim, JobFailure("provider_timeout", message, {"provider": provider.name}))
        return
    now = utcnow()
    if follow_up and job.next_poll_at is not None and job.next_poll_at > now + timedelta(seconds=DUE_SLACK):
        # Another job's poll task looked this one up in its batch (or holds it in one now): this
        # chain waits for the job's next turn instead of asking the provider again.
        schedule_poll(app, job, claim.token, delay, countdown=(job.next_poll_at - now).total_seconds())
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
            poll_again(app, rt, job, claim, min(max_delay, max(delay * ERROR_GROWTH, wait)))
        return
    except Exception as exc:
        if not companions:
            _settle_error(rt, job, claim, provider.name, exc)
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
            outcome = _answer_and_settle(rt, member, member_claim, provider, client, answers)
            if outcome == "final":
                continue
            wait = {"running": next_delay, "stop": 0.0}.get(outcome, min(max_delay, delay * ERROR_GROWTH))
            if mine:
                if follow_up:
                    # A cancel seen here is acted on at the next poll, right away.
                    poll_again(app, rt, job, claim, wait)
            else:
                set_next_poll(rt, member.id, member_claim.token, utcnow() + timedelta(seconds=wait))
    except SoftTimeLimitExceeded:
        # Downloads ran long. Neighbours not reached keep their lease and are polled again by their
        # own chains when it ends; this job polls again soon.
        log.warning("poll of %s ran into its time limit", provider.name)
        if follow_up:
            poll_again(app, rt, job, claim, delay)


def _answer_and_settle(
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
            _settle_error(rt, job, claim, provider.name, exc)
            return "final"
    return _settle(rt, job, claim, provider, client, answer)


def _lease_due(rt: Runtime, job: Job, limit: int, now: datetime, due_by: datetime) -> list[Job]:
    """Other running jobs at the job's provider due to be polled by ``due_by``, leased to this task.

    The lease (``next_poll_at`` pushed ``POLL_LEASE`` out, a conditional UPDATE per job) keeps a
    second poll task running at the same time from asking about the same jobs.
    """
    return rt.store.lease_due(job, limit, now, due_by, now + timedelta(seconds=POLL_LEASE))


def _touch(rt: Runtime, claim: Claim, next_poll: datetime | None) -> None:
    """The poll's heartbeat: the sweep measures a remote job's silence from ``updated_at``."""
    set_next_poll(rt, claim.job_id, claim.token, next_poll)


def _release(rt: Runtime, jobs: list[Job], now: datetime) -> None:
    for member in jobs:
        set_next_poll(rt, member.id, member.claim_token or "", now)


def _settle(
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
        progress = int(result.progress or job.progress or 0)
        # What the provider says beside the percentage (a training's fraction done) is kept
        # until it says something else.
        detail = job.progress_detail if result.progress_detail is None else dict(result.progress_detail)
        if progress != (job.progress or 0) or detail != job.progress_detail:
            stop = rt.store.report_progress(claim, progress, detail)
        else:
            stop = not rt.store.heartbeat(claim)  # no news is no move (and no event)
        return "stop" if stop else "running"
    if result.status is not RemoteStatus.SUCCEEDED:
        finish_remote(rt, claim, _remote_failure(result, provider.name), backend=job.backend)
        return "final"
    try:
        outcome = _outputs(rt, job, client, provider.kind, provider.name, result)
    except ProviderRetryableError as exc:
        log.warning("downloading the outputs of %s failed, trying again: %s", job.id, exc)
        return "retry"
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:
        _settle_error(rt, job, claim, provider.name, exc)
        return "final"
    # The payload's watermark is drawn here, by the code that draws a local job's (no provider was
    # sent it: ``provider_inputs.provider_payload``).
    result_doc, files = store_outputs(rt, job.id, job.client_id, outcome, dict(job.payload), job.inputs or {})
    finish_remote(rt, claim, None, result=result_doc, files=files, backend=job.backend)
    return "final"


def _settle_error(rt: Runtime, job: Job, claim: Claim, provider: str, exc: Exception) -> None:
    """Fail the job for an error of its poll or its outputs (never leave it running forever)."""
    finish_remote(rt, claim, failure_of(exc, provider=provider), backend=job.backend)


def _remote_failure(result: RemoteResult, name: str) -> JobFailure:
    """A provider's final answer other than success, as the job's failure."""
    message = result.error_message or f"The job ended {result.status.value} at {name}."
    details: dict[str, Any] = {"provider": name}
    if result.provider_code:
        details["provider_code"] = result.provider_code
    if result.status is RemoteStatus.REJECTED:
        return JobFailure(result.error_code or "remote_rejected", message, details, status=JobStatus.REJECTED)
    if result.status is RemoteStatus.EXPIRED:
        # The provider dropped the job after its own lifetime (Volcengine's ``not_found`` after
        # 12 h): the job ran out of time, it did not fail.
        return JobFailure.expired(message, details)
    # A provider-side cancel (not ours) or failure is a failure of this job.
    return JobFailure(result.error_code or f"remote_{result.status.value}", message, details)


def _outputs(
    rt: Runtime, job: Job, client: RemoteProvider, kind: str, name: str, result: RemoteResult
) -> EngineResult:
    """A successful remote result's outputs, downloaded and checked, as an outcome to store."""
    if catalog.TASKS[job.engine_task].output == "video":
        files = [_video_output(rt, job, client, index, output) for index, output in enumerate(result.outputs)]
        return EngineResult(backend=f"{kind}:{name}", files=files)
    images = []
    for index, output in enumerate(result.outputs):
        raw = client.fetch_output(output, max_bytes=rt.settings.max_input_bytes)
        checked = check_image(raw, f"output[{index}]", rt.settings)
        image = Image.open(io.BytesIO(checked.data))
        image.load()
        images.append(OutputImage(image, _kept_meta(output)))
    data = dict(result.data) if result.data else None
    return EngineResult(backend=f"{kind}:{name}", images=images, data=data)


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
