"""Request and response schemas of the jobs API (the OpenAPI document is built from these)."""

from __future__ import annotations

import json
import re
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates

from models.state import JobStatus
from tasks.payloads import literal_private_host

JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
PROGRESS_EVENTS = ("job.started", "job.progress")


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
        schemes={"http", "https"}, require_tld=False, allow_none=True, validate=validate.Length(max=2048)
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


def check_webhook_url(url: str | None, allow_private: bool) -> None:
    if url and not allow_private and literal_private_host(urlsplit(url).hostname or ""):
        raise ValidationError({"webhook_url": ["private, loopback and link-local addresses are not allowed"]})


class JobSchema(Schema):
    """The job object (seed 000's webhook body without event fields)."""

    job_id = fields.String()
    task = fields.String()
    status = fields.String(metadata={"enum": [s.value for s in JobStatus]})
    progress = fields.Integer()
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
    result = fields.Dict(allow_none=True)
    error = fields.Dict(allow_none=True)
    attempts = fields.Integer()
    metadata = fields.Dict()
    webhook_url = fields.String(allow_none=True)
    priority = fields.Integer()
    expires_at = fields.String(allow_none=True)
    reused = fields.Boolean()


class JobListSchema(Schema):
    jobs = fields.List(fields.Nested(JobSchema))
    have_next = fields.Boolean()


class JobQueryArgsSchema(Schema):
    class Meta:
        unknown = RAISE

    status = fields.String(validate=validate.OneOf([s.value for s in JobStatus]))
    task = fields.String(validate=validate.Length(min=1, max=64))
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=200))
    before = fields.AwareDateTime(format="iso", default_timezone=UTC)
    ids = fields.String(metadata={"description": "Comma-separated job ids (at most 50)"})

    @validates("ids")
    def _ids(self, value: str, **_: Any) -> None:
        ids = [part for part in value.split(",") if part]
        if not ids or len(ids) > 50:
            raise ValidationError("give 1 to 50 comma-separated job ids")
        bad = [part for part in ids if not JOB_ID_RE.match(part)]
        if bad:
            raise ValidationError(f"not a job id: {bad[0]}")
