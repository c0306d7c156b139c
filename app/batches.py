"""Batches of jobs: submit up to 1000 at once, follow a batch, cancel many jobs at once.

``POST /v1/jobs/batch`` answers one entry per item, in order: the job object, or ``{"error": ...}``
for an item that was refused (the same refusal, code and details that ``POST /v1/jobs`` would have
answered for it alone). Every item goes through the single submit's own checks (``app.jobs``):
its task and payload, its idempotency key, the client's admission limits, its ``data:`` inputs.
The accepted ones are INSERTed in one transaction (one multi-row INSERT of the jobs and one of
their first events) and then published in one confirmed batch (``tasks.bulk_publish``); if the
broker does not take the batch, its jobs are withdrawn and the request is a 503, as for one job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from flask import Response, g
from flask.views import MethodView
from flask_smorest import Api
from kombu.exceptions import OperationalError
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema
from sqlalchemy.exc import IntegrityError
from werkzeug.exceptions import HTTPException

from app.admission import Admission, admission_headers
from app.assets import data_inputs_to_assets, discard_uploads
from app.auth import job_scope
from app.errors import abort, documents, error_body
from app.jobs import (
    RETRY_AFTER_BROKER,
    checked_spec,
    job_response,
    json_body_only,
    new_job,
    predicted,
    refuse_reused_key,
    replayed,
    request_fingerprint,
    services,
)
from app.schemas import BATCH_ID_PATTERN, JOB_ID_RE, Blueprint, JobCreateSchema, JobSchema, check_batch_id
from models.batches import (
    batch_status,
    insert_jobs,
    jobs_by_idempotency_keys,
    live_job_ids,
    owned_job_ids,
    withdraw_jobs,
)
from models.db import utcnow
from models.dispatch import take_turns
from models.jobs import Job, StoredFile
from models.jobstore import new_id
from models.public import iso
from tasks.bulk_publish import publish_batch
from tasks.catalog import TaskSpec
from tasks.next_step import sendable, waits_for_slot

blp = Blueprint("batches", __name__, url_prefix="/v1", description="Many jobs at once")

MAX_BATCH = 1000  # items of one POST /v1/jobs/batch, ids of one POST /v1/jobs/cancel
CANCEL_CHUNK = 1000  # jobs cancelled per transaction


def _printable(value: str) -> None:
    if not value.isprintable():
        raise ValidationError("must be 1 to 255 printable characters")


class BatchJobSchema(JobCreateSchema):
    """One job of a batch: a ``POST /v1/jobs`` body, with its ``Idempotency-Key`` as a field."""

    idempotency_key = fields.String(
        validate=[validate.Length(min=1, max=255), _printable],
        metadata={
            "description": "As the Idempotency-Key header of POST /v1/jobs: the same key with the same "
            "body answers the earlier job (reused: true); with another body, this item is a 409"
        },
    )


class OneByOne(fields.Nested):
    """Documented as its nested schema, loaded as it was sent: the view checks each item on its
    own, so that one bad item refuses itself and not the whole batch."""

    def deserialize(self, value: Any, attr: str | None = None, data: Any = None, **kwargs: Any) -> Any:
        return value  # null too: an item of its own, refused alone


class BatchCreateSchema(Schema):
    class Meta:
        unknown = RAISE

    jobs = fields.List(
        OneByOne(BatchJobSchema),
        required=True,
        validate=validate.Length(min=1, max=MAX_BATCH),
        metadata={"description": f"1 to {MAX_BATCH} jobs; each is accepted or refused on its own"},
    )
    batch_id = fields.String(
        validate=check_batch_id,
        metadata={
            "description": "Put the jobs in this batch (it may already have jobs); default: a new one",
            "pattern": BATCH_ID_PATTERN,
        },
    )


class BatchCreatedSchema(Schema):
    batch_id = fields.String()
    jobs = fields.List(
        fields.Nested(JobSchema),
        metadata={
            "description": "One per item, in order: its job object (reused: true for an idempotent "
            'replay), or only {"error": {"code", "message", "details"}} for an item that was refused'
        },
    )


class BatchSchema(Schema):
    """A batch at a glance: its jobs by status, how far it is, when it should be done."""

    batch_id = fields.String()
    total = fields.Integer()
    counts = fields.Dict(
        keys=fields.String(), values=fields.Integer(), metadata={"description": "Jobs by status"}
    )
    progress = fields.Integer(
        metadata={
            "description": "0-100: a final job counts 100, a live one its progress; 100 once all are final"
        }
    )
    eta_utc = fields.String(
        allow_none=True, metadata={"description": "The latest ETA of its live jobs; null once all are final"}
    )
    created_at = fields.String(metadata={"description": "When its first job was created"})


class JobCancelManySchema(Schema):
    """Either ``ids`` or ``batch_id`` (documented as a oneOf by ``register``)."""

    class Meta:
        unknown = RAISE

    ids = fields.List(
        fields.String(validate=validate.Regexp(JOB_ID_RE), metadata={"pattern": JOB_ID_RE.pattern}),
        validate=validate.Length(min=1, max=MAX_BATCH),
        metadata={
            "description": f"1 to {MAX_BATCH} of your job ids (others' and unknown ids count in neither)"
        },
    )
    batch_id = fields.String(
        validate=check_batch_id,
        metadata={"description": "Every job of this batch", "pattern": BATCH_ID_PATTERN},
    )

    @validates_schema
    def _one_of(self, data: dict[str, Any], **_: Any) -> None:
        if ("ids" in data) == ("batch_id" in data):
            raise ValidationError("give either ids or batch_id")


class CancelledSchema(Schema):
    cancelled = fields.Integer(
        metadata={"description": "Jobs cancelled now (queued) or asked to stop (running)"}
    )
    already_final = fields.Integer(metadata={"description": "Jobs that had finished already"})


def register(api: Api) -> None:
    """Register the blueprint, with what its schemas cannot say themselves: a cancel takes exactly
    one of ``ids`` and ``batch_id``."""
    one_of = {"oneOf": [{"required": ["ids"]}, {"required": ["batch_id"]}]}
    api.spec.components.schema("JobCancelMany", one_of, schema=JobCancelManySchema)
    api.register_blueprint(blp)


# -- submit ---------------------------------------------------------------------------------------


@dataclass
class Item:
    """A batch item that passed the checks of its body."""

    index: int
    body: dict[str, Any]
    spec: TaskSpec
    key: str | None
    fingerprint: str | None  # kept for a keyed item only: only it can be replayed


ITEM_SCHEMA = BatchJobSchema()


def item_error(exc: HTTPException) -> dict[str, Any]:
    """A refusal raised by the single submit's checks, as a batch entry: the error body that
    request would have answered. A ``Retry-After`` header becomes ``details.retry_after``."""
    data = getattr(exc, "data", None) or {}
    details = data.get("details")
    if details is None:
        details = data.get("messages")
    retry_after = (data.get("headers") or {}).get("Retry-After")
    if retry_after is not None:
        details = {**(details or {}), "retry_after": int(retry_after)}
    return error_body(exc.code or 500, data.get("code"), data.get("message"), details)


def checked_item(index: int, raw: Any) -> Item:
    try:
        body = ITEM_SCHEMA.load(raw)
    except ValidationError as exc:
        abort(422, details=exc.messages)
    key = body.pop("idempotency_key", None)
    spec = checked_spec(body, services().settings)
    # The fingerprint of the job body alone, as POST /v1/jobs takes it: a key replays either way.
    return Item(index, body, spec, key, None if key is None else request_fingerprint(body))


@dataclass
class Admitted:
    """The jobs a batch's items became (not inserted yet), and what else the items asked for."""

    jobs: list[Job] = field(default_factory=list)
    specs: list[TaskSpec] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)  # the item of each job
    uploads: list[StoredFile] = field(default_factory=list)  # large data: inputs stored as assets
    repeats: list[tuple[int, int]] = field(default_factory=list)  # (item, earlier item with its key)
    # The priority an item asked for, where it was lowered to the client's max_priority.
    requested: dict[int, int] = field(default_factory=dict)


