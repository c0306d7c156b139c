"""``GET /stats``: the caller's recent jobs, its job counts by status and task, queue depths, and
the fair-share scheduler's state per queue (slots; jobs in flight and waiting, per client for an
admin).

An admin key sees every client: the latest jobs of all of them, the counts over all their jobs,
and ``counts.by_client``. A client key sees its own client's jobs only. The counts are sums of
``job_status_counts`` and the latest jobs one index walk (``models.stats``): the same cost at a
million jobs as at ten."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView

from app.auth import job_scope
from app.management.backends import scheduler
from app.management.queues import queue_depths
from app.schemas import Blueprint, StatsSchema
from app.services import current_services
from models.public import job_object
from models.stats import client_overview

blp = Blueprint("stats", __name__, description="Operators: the caller's jobs at a glance")


@blp.route("/stats")
class Stats(MethodView):
    @blp.response(200, StatsSchema)
    def get(self) -> dict[str, Any]:
        """Recent jobs, counts by status and task, queue depths"""
        svc = current_services()
        overview = client_overview(svc.db, job_scope())
        counts: dict[str, Any] = {
            "by_status": overview.by_status,
            "by_task": overview.by_task,
            "total": sum(overview.by_status.values()),
        }
        if overview.by_client is not None:
            counts["by_client"] = overview.by_client
        return {
            "recent": [job_object(job) for job in overview.recent],
            "counts": counts,
            "queues": queue_depths(svc.celery),
            "scheduler": scheduler(svc.db, svc.settings.dispatch_ahead, job_scope()),
        }
