"""The jobs resource: create (with Idempotency-Key), read, list, cancel, delete."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, NoReturn

from flask import Response, current_app, g, request
from flask.views import MethodView
from kombu.exceptions import OperationalError
from marshmallow import RAISE, ValidationError
from sqlalchemy.exc import IntegrityError

from app.admission import Admission, admission_headers, client_limits
from app.assets import data_inputs_to_assets, discard_uploads
from app.auth import is_admin, job_scope
from app.errors import ErrorSchema, abort, documents
from app.live import stream_response, wants_stream
from app.schemas import (
    JOB_ID_RE,
    Blueprint,
    DeliveryListSchema,
    JobCreateSchema,
    JobListSchema,
    JobQueryArgsSchema,
    JobSchema,
    check_webhook_url,
)
from app.services import Services
from app.stream_hub import Opening
from config import Settings
from models import feed
from models.db import Database, utcnow
from models.dispatch import insert_in_turn
from models.jobs import Job, WebhookDelivery
from models.jobstore import ClaimRefused, insert_job, new_id, predict_seconds
from models.public import iso, job_object
from models.reads import (
    JobFilter,
    deliveries_of,
    job_by_idempotency_key,
    list_jobs,
)
from models.standing import read_live_alone
from models.state import FINAL_STATUSES, JobStatus
from tasks import catalog
from tasks.catalog import TaskSpec
from tasks.celery_app import ask_to_fill
from tasks.model_registry import annotator_kinds, has_model_for, model_problem
from tasks.next_step import send_next, waits_for_slot
from tasks.payloads.base import model_refs, model_switches
from tasks.payloads.diffusion import missing_annotators
from tasks.remote.backend_limits import route_refusals

log = logging.getLogger("aiorch.api")
blp = Blueprint("jobs", __name__, url_prefix="/v1/jobs", description="Asynchronous jobs")
legacy = Blueprint("tasks", __name__, url_prefix="/tasks", description="Seed 000 job deletion")

RETRY_AFTER_BROKER = "5"


def services() -> Services:
    return current_app.extensions["aiorch"]


def owned_job(job_id: str) -> Job:
    """The caller's job (any client's, for an admin key), or 404 (another client's job is not
    found, never forbidden)."""
    # Not a job id, not looked up: a NUL byte in the path would make psycopg2 raise (a 500).
    return owned(job_id, services().store.get(job_id) if JOB_ID_RE.fullmatch(job_id) else None)


def opening_of(job_id: str) -> Opening | None:
    """The caller's job's first word on a stream of its own, or ``owned_job``'s 404: the check and
    the log's newest event, read together (``feed.read_opening``; None where the log was pruned:
    the hub reads the job's row)."""
    since, found = time.monotonic(), None
    if JOB_ID_RE.fullmatch(job_id):
        found = feed.read_opening(services().db, job_id)
    visible_or_404(job_id, None if found is None else found[0])
    assert found is not None
    return None if found[1] is None else Opening([found[1]], since, placed=False)


def owned_live_job(job_id: str) -> dict[str, Any]:
    """``owned_job``'s job as its live object (place in its queue and ETA while queued), read
    in one transaction: the poll's path."""
    svc, found = services(), None
    if JOB_ID_RE.fullmatch(job_id):
        found = read_live_alone(svc.db, job_id, utcnow(), svc.settings.dispatch_ahead)
    owned(job_id, None if found is None else found[0])
    assert found is not None
    return found[1]


def owned(job_id: str, job: Job | None) -> Job:
    """``job`` when the caller may see it, else 404."""
    visible_or_404(job_id, None if job is None else job.client_id)
    assert job is not None
    return job


def visible_or_404(job_id: str, owner: str | None) -> None:
    """404 unless job ``job_id`` exists (``owner``: its client) and the caller may see it."""
    scope = job_scope()
    if owner is None or (scope is not None and owner != scope):
        abort(404, code="job_not_found", message=f"No job {job_id}.")


PREDICTION_TTL = 2.0  # seconds an estimate is reused for more jobs of the same task
_predictions: dict[str, tuple[float, float]] = {}  # engine task -> (monotonic time, seconds)