def submit_batch(body: dict[str, Any], batch_id: str, *, race_retry: bool = True) -> dict[str, Any]:
    """Check every item, admit the valid ones as ``POST /v1/jobs`` would, INSERT them all in one
    transaction, publish them in one confirmed batch; one entry per item, in order."""
    svc = services()
    raws = body["jobs"]
    entries: list[dict[str, Any] | None] = [None] * len(raws)
    items: list[Item] = []
    for index, raw in enumerate(raws):
        try:
            items.append(checked_item(index, raw))
        except HTTPException as exc:
            entries[index] = item_error(exc)
    admitted = admit_items(items, entries, batch_id)
    if admitted.jobs:
        # Jobs for local engines wait for slots (models/dispatch.py): the ones sent now are those
        # the dispatcher picks, in fair order, from this batch and from what waited before it.
        slotted = {job.id for job in admitted.jobs if waits_for_slot(svc.settings, job)}
        for job in admitted.jobs:
            if job.id in slotted:
                job.dispatched_at = None
        try:
            for job, spec in zip(admitted.jobs, admitted.specs, strict=True):
                job.predict_time = predicted(svc.db, spec.name, spec.predict_seconds)
            with svc.db.writing() as session:
                created = insert_jobs(session, admitted.jobs)
                now = utcnow()
                queues = sorted({job.queue for job in admitted.jobs if job.id in slotted})
                granted = [
                    job
                    for queue in queues
                    for job in take_turns(session, queue, now, svc.settings.dispatch_ahead, svc.settings)
                ]
        except IntegrityError:
            # Another request took one of the keys meanwhile: once more, which replays it.
            discard_uploads(svc, admitted.uploads)
            if not race_retry:
                raise
            return submit_batch(body, batch_id, race_retry=False)
        # Published only after COMMIT, as for one job: a worker never gets an id it cannot see.
        try:
            fresh = [job for job in admitted.jobs if job.id not in slotted]
            publish_batch(svc.celery, svc.settings, fresh + sendable(svc.store, granted))
        except (OperationalError, OSError):
            withdraw_jobs(svc.db, [job.id for job in admitted.jobs])
            discard_uploads(svc, admitted.uploads)
            abort(
                503,
                code="broker_unavailable",
                message="The job queue is unreachable; no new job of the batch was accepted. Retry shortly.",
                headers={"Retry-After": RETRY_AFTER_BROKER},
            )
        for index, created_job in zip(admitted.indexes, created, strict=True):
            entries[index] = {**created_job, "reused": False, **capped_note(admitted.requested.get(index))}
    for index, first_index in admitted.repeats:
        first = entries[first_index] or {}
        entries[index] = {**first, "reused": True} if "job_id" in first else first
    return {"batch_id": batch_id, "jobs": entries}


