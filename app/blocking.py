"""Seed 000's blocking endpoints: the async job path, with the connection held until it is final.

Waiting never polls Postgres in a loop: one listener thread per API process LISTENs on the channel
that ``models.jobstore.notify_final`` NOTIFYs on COMMIT and wakes the waiting requests. On SQLite
(the embedded default) waiters re-read the row gently instead.
"""

from __future__ import annotations

import logging
import select as io_select
import threading
import time
from typing import Any

import psycopg2
import psycopg2.extensions
from flask import current_app, request
from flask.views import MethodView
from marshmallow import Schema

from app.errors import abort, documents
from app.jobs import create_job, owned_job
from app.schemas import Blueprint, JobSchema
from models.jobstore import FINAL_CHANNEL
from models.public import job_object
from models.state import FINAL_STATUSES
from tasks import catalog

log = logging.getLogger("aiorch.api")
blp = Blueprint("blocking", __name__, description="Blocking endpoints (seed 000): wait for the result")

# endpoint path -> task name (seed 000's names; aliases resolve through the catalog): each task's
# ``blocking_path`` as its engine declares it (inference/engines/), plus the seed names that are
# aliases or remote-only (catalog.SEED_ENDPOINTS).
ENDPOINTS = catalog.blocking_endpoints()


class FinalWaiter:
    """Wakes threads waiting for a job id when Postgres announces it is final."""

    def __init__(self, dsn: str | None):
        self.dsn = dsn
        self._events: dict[str, list[threading.Event]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _ensure_listener(self) -> None:
        if self.dsn is None or (self._thread is not None and self._thread.is_alive()):
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._listen, name="aiorch-listen", daemon=True)
                self._thread.start()

    def _listen(self) -> None:
        while True:
            try:
                conn = psycopg2.connect(self.dsn)
                conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
                with conn.cursor() as cursor:
                    cursor.execute(f"LISTEN {FINAL_CHANNEL}")
                while True:
                    if io_select.select([conn], [], [], 30.0) == ([], [], []):
                        continue
                    conn.poll()
                    while conn.notifies:
                        self._wake(conn.notifies.pop(0).payload)
            except psycopg2.Error as exc:
                log.warning("job listener lost its connection (%s); reconnecting", exc)
                self._wake_all()  # waiters re-check the row themselves
                time.sleep(1.0)

    def _wake(self, job_id: str) -> None:
        with self._lock:
            for event in self._events.get(job_id, ()):
                event.set()

    def _wake_all(self) -> None:
        with self._lock:
            for events in self._events.values():
                for event in events:
                    event.set()

    def wait(self, job_id: str, is_final: Any, timeout: float) -> bool:
        """Block until ``is_final()`` holds or ``timeout`` passes; True when final."""
        self._ensure_listener()
        event = threading.Event()
        with self._lock:
            self._events.setdefault(job_id, []).append(event)
        try:
            deadline = time.monotonic() + timeout
            # Registered before the first check, so a NOTIFY between check and wait is not lost.
            while not is_final():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                # With a listener, the re-check is a safety net every 5 s; without (SQLite), 0.25 s.
                event.wait(min(left, 5.0 if self.dsn else 0.25))
                event.clear()
            return True
        finally:
            with self._lock:
                waiting = self._events.get(job_id, [])
                if event in waiting:
                    waiting.remove(event)
                if not waiting:
                    self._events.pop(job_id, None)


def waiter() -> FinalWaiter:
    svc = current_app.extensions["aiorch"]
    found = current_app.extensions.get("aiorch_waiter")
    if found is None:
        dsn = None
        if svc.db.is_postgres:
            dsn = svc.db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        found = current_app.extensions["aiorch_waiter"] = FinalWaiter(dsn)
    return found


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

    if not waiter().wait(job_id, is_final, svc.settings.sync_timeout):
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
