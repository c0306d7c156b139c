"""Seed 000's blocking endpoints: the async job path, with the connection held until it is final.

Waiting never polls in a loop: the waiting request thread is woken by the API's stream hub
(``app.stream_hub``) whenever the job logs an event (Postgres NOTIFY, or on SQLite the log's tail
read by the hub), the same wake-up that feeds the live streams, and then re-reads the job.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import current_app, request
from flask.views import MethodView
from marshmallow import Schema

from app.errors import abort, documents
from app.jobs import create_job, owned_job
from app.live import hub
from app.schemas import Blueprint, JobSchema
from models.public import job_object
from models.state import FINAL_STATUSES
from tasks import catalog

log = logging.getLogger("aiorch.api")
blp = Blueprint("blocking", __name__, description="Blocking endpoints (seed 000): wait for the result")

# endpoint path -> task name (seed 000's names; aliases resolve through the catalog): each task's
# ``blocking_path`` as its engine declares it (inference/engines/), plus the seed names that are
# aliases or remote-only (catalog.SEED_ENDPOINTS).
ENDPOINTS = catalog.blocking_endpoints()


def run_blocking(task: str) -> tuple[dict[str, Any], int]:
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        abort(400, code="bad_request", message="The body must be a JSON object: the task's payload.")
    if task == "faceswap" and "source_urls" in payload:
        task = "faceswap_multi"
    body = {"task": task, "payload": payload, "priority": 5, "metadata": {"blocking": True}}
    created, _status = create_job(body, request.headers.get("Idempotency-Key"))
    job_id = created["job_id"]
    svc = current_app.extensions["aiorch"]

    def is_final() -> bool:
        # A job deleted while its request waits is over too: owned_job below answers 404.
        job = svc.store.get(job_id)
        return job is None or job.status in FINAL_STATUSES

    if not hub().wait(job_id, is_final, svc.settings.sync_timeout):
        abort(
            504,
            code="timeout",
            message=f"The job did not finish within {svc.settings.sync_timeout:g} s; "
            "it goes on: poll GET /v1/jobs/{job_id}.",
            details={"job_id": job_id},
        )
    return job_object(owned_job(job_id)), 200


def _body_schema(task: str) -> type[Schema] | dict[str, Any]:
    """The OpenAPI request body: the task's payload schema (``/faceswap`` takes either face
    swap's); a name with no payload schema of its own takes any object."""
    names = ["faceswap", "faceswap_multi"] if task == "faceswap" else [task]
    canonical = [catalog.REMOTE_TARGETS.get(n) or catalog.ALIASES.get(n, n) for n in names]
    schemas = [catalog.TASKS[n].schema for n in canonical if n in catalog.TASKS]
    if not schemas:
        return {"type": "object"}
    return schemas[0] if len(schemas) == 1 else {"oneOf": schemas}


def _make_view(task: str) -> type[MethodView]:
    class BlockingView(MethodView):
        @blp.doc(
            requestBody={"required": True, "content": {"application/json": {"schema": _body_schema(task)}}}
        )
        @blp.response(200, JobSchema)
        @documents(blp, 400, 401, 409, 413, 415, 422, 429, 501, 503, 504)
        def post(self) -> tuple[dict[str, Any], int]:
            return run_blocking(task)

    BlockingView.post.__doc__ = f"Run {task} and wait for the result"
    BlockingView.__name__ = f"Blocking_{task}"
    return BlockingView


for _path, _task in ENDPOINTS.items():
    blp.route(_path, endpoint=_task)(_make_view(_task))