def capped_note(asked: int | None) -> dict[str, int]:
    """``requested_priority`` for a job whose priority was lowered to its client's max_priority."""
    return {} if asked is None else {"requested_priority": asked}


def admit_items(items: list[Item], entries: list[dict[str, Any] | None], batch_id: str) -> Admitted:
    """The single submit's steps after the body's checks, item by item and in order: a replay of
    an idempotency key (looked up for the whole batch at once), the client's admission limits
    (each job admitted counts for the next), large ``data:`` inputs stored as assets. A refused
    item gets its error in ``entries``."""
    svc = services()
    client_id = g.client_id
    keys = [item.key for item in items if item.key is not None]
    earlier = jobs_by_idempotency_keys(svc.db, client_id, keys) if keys else {}
    now = utcnow()
    admission = Admission(svc, client_id, now)
    first_with_key: dict[str, Item] = {}
    admitted = Admitted()
    for item in items:
        try:
            if item.key is not None:
                if item.key in earlier:
                    entries[item.index] = replayed(earlier[item.key], item.fingerprint)
                    continue
                first = first_with_key.setdefault(item.key, item)
                if first is not item:  # the same key twice in one batch: one job
                    if first.fingerprint != item.fingerprint:
                        refuse_reused_key()
                    admitted.repeats.append((item.index, first.index))
                    continue
            asked = item.body["priority"]
            priority = admission.admit(asked)
            payload, uploads = data_inputs_to_assets(svc, client_id, item.spec, item.body["payload"])
            admitted.uploads += uploads
            # One microsecond apart, in input order: lists page on ``created_at`` (``before``), and
            # a thousand jobs sharing one timestamp could not be paged through.
            created = now + timedelta(microseconds=item.index)
            body = item.body
            if priority != asked:  # lowered to the client's max_priority, and the answer says so
                body = {**body, "priority": priority}
                admitted.requested[item.index] = asked
            admitted.jobs.append(
                new_job(client_id, body, item.spec, payload, item.key, item.fingerprint, created, batch_id)
            )
            admitted.specs.append(item.spec)
            admitted.indexes.append(item.index)
        except HTTPException as exc:
            entries[item.index] = item_error(exc)
    return admitted


