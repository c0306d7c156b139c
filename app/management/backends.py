"""``GET /diag/backends``: every worker's queues, slots, busy slots, active jobs, loaded models and
devices, from one broadcast that each worker answers (``tasks/diag.py``); and the fair-share
scheduler's state per local engine queue (``scheduler``: slots, jobs in flight and waiting).

The workers answer with every client's running job ids; what a caller sees of them depends on its
key: a client key sees its own jobs among ``active_jobs`` (``busy`` still counts every slot in
use), an admin key sees all of them and, in ``active_clients``, whose each one is."""

from __future__ import annotations

import threading
import time
from typing import Any

from celery import Celery
from flask.views import MethodView

from app.auth import job_scope
from app.errors import abort
from app.schemas import Blueprint
from app.services import current_services
from models.db import Database, utcnow
from models.reads import clients_of
from models.standing import scheduler_state
from tasks.next_step import SLOTTED

blp = Blueprint("backends", __name__, description="Operators: the workers and what they hold")

DIAG_CACHE_SECONDS = 3.0
DIAG_REPLY_SECONDS = 1.0  # how long one broadcast waits for the workers' answers


class _DiagCache:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.value: dict[str, Any] | None = None
        self.at = 0.0


_diag = _DiagCache()


def collect_backends(celery: Celery) -> dict[str, Any]:
    """Celery inspect (queues, slots, active jobs, our per-child info), cached briefly so a burst
    of requests costs the broker one broadcast."""
    with _diag.lock:
        if _diag.value is not None and time.monotonic() - _diag.at < DIAG_CACHE_SECONDS:
            return _diag.value
        inspect = celery.control.inspect(timeout=DIAG_REPLY_SECONDS)
        try:
            # One broadcast: every worker answers ``aiorch_info`` with its slots, queues, active
            # jobs, children and clock (see tasks/diag.py).
            info = inspect._request("aiorch_info") or {}
        except Exception:  # any transport error: the broker is down or refuses us
            abort(
                503,
                code="broker_unavailable",
                message="Cannot reach the workers: the broker is unreachable; retry shortly.",
                headers={"Retry-After": "5"},
            )
        _diag.value = {
            "workers": [_worker(name, info[name]) for name in sorted(info)],
            "checked_at": time.time(),
        }
        _diag.at = time.monotonic()
        return _diag.value


def _worker(name: str, node: dict[str, Any]) -> dict[str, Any]:
    children = node.get("children", [])
    active_jobs = node.get("active_jobs") or []
    return {
        "name": name,
        "queues": node.get("queues") or [],
        "concurrency": node.get("concurrency"),
        "busy": len(active_jobs),
        "active_jobs": active_jobs,
        "loaded_models": [m for child in children for m in child.get("loaded_models", [])],
        "devices": [{k: v for k, v in child.items() if k != "loaded_models"} for child in children]
        or [node.get("parent", {})],
        "pid": (node.get("parent") or {}).get("pid"),
        "uptime": node.get("uptime"),
        # The worker's own clock when it answered: its latest sign of life.
        "last_heartbeat": node.get("now"),
    }


def as_seen_by(diag: dict[str, Any], db: Database, client_id: str | None) -> dict[str, Any]:
    """The (cached, shared) answer as one caller may see it: its own client's active jobs only,
    or, for an admin (``client_id`` None), every one with its client. A copy: the cache is kept."""
    # A task's first argument: a job id for the job tasks, something else for the others.
    running = [j for worker in diag["workers"] for j in worker["active_jobs"] if isinstance(j, str)]
    owners = clients_of(db, running)
    workers = []
    for worker in diag["workers"]:
        jobs = [j for j in worker["active_jobs"] if isinstance(j, str) and j in owners]
        if client_id is None:
            shown = {**worker, "active_clients": {j: owners[j] for j in jobs}}
        else:
            shown = {**worker, "active_jobs": [j for j in jobs if owners[j] == client_id]}
        workers.append(shown)
    return {**diag, "workers": workers}


@blp.route("/diag/backends")
class Backends(MethodView):
    @blp.response(200)
    def get(self) -> dict[str, Any]:
        """Workers: queues, slots, busy slots, active jobs, loaded models, devices"""
        svc = current_services()
        seen = as_seen_by(collect_backends(svc.celery), svc.db, job_scope())
        return {**seen, "scheduler": scheduler(svc.db, svc.settings.dispatch_ahead, job_scope())}


def scheduler(db: Database, ahead: int, client_id: str | None) -> dict[str, Any]:
    """The fair-share dispatcher's state per local engine queue (``models.dispatch``): its slots,
    the jobs in flight and waiting; per client for an admin, a client's own beside the totals."""
    with db.session() as session:
        states = scheduler_state(session, sorted(SLOTTED), utcnow(), ahead)
    shown: dict[str, Any] = {}
    for state in states:
        entry: dict[str, Any] = {
            "slots": state.slots,
            "sent_ahead": state.ahead,
            "in_flight": sum(state.in_flight.values()),
            "waiting": sum(state.waiting.values()),
        }
        if client_id is None:
            entry["in_flight_by_client"] = state.in_flight
            entry["waiting_by_client"] = state.waiting
        else:
            entry["mine"] = {
                "in_flight": state.in_flight.get(client_id, 0),
                "waiting": state.waiting.get(client_id, 0),
            }
        shown[state.queue] = entry
    return shown