def predicted(db: Database, engine_task: str, default: float) -> float:
    """``predict_seconds`` for this task, reused for ``PREDICTION_TTL``: the estimate moves with
    jobs that finish over seconds, and recomputing it costs every POST two more queries."""
    now = time.monotonic()
    cached = _predictions.get(engine_task)
    if cached is not None and now - cached[0] < PREDICTION_TTL:
        return cached[1]
    with db.reading() as session:
        value = predict_seconds(session, engine_task, default)
    _predictions[engine_task] = (now, value)
    return value


def request_fingerprint(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def checked_spec(body: dict[str, Any], settings: Settings) -> TaskSpec:
    """The task of a job body (422 unknown, 501 not installed here), its payload and webhook URL
    checked (422 naming the fields); shared by every way in (a job, a batch item, a blocking call)."""
    try:
        spec = catalog.resolve(
            body["task"],
            debug_tasks=settings.debug_tasks,
            has_model=lambda s: has_model_for(settings, s.name, s.model_types),
            routes=settings.routes,
        )
    except catalog.UnknownTask as exc:
        abort(
            422,
            code="unknown_task",
            message=str(exc),
            details={"task": [f"must be one of: {', '.join(catalog.known_names(settings.debug_tasks))}"]},
        )
    except catalog.TaskUnavailable as exc:
        abort(501, code="task_not_installed", message=str(exc), details={"task": [str(exc)]})
    try:
        check_webhook_url(body.get("webhook_url"), settings)
        schema = catalog.payload_schema(spec, settings)
        payload = schema.load(body["payload"])
    except ValidationError as exc:
        details = exc.messages if "webhook_url" in exc.messages else {"payload": exc.messages}
        abort(422, code="invalid_payload", message="The payload has invalid fields.", details=details)
    # The models it names, as its client sees the store (another client's model is unknown). A
    # job whose route starts at a provider names the provider's models (a SenseTime base model
    # for train_lora), which our store does not hold: the provider's client checks those.
    remote = settings.routes.remote_first(body["task"], spec.name)
    problems = {
        field: [ref.explain(problem)]
        for field, model_id, ref in ([] if remote else model_refs(schema, payload))
        if (problem := model_problem(settings, model_id, ref.types, ref.task, g.client_id)) is not None
    }
    # Fields that need a kind of model installed (upscale's face_enhance needs a face restorer,
    # remove_object's prompt an object detector).
    problems.update(
        (field, [switch.missing])
        for field, switch in ([] if remote else model_switches(schema, payload))
        if not has_model_for(settings, switch.task, switch.types)
    )
    # ControlNets whose control image an annotator model makes (depth, openpose) need it here.
    if not remote:
        problems.update(missing_annotators(payload, lambda: annotator_kinds(settings)))
    if problems:
        details = {"payload": problems}
        abort(422, code="invalid_payload", message="The payload has invalid fields.", details=details)
    # A provider's own limits (SenseTime's 640 px sides, Volcengine's 600-1500): a payload that no
    # backend of its route can take is refused now, naming the field and each limit, not failed later.
    refused = route_refusals(settings.routes, body["task"], spec.name, payload) if remote else {}
    if refused:
        message = "No backend of this task's route takes the payload."
        abort(422, code="invalid_payload", message=message, details={"payload": refused})
    return spec


def check_idempotency_key(key: str) -> None:
    if not (1 <= len(key) <= 255 and key.isprintable()):
        abort(
            400,
            code="invalid_idempotency_key",
            message="Idempotency-Key must be 1 to 255 printable characters.",
            details={"Idempotency-Key": ["must be 1 to 255 printable characters"]},
        )


def new_job(
    client_id: str,
    body: dict[str, Any],
    spec: TaskSpec,
    payload: dict[str, Any],
    idempotency_key: str | None,
    fingerprint: str | None,
    now: datetime,
    batch_id: str | None = None,
) -> Job:
    """The row of a job accepted from ``body`` (not inserted yet), its payload as it is stored.
    Every job gets the same attributes, so a batch's rows make one multi-row INSERT."""
    return Job.transient(
        id=new_id(),
        client_id=client_id,
        task=body["task"],
        engine_task=spec.name,
        queue=spec.queue,
        status=JobStatus.QUEUED.value,
        stage="prepare",
        progress=0,
        priority=body["priority"],
        payload=payload,
        meta=body["metadata"],
        webhook_url=body.get("webhook_url"),
        webhook_events=body.get("webhook_events"),
        idempotency_key=idempotency_key,
        batch_id=batch_id,
        request_hash=fingerprint,
        attempts=0,
        cancel_requested=False,
        created_at=now,
        queued_at=now,
        updated_at=now,
        dispatched_at=now,
    )


def create_job(
    body: dict[str, Any],
    idempotency_key: str | None,
    answer_first: bool = True,
    first: list[feed.Logged] | None = None,
) -> tuple[dict[str, Any], int]:
    """Validate, INSERT, COMMIT, then publish; the shared path of POST /v1/jobs and the blocking
    endpoints. Returns (job object, HTTP status). ``answer_first``: the publish may follow the
    answer (``tasks.after_answer``); else it is made here, before the caller goes on. ``first``:
    where a job created here and sent at once puts its first event (id, job id, object), when its
    submit's statement gave that id (a stream's first word, ``POST`` with ``Accept:
    text/event-stream``)."""
    svc = services()
    settings = svc.settings
    if idempotency_key is not None:  # the header's form first: a 400 whatever the body holds
        check_idempotency_key(idempotency_key)
    spec = checked_spec(body, settings)

    # Only a keyed submit can be replayed, so only it keeps its body's fingerprint to compare.
    fingerprint = None if idempotency_key is None else request_fingerprint(body)
    if idempotency_key is not None:
        existing = _idempotent_match(svc, idempotency_key, fingerprint)
        if existing is not None:
            return existing, 200

    now = utcnow()
    asked = body["priority"]
    priority = Admission(svc, g.client_id, now).admit(asked)
    # Large data: inputs become assets of the client, so the row holds asset:// instead of the
    # bytes (the fingerprint above stays that of the body the client sent).
    stored_payload, uploads = data_inputs_to_assets(svc, g.client_id, spec, body["payload"])
    job = new_job(
        g.client_id, {**body, "priority": priority}, spec, stored_payload, idempotency_key, fingerprint, now
    )
    # A job for a local engine is sent only into a free slot of its queue, else it waits for its
    # turn in fair order (models/dispatch.py); its own turn is decided in its INSERT's transaction.
    slotted = waits_for_slot(settings, job)
    if slotted:
        job.dispatched_at = None
    granted = due = False
    job.predict_time = predicted(svc.db, spec.name, spec.predict_seconds)
    try:
        if slotted:  # INSERT, first event and turn: one statement on Postgres, in autocommit
            limits = client_limits(svc, g.client_id)
            ahead = settings.dispatch_ahead
            created, granted, due, event_id = insert_in_turn(svc.db, job, now, ahead, limits.max_running)
            if first is not None and event_id is not None and granted:
                # Its first event, as the log holds it; a job left waiting for its turn is read
                # with its place instead (it may wait long: its place is its news).
                first.append((event_id, job.id, created))
        else:
            with svc.db.writing() as session:
                created = insert_job(session, job)  # the INSERT and its first event
    except IntegrityError:
        # Another request with the same Idempotency-Key won the race.
        discard_uploads(svc, uploads)
        existing = _idempotent_match(svc, idempotency_key or "", fingerprint)
        if existing is None:
            raise
        return existing, 200
    if slotted and not granted:
        if due:  # slots are free but others waited first: a dispatcher decides whose turn it is
            ask_to_fill(svc.celery, job.queue)
        return {**created, "reused": False, **capped(asked, priority)}, 202
    # Published only after COMMIT: a worker can never receive an id whose row it cannot see. The
    # prepare queue, or straight to the run queue when nothing needs downloading (one hop fewer).
    # A job that got its slot is published just after this answer while the broker is known to
    # answer (``tasks.after_answer``: should it refuse, the job waits for its slot again).
    if slotted and answer_first and svc.after_answer.broker_answers():
        job.dispatched_at = now  # what its turn wrote (``withdraw`` matches it)
        svc.after_answer.send(job)
        return {**created, "reused": False, **capped(asked, priority)}, 202
    try:
        send_next(svc.celery, settings, job)
        svc.after_answer.published()
    except (OperationalError, OSError):
        svc.after_answer.refused()
        log.warning("broker unreachable; job %s withdrawn", job.id)
        svc.store.delete(job.id)
        discard_uploads(svc, uploads)
        abort(
            503,
            code="broker_unavailable",
            message="The job queue is unreachable; retry shortly.",
            headers={"Retry-After": RETRY_AFTER_BROKER},
        )
    return {**created, "reused": False, **capped(asked, priority)}, 202


def capped(asked: int, priority: int) -> dict[str, int]:
    """``requested_priority`` for the answer that accepted a job whose priority was lowered to
    its client's ``max_priority``; nothing otherwise."""
    return {"requested_priority": asked} if priority != asked else {}


def job_response(body: dict[str, Any], status: int = 200) -> Response:
    """A job object as the response, without a second pass through ``JobSchema``: ``job_object``
    already builds exactly the documented fields from JSON types, and the hottest endpoints (submit
    and poll) would spend more on re-dumping it than on their database work."""
    response: Response = current_app.json.response(body)  # type: ignore[assignment]
    response.status_code = status
    return response


def _idempotent_match(svc: Services, key: str, fingerprint: str | None) -> dict[str, Any] | None:
    job = job_by_idempotency_key(svc.db, g.client_id, key)
    return None if job is None else replayed(job, fingerprint)


def replayed(job: Job, fingerprint: str | None) -> dict[str, Any]:
    """The answer to a replay: the earlier job of the idempotency key, or 409 when the key came
    with another body."""
    if job.request_hash != fingerprint:
        refuse_reused_key()
    return {**job_object(job), "reused": True}


def refuse_reused_key() -> NoReturn:
    abort(
        409,
        code="idempotency_key_reused",
        message="This Idempotency-Key was used with a different request body.",
    )


# Bodies that are no JSON however they are read (a form that starts like a JSON object was already
# relabelled by the app's before_request hook).
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def json_body_only(view: Callable[..., Any]) -> Callable[..., Any]:
    """A form or a multipart upload sent to a JSON endpoint gets a 415 that says what to send,
    instead of webargs' "task: Missing data" for a body it never read."""

    @functools.wraps(view)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if request.mimetype in FORM_TYPES:
            abort(
                415,
                code="unsupported_media_type",
                message=f"POST {request.path} takes a JSON body (Content-Type: application/json). Upload "
                "images with POST /v1/assets (multipart/form-data) and pass asset://<asset_id> as the "
                "input, or put a data: URI in the payload.",
            )
        return view(*args, **kwargs)

    return checked


@blp.route("")
class Jobs(MethodView):
    @json_body_only
    @blp.arguments(JobCreateSchema())  # one instance: webargs would build one per request from the class
    @blp.response(202, JobSchema)
    @blp.alt_response(200, schema=JobSchema, description="An earlier job with the same Idempotency-Key")
    @documents(blp, 400, 401, 409, 413, 415, 429, 501, 503)
    def post(self, body: dict[str, Any]) -> Response:
        """Create a job

        With ``Accept: text/event-stream`` the answer is the new job's event stream (``200``), as
        ``GET /v1/jobs/{job_id}/events`` would send it from its first event: submit and follow in
        one request. A refused submit is answered in JSON as always."""
        streamed, since = wants_stream(), time.monotonic()
        # A stream's first event follows the publish: the job is on its way before the hub starts
        # the stream (the publisher thread would wait for the GIL while this thread and the hub
        # start it). Its first word is the job's first event, from the submit's own statement.
        first: list[feed.Logged] = []
        job, status = create_job(
            body, request.headers.get("Idempotency-Key"), answer_first=not streamed, first=first
        )
        if streamed:
            return stream_response([job["job_id"]], opening=Opening(first, since) if first else None)
        response = job_response(job, status)
        response.headers.update(admission_headers())
        return response

    # webargs ignores unknown query parameters unless told otherwise; ?stauts=queued must be a 422,
    # not every job.
    @blp.arguments(JobQueryArgsSchema, location="query", unknown=RAISE)
    @blp.response(200, JobListSchema)
    @blp.alt_response(403, schema=ErrorSchema, description="admin_only: a client key named another client")
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List jobs, newest first"""
        name = args.get("task")
        if name is not None and name not in catalog.known_names(services().settings.debug_tasks):
            abort(
                422, code="unknown_task", message=f"unknown task {name!r}", details={"task": ["unknown task"]}
            )
        filters = JobFilter(
            ids=[part for part in args["ids"].split(",") if part] if "ids" in args else None,
            status=args.get("status"),
            task=name,
            before=args.get("before"),
            batch_id=args.get("batch_id"),
        )
        rows, more = list_jobs(services().db, listed_client(args.get("client")), filters, args["limit"])
        return {"jobs": [job_object(job) for job in rows], "have_next": more}


def listed_client(asked: str | None) -> str | None:
    """Whose jobs ``GET /v1/jobs`` lists: ``?client=`` for an admin key, every client's without it;
    always the caller's own for a client key, which may name no other client."""
    if is_admin():
        return asked
    if asked is not None and asked != g.client_id:
        abort(
            403,
            code="admin_only",
            message="Only an admin key may list another client's jobs.",
            details={"client": ["only an admin key may name another client"]},
        )
    return g.client_id


@blp.route("/<job_id:job_id>")
class JobById(MethodView):
    @blp.response(200, JobSchema)
    def get(self, job_id: str) -> Response:
        """Get a job"""
        return job_response(owned_live_job(job_id))

    @blp.response(204)
    def delete(self, job_id: str) -> None:
        """Delete a job and its output files"""
        delete_job(job_id)


@blp.route("/<job_id>/cancel")
class JobCancel(MethodView):
    @blp.response(200, JobSchema)
    def post(self, job_id: str) -> dict[str, Any]:
        """Cancel a job"""
        owned_job(job_id)
        svc = services()
        try:
            # A move like any other: its job.finished reaches the webhook through the event log.
            status = svc.store.cancel(job_id)
        except ClaimRefused as exc:
            abort(409, code="job_finished", message=f"The job cannot be cancelled: {exc.reason}.")
        if status == JobStatus.CANCELLED.value:
            svc.storage.remove_inputs(job_id)  # fetched already, never to be used
        return job_object(owned_job(job_id))


def delete_job(job_id: str) -> None:
    owned_job(job_id)
    svc = services()
    names = svc.store.delete(job_id)
    svc.storage.delete_outputs(names)
    svc.storage.remove_inputs(job_id)


@legacy.route("/<job_id>")
class LegacyTask(MethodView):
    @legacy.response(204)
    def delete(self, job_id: str) -> None:
        """Delete a job (seed 000 spelling)"""
        delete_job(job_id)


def delivery_object(row: WebhookDelivery) -> dict[str, Any]:
    """One delivery attempt as its job's owner sees it (documented by ``DeliverySchema``)."""
    return {
        "id": row.id,
        "event": row.event,
        "event_id": row.event_id,
        "attempt": row.attempt,
        "url": row.url,
        "ok": row.ok,
        "status_code": row.status_code,
        "error": row.error,
        "duration_ms": row.duration_ms,
        "created_at": iso(row.created_at),
        "next_retry_at": iso(row.next_retry_at),
    }


@blp.route("/<job_id>/deliveries")
class JobDeliveries(MethodView):
    @blp.response(200, DeliveryListSchema)
    def get(self, job_id: str) -> dict[str, Any]:
        """List webhook delivery attempts"""
        owned_job(job_id)
        return {"deliveries": [delivery_object(row) for row in deliveries_of(services().db, job_id)]}


@blp.route("/<job_id>/deliveries/redeliver")
class JobRedeliver(MethodView):
    @blp.response(202)
    def post(self, job_id: str) -> dict[str, Any]:
        """Send the job's webhook event again"""
        job = owned_job(job_id)
        if not job.webhook_url:
            abort(409, code="no_webhook_url", message="The job has no webhook_url.")
        if job.status not in FINAL_STATUSES:
            abort(409, code="job_not_finished", message="The job has not reached a final status yet.")
        from tasks.webhooks import redeliver

        svc = services()
        try:
            event_id = redeliver(svc.db, svc.celery, job)
        except (OperationalError, OSError):
            abort(
                503,
                code="broker_unavailable",
                message="The job queue is unreachable; retry shortly.",
                headers={"Retry-After": RETRY_AFTER_BROKER},
            )
        return {"event_id": event_id, "status": "scheduled"}