@blp.route("/jobs/batch")
class JobBatch(MethodView):
    @json_body_only
    @blp.arguments(BatchCreateSchema())
    @blp.response(200, BatchCreatedSchema)
    @documents(blp, 401, 413, 415, 503)
    def post(self, body: dict[str, Any]) -> Response:
        """Create up to 1000 jobs"""
        # The job objects go out as built (``job_response``): re-dumping a thousand of them
        # through the schema would cost more than their INSERT.
        response = job_response(submit_batch(body, body.get("batch_id") or new_id()))
        response.headers.update(admission_headers())  # the per-minute limit's, after the batch
        return response


# -- follow and cancel ----------------------------------------------------------------------------


@blp.route("/batches/<batch_id>")
class BatchById(MethodView):
    @blp.response(200, BatchSchema)
    @documents(blp, 401, 404)
    def get(self, batch_id: str) -> dict[str, Any]:
        """Get a batch's progress"""
        try:
            check_batch_id(batch_id)
            status = batch_status(services().db, job_scope(), batch_id)
        except ValidationError:
            status = None  # no batch can have this id
        if status is None:
            abort(404, code="batch_not_found", message="You have no job in this batch.")
        return {
            "batch_id": status.batch_id,
            "total": status.total,
            "counts": status.counts,
            "progress": status.progress,
            "eta_utc": iso(status.eta_utc),
            "created_at": iso(status.created_at),
        }


@blp.route("/jobs/cancel")
class JobsCancel(MethodView):
    @blp.arguments(JobCancelManySchema())
    @blp.response(200, CancelledSchema)
    @documents(blp, 401, 404)
    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """Cancel many jobs: by ids, or a whole batch"""
        svc = services()
        if "batch_id" in body:
            ids, already_final = live_job_ids(svc.db, job_scope(), body["batch_id"])
            if not ids and not already_final:
                abort(404, code="batch_not_found", message="You have no job in this batch.")
        else:
            ids, already_final = owned_job_ids(svc.db, job_scope(), body["ids"]), 0
        done = cancel_jobs(ids)
        return {"cancelled": done["cancelled"], "already_final": already_final + done["already_final"]}


def cancel_jobs(job_ids: Sequence[str]) -> dict[str, int]:
    """Cancel the caller's jobs through the lifecycle's cancel moves, ``CANCEL_CHUNK`` per
    transaction: queued ones end at once, running ones are asked to stop."""
    svc = services()
    cancelled = already_final = 0
    for start in range(0, len(job_ids), CANCEL_CHUNK):
        outcome = svc.store.cancel_many(job_ids[start : start + CANCEL_CHUNK])
        for job_id in outcome.ended:
            svc.storage.remove_inputs(job_id)  # fetched already, never to be used
        cancelled += len(outcome.ended) + len(outcome.flagged)
        already_final += outcome.already_final
    return {"cancelled": cancelled, "already_final": already_final}
