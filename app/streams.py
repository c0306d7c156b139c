"""Live status: ``GET /v1/jobs/{job_id}/events`` and ``GET /v1/events?ids=|?batch_id=`` as
server-sent events, fed from the job event log.

The view checks the request like any other (key, ids, ownership: a job of another client is
``404`` exactly like a missing one) in a request thread; the stream itself is written by the API's
stream hub (``app.live``, ``app.stream_hub``). ``POST /v1/jobs`` with ``Accept: text/event-stream``
answers with the new job's stream the same way (``app.jobs``).

Events: the first is each job's current object (or, with ``Last-Event-ID``, the job's events after
that id); then one per change, ``id: <event id>`` (increasing per job), ``event: job``,
``data: <job object>``; ``: keep-alive`` every ``AIORCH_STREAM_KEEPALIVE`` seconds (default 15);
the stream ends after every job it follows is final.
"""

from __future__ import annotations

from typing import Any

from flask import Response
from flask.views import MethodView
from marshmallow import Schema, ValidationError, fields, validate, validates

from app.auth import job_scope
from app.errors import abort, documents
from app.jobs import opening_of, services
from app.live import resume_after, stream_response
from app.schemas import Blueprint
from models import feed

blp = Blueprint("streams", __name__, description="Live status: server-sent events")

MAX_IDS = 1000
IDS_PATTERN = r"^[0-9a-f]{32}(,[0-9a-f]{32})*$"
EVENT_STREAM = {"text/event-stream": {"schema": {"type": "string"}}}


class EventsArgs(Schema):
    ids = fields.String(
        validate=validate.Regexp(IDS_PATTERN, error="comma-separated job ids (32 hex digits each)"),
        metadata={"description": f"comma-separated job ids (at most {MAX_IDS})"},
    )
    batch_id = fields.String(validate=validate.Length(min=1, max=64), metadata={"description": "a batch"})
    last_event_id = fields.Integer(
        validate=validate.Range(min=0), metadata={"description": "resume after this event id"}
    )

    @validates("ids")
    def _ids(self, value: str, **_: Any) -> None:
        if value.count(",") >= MAX_IDS:
            raise ValidationError(f"at most {MAX_IDS} job ids")


@blp.route("/v1/jobs/<job_id:job_id>/events")
class JobEvents(MethodView):
    @blp.doc(
        summary="Follow one job as server-sent events",
        responses={"200": {"description": "an event stream", "content": EVENT_STREAM}},
    )
    @documents(blp, 400, 401, 404)
    def get(self, job_id: str) -> Response:
        opening = opening_of(job_id)  # its 404 first, as for any read of the job
        after = resume_after()
        # A resumed stream starts from the events after Last-Event-ID, read by the hub.
        return stream_response([job_id], after, None if after is not None else opening)


@blp.route("/v1/events")
class Events(MethodView):
    @blp.arguments(EventsArgs, location="query")
    @blp.doc(
        summary="Follow many jobs (ids or a batch) as one server-sent event stream",
        responses={"200": {"description": "an event stream", "content": EVENT_STREAM}},
    )
    @documents(blp, 400, 401, 404, 422)
    def get(self, args: dict[str, Any]) -> Response:
        if "ids" not in args and "batch_id" not in args:
            abort(
                422,
                code="invalid_arguments",
                message="Give ids, batch_id or both (the stream follows them all).",
                details={"field": "ids"},
            )
        job_ids: list[str] = []
        svc = services()
        with svc.db.reading() as session:
            if "batch_id" in args:
                job_ids = feed.batch_jobs(session, job_scope(), args["batch_id"])
                if not job_ids:
                    abort(404, code="batch_not_found", message=f"No batch {args['batch_id']}.")
            if "ids" in args:
                asked = list(dict.fromkeys(args["ids"].split(",")))
                visible = feed.visible_jobs(session, asked, job_scope())
                missing = [job_id for job_id in asked if job_id not in visible]
                if missing:
                    abort(
                        404,
                        code="job_not_found",
                        message=f"No job {missing[0]}"
                        + (f" (and {len(missing) - 1} more)." if len(missing) > 1 else "."),
                        details={"field": "ids", "missing": missing[:20]},
                    )
                job_ids = list(dict.fromkeys([*job_ids, *asked]))
        return stream_response(job_ids, resume_after())
