"""A live stream's response, for any view that starts one: the event routes (``app.streams``) and
``POST /v1/jobs`` with ``Accept: text/event-stream`` (``app.jobs``: the new job's stream, in the
answer to its submit).

Under ``aiorch serve`` the connection is handed over to the process's stream hub
(``app.stream_hub``) once the view returns, so an open stream holds no request thread; under any
other WSGI server (the Flask test client) the response drains a queue that the hub fills.
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Response, current_app, request

from app.errors import abort
from app.gunicorn_json import ADOPT, EVENT_STREAM, STREAM
from app.services import Services
from app.stream_hub import Opening, StreamHub
from app.stream_sinks import QueueSink


def wants_stream() -> bool:
    """Whether the request's ``Accept`` prefers an event stream to JSON."""
    return request.accept_mimetypes.best_match(["application/json", EVENT_STREAM]) == EVENT_STREAM


def hub() -> StreamHub:
    """The process's stream hub (made at first use)."""
    found: StreamHub | None = current_app.extensions.get("aiorch_hub")
    if found is None:
        svc: Services = current_app.extensions["aiorch"]
        found = StreamHub(svc.db, keepalive=svc.settings.stream_keepalive, ahead=svc.settings.dispatch_ahead)
        current_app.extensions["aiorch_hub"] = found
    return found


def resume_after() -> int | None:
    """``Last-Event-ID`` (a browser's EventSource sends it when it reconnects) or
    ``?last_event_id=``: the last event the client has."""
    raw = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    if raw is None or raw == "":
        return None
    if not raw.strip().isdigit() or len(raw) > 18:
        abort(
            400,
            code="invalid_last_event_id",
            message="Last-Event-ID must be an event id this API sent (a non-negative integer).",
            details={"field": "Last-Event-ID"},
        )
    return int(raw)


def stream_response(job_ids: list[str], after: int | None = None, opening: Opening | None = None) -> Response:
    """Start the stream of ``job_ids`` (already checked to be the caller's), from their current
    objects (``opening``, when the view read them), or from the events after ``after``
    (``resume_after``)."""
    streams = hub()
    if request.environ.get(ADOPT):
        # ``aiorch serve``: the worker hands the connection to the hub once this view returns.
        request.environ[STREAM] = lambda sock: streams.adopt(sock, job_ids, after, opening)
        return Response(status=200, mimetype=EVENT_STREAM)
    sink = QueueSink()
    stream = streams.open(job_ids, after, sink, opening)

    def body() -> Iterator[bytes]:
        try:
            while True:
                chunk = sink.frames.get()
                if chunk is None:
                    return
                yield chunk
        finally:
            streams.close(stream)

    return Response(
        body(),
        mimetype=EVENT_STREAM,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
