"""Request and response schemas of the jobs API (the OpenAPI document is built from these)."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import flask_smorest
from flask.json.provider import DefaultJSONProvider
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates
from webargs.core import missing
from webargs.flaskparser import FlaskParser, is_json_request
from werkzeug.routing import BaseConverter

from config import Settings
from models.state import JobStatus
from tasks import catalog
from tasks.outbound import UrlPolicy, refused_host_reason
from tasks.payloads.base import HTTP_URL_PATTERN

JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
# A batch id, the client's or generated (32 hex): safe in a URL path and a query, as given.
BATCH_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
_BATCH_ID_RE = re.compile(BATCH_ID_PATTERN.removesuffix("$"))


def check_batch_id(value: str) -> None:
    """``BATCH_ID_PATTERN``, matched in full (a regex's ``$`` would let a trailing newline by)."""
    if not _BATCH_ID_RE.fullmatch(value):
        raise ValidationError("1 to 64 letters, digits and . _ : - (starting with a letter or digit)")


class JobIdConverter(BaseConverter):
    """``<job_id:...>`` in a URL: any segment but the names of the batch operations beside it
    (``/v1/jobs/batch``, ``/v1/jobs/cancel``), so those answer 405, not "no job batch", to another
    method, and advertise only their own methods in ``Allow``."""

    regex = r"(?!(?:batch|cancel)$)[^/]+"
    SCHEMA = {"type": "string", "minLength": 1, "not": {"enum": ["batch", "cancel"]}}  # in the spec


PROGRESS_EVENTS = ("job.started", "job.progress")


# Request bodies. The largest legitimate body is one input image at the byte limit sent inline as a
# base64 ``data:`` URI (4/3 of its size) plus the JSON around it; anything bigger is refused with a
# 413 before it is read, so one request can never hold more than this much of a worker's memory.
BODY_ENVELOPE_BYTES = 1 << 20
# Deeper JSON than any payload needs; deep nesting only ever served to exhaust a parser's stack
# (the stdlib's recursion limit is ~1000 levels: a 960-deep body used to reach the worker).
MAX_JSON_DEPTH = 32


def max_body_bytes(max_input_bytes: int) -> int:
    """The one cap on request bodies (Flask's ``MAX_CONTENT_LENGTH``): the input limit as base64,
    plus the envelope."""
    return max_input_bytes * 4 // 3 + BODY_ENVELOPE_BYTES


class JsonTooDeep(Exception):
    """A JSON body nested deeper than ``MAX_JSON_DEPTH``; answered 422 ``json_too_deep``.

    Deliberately not a ``ValueError``: ``request.get_json(silent=True)`` swallows those, and this
    refusal must reach the client as itself, not as "the body is not an object"."""

    def __init__(self, limit: int = MAX_JSON_DEPTH) -> None:
        super().__init__(f"The JSON body is nested more than {limit} levels deep (at most {limit}).")
        self.limit = limit


def json_depth_exceeds(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` nests objects and arrays more than ``limit`` deep (``{}`` is depth 1).
    An explicit stack, not recursion: the point is to refuse what would exhaust a stack."""
    if not isinstance(value, dict | list):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"{text} is out of range")
    return number


def strict_json_loads(data: str | bytes) -> Any:
    """A request body as RFC 8259 JSON at most ``MAX_JSON_DEPTH`` deep. Python's json reads
    ``NaN``/``Infinity`` (and ``1e400`` as infinity), which Postgres cannot store and no other client
    would send: those are a ``JSONDecodeError``, which the parsers answer with a 400/422. Nesting
    deeper than the limit raises ``JsonTooDeep`` (422), including nesting so deep that the stdlib
    parser itself gives up with RecursionError."""
    text = data.decode("utf-8", errors="strict") if isinstance(data, bytes | bytearray) else data
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise JsonTooDeep() from None
    except ValueError as exc:
        raise json.JSONDecodeError(f"not valid JSON: {exc}", text, 0) from None
    # Counting brackets is C-speed and settles almost every body (flat ones, and those whose only
    # brackets are a few objects) without walking the parsed value.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and json_depth_exceeds(value):
        raise JsonTooDeep()
    return value


class StrictJSONProvider(DefaultJSONProvider):
    """Flask's ``request.get_json`` through ``strict_json_loads`` (the blocking endpoints)."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return strict_json_loads(s)


class StrictJsonParser(FlaskParser):
    """webargs reads bodies with the stdlib json itself; this reads them with ``strict_json_loads``."""

    def _raw_load_json(self, req: Any) -> Any:
        if not is_json_request(req):
            return missing
        try:
            return strict_json_loads(req.get_data(cache=True))
        except UnicodeDecodeError as exc:
            raise json.JSONDecodeError(f"not UTF-8: {exc.reason}", " ", exc.start) from None


class Blueprint(flask_smorest.Blueprint):
    """flask-smorest's Blueprint, its request bodies parsed as strict JSON."""

    ARGUMENTS_PARSER = StrictJsonParser()


class JobCreateSchema(Schema):
    class Meta:
        unknown = RAISE

    task = fields.String(
        required=True,
        validate=validate.Length(min=1, max=64),
        metadata={"description": "Task name, e.g. upscale (GET /v1/capabilities lists them)"},
    )
    payload = fields.Dict(load_default=dict, metadata={"description": "The task's parameters"})
    webhook_url = fields.Url(
        schemes={"http", "https"},
        require_tld=False,
        allow_none=True,
        # marshmallow's URL check lets NUL and lone surrogates through; Postgres stores neither.
        validate=[validate.Length(max=2048), validate.Regexp(r"^[^\x00-\x1f\x7f\ud800-\udfff]*$")],
        metadata={"pattern": HTTP_URL_PATTERN},
    )
    webhook_events = fields.List(
        fields.String(validate=validate.OneOf(PROGRESS_EVENTS)),
        metadata={"description": "Opt-in progress events besides job.finished"},
    )
    priority = fields.Integer(load_default=0, validate=validate.Range(min=0, max=9))
    metadata = fields.Dict(load_default=dict)

    @validates("metadata")
    def _small_metadata(self, value: dict[str, Any], **_: Any) -> None:
        if len(json.dumps(value)) > 16 * 1024:
            raise ValidationError("metadata must be at most 16 KiB of JSON")


def check_webhook_url(url: str | None, settings: Settings) -> None:
    """The SSRF guard's check of the host, without DNS (the worker checks what it resolves to)."""
    if not url:
        return
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:  # a broken [IPv6] literal
        raise ValidationError({"webhook_url": ["Not a valid URL."]}) from None
    reason = refused_host_reason(host, UrlPolicy.from_settings(settings))
    if reason is not None:
        raise ValidationError({"webhook_url": [f"refused: the host {reason}"]})


class JobSchema(Schema):
    """The job object (seed 000's webhook body without event fields).

    ``models.public.job_object`` builds it and the views send that dict as it is; this schema
    documents it, and tests/app/test_api_shapes.py holds the two to the same fields and types."""

    job_id = fields.String()
    task = fields.String()
    status = fields.String(metadata={"enum": [s.value for s in JobStatus]})
    progress = fields.Integer()
    progress_detail = fields.Dict(
        allow_none=True,
        metadata={
            "description": "What a run reports beside its percentage: a train_lora job's "
            '{"step", "steps", "loss"} ({"training_progress"}, a fraction, when SenseTime trains it); '
            "null for the other tasks"
        },
    )
    ok = fields.Boolean()
    created_at = fields.String(allow_none=True)
    created_at_ms = fields.Integer(allow_none=True)
    queued_at = fields.String(allow_none=True)
    queued_at_ms = fields.Integer(allow_none=True)
    started_at = fields.String(allow_none=True)
    started_at_ms = fields.Integer(allow_none=True)
    finished_at = fields.String(allow_none=True)
    finished_at_ms = fields.Integer(allow_none=True)
    duration = fields.Float(allow_none=True)
    predict_time = fields.Float(allow_none=True)
    eta_utc = fields.String(allow_none=True)
    queue_position = fields.Integer(
        allow_none=True,
        metadata={
            "description": "While queued, how many jobs of its queue start before it (0 = next), in the "
            "fair-share order the platform really uses; null otherwise. Computed by GET /v1/jobs/{id}, "
            "which also recomputes eta_utc from it (null in lists, events and webhooks)."
        },
    )
    result = fields.Dict(allow_none=True)
    error = fields.Dict(allow_none=True)
    attempts = fields.Integer()
    metadata = fields.Dict()
    webhook_url = fields.String(allow_none=True)
    batch_id = fields.String(
        allow_none=True, metadata={"description": "The batch it was submitted in (POST /v1/jobs/batch)"}
    )
    priority = fields.Integer()
    expires_at = fields.String(allow_none=True)
    reused = fields.Boolean(
        metadata={
            "description": "Only on POST: true when an earlier job with the same Idempotency-Key answers"
        }
    )
    requested_priority = fields.Integer(
        metadata={
            "description": "Only on the POST that accepted it, and only when the priority asked for was "
            "above the client's max_priority: what was asked (priority is the one the job got)"
        }
    )


class JobListSchema(Schema):
    jobs = fields.List(fields.Nested(JobSchema))
    have_next = fields.Boolean()


class StatsCountsSchema(Schema):
    by_status = fields.Dict(keys=fields.String(), values=fields.Integer())
    by_task = fields.Dict(keys=fields.String(), values=fields.Integer())
    total = fields.Integer()
    by_client = fields.Dict(
        keys=fields.String(),
        values=fields.Integer(),
        metadata={"description": "Admin keys only: every client's number of jobs"},
    )


class StatsSchema(Schema):
    """The caller's jobs at a glance, and how busy the queues are."""

    recent = fields.List(fields.Nested(JobSchema), metadata={"description": "The latest jobs, newest first"})
    counts = fields.Nested(StatsCountsSchema)
    queues = fields.Dict(
        keys=fields.String(),
        values=fields.Integer(allow_none=True),
        metadata={"description": "Messages waiting per queue; null when the broker cannot say"},
    )
    scheduler = fields.Dict(
        keys=fields.String(),
        values=fields.Dict(),
        metadata={
            "description": "Per local engine queue: its slots, the jobs in flight (sent or running) and "
            "waiting for a slot; per client for an admin key, the caller's own (mine) for a client key"
        },
    )


class DeliverySchema(Schema):
    """One attempt to deliver one webhook event of a job."""

    id = fields.Integer()
    event = fields.String()
    event_id = fields.String(metadata={"description": "The webhook-id header, the same on every retry"})
    attempt = fields.Integer()
    url = fields.String()
    ok = fields.Boolean()
    status_code = fields.Integer(allow_none=True)
    error = fields.String(allow_none=True)
    duration_ms = fields.Float(allow_none=True)
    created_at = fields.String()
    next_retry_at = fields.String(allow_none=True)


class DeliveryListSchema(Schema):
    deliveries = fields.List(fields.Nested(DeliverySchema))


class JobQueryArgsSchema(Schema):
    class Meta:
        unknown = RAISE

    status = fields.String(validate=validate.OneOf([s.value for s in JobStatus]))
    # The enum and the pattern only document what the view and ``_ids`` check (and say it exactly,
    # so a client, or a fuzzer, can tell an accepted filter from a refused one).
    task = fields.String(validate=validate.Length(min=1, max=64), metadata={"enum": catalog.known_names()})
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=200))
    before = fields.AwareDateTime(format="iso", default_timezone=UTC)
    batch_id = fields.String(
        validate=check_batch_id,
        metadata={"description": "Only the jobs of this batch", "pattern": BATCH_ID_PATTERN},
    )
    client = fields.String(
        validate=validate.Length(min=1, max=64),
        metadata={
            "description": "Admin keys: only this client's jobs (without it, every client's). A client "
            "key may name only its own client"
        },
    )
    ids = fields.String(
        metadata={
            "description": "Comma-separated job ids (at most 50)",
            "pattern": r"^,*[0-9a-f]{32}(?:,+[0-9a-f]{32}){0,49},*$",
        }
    )

    @validates("before")
    def _before(self, value: datetime, **_: Any) -> None:
        try:
            value.astimezone(UTC)  # 0001-01-01T00:00+23:59 is before the first instant we can store
        except OverflowError:
            raise ValidationError("out of range") from None

    @validates("ids")
    def _ids(self, value: str, **_: Any) -> None:
        ids = [part for part in value.split(",") if part]
        if not ids or len(ids) > 50:
            raise ValidationError("give 1 to 50 comma-separated job ids")
        bad = [part for part in ids if not JOB_ID_RE.fullmatch(part)]
        if bad:
            raise ValidationError(f"not a job id: {bad[0]}")
