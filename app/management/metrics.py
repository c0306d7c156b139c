"""``GET /metrics``: Prometheus exposition of the jobs, their run times, webhook attempts and
queue depths.

Counters and histograms are read from ``job_counters``, which the moves that end jobs and the
webhook attempts keep (``models.counters``): a scrape reads one row per series, however many jobs
the table holds, and the counters never go down when jobs are deleted. The jobs queued or running
now are a gauge, summed from the status counts that the jobs triggers keep (``job_status_counts``):
a scrape reads no job at all. Every worker's jobs count without multiprocess bookkeeping: all of it
lives in the database.

The figures are the whole platform's, all clients together, so only an admin key reads them
(``app.auth``), unless ``AIORCH_METRICS_PUBLIC=1`` opens them to anyone, as before roles. Prometheus
sends the key with ``authorization: {credentials: <admin key>}`` in its scrape config."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from flask import Flask, Response, current_app
from flask.views import MethodView
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from app.errors import ErrorSchema, documents
from app.management.queues import queue_depths
from app.schemas import Blueprint
from app.services import Services
from models.counters import BOUNDS
from models.stats import Histogram, job_metrics

blp = Blueprint("metrics", __name__, description="Operators: Prometheus metrics")

# Seconds; reaching GPU-scale minutes (a large generate or a video face swap). Fixed where the
# observations are counted, so changing them is a models change.
DURATION_BUCKETS = BOUNDS


def _histogram_family(name: str, doc: str, rows: Sequence[Histogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["task"])
    for row in rows:
        buckets = [
            (floatToGoString(bound), n) for bound, n in zip(DURATION_BUCKETS, row.at_most, strict=True)
        ]
        buckets.append(("+Inf", row.count))
        family.add_metric([row.task], buckets, row.total)
    return family


class JobCollector:
    """The families of one scrape, from one read of the database and one of the broker."""

    def __init__(self, services: Services):
        self.services = services

    def collect(self) -> Iterator[Metric]:
        figures = job_metrics(self.services.db)
        live = GaugeMetricFamily(
            "aiorch_jobs", "Jobs queued or running now, by task and status", labels=["task", "status"]
        )
        for task, status, count in figures.live:
            live.add_metric([task, status], count)
        yield live
        finished = CounterMetricFamily(
            "aiorch_jobs_finished",
            "Jobs that reached a final status, by task and status",
            labels=["task", "status"],
        )
        for task, status, count in figures.finished:
            finished.add_metric([task, status], count)
        yield finished
        yield _histogram_family("aiorch_job_duration_seconds", "Run time of finished jobs", figures.durations)
        yield _histogram_family(
            "aiorch_job_predict_time_seconds", "Predicted run time at queueing", figures.predict_times
        )
        yield _histogram_family(
            "aiorch_job_queue_wait_seconds",
            "Time jobs waited for their turn (accepted to started)",
            figures.queue_waits,
        )
        attempts = CounterMetricFamily(
            "aiorch_webhook_attempts", "Webhook delivery attempts", labels=["outcome"]
        )
        for outcome, count in sorted(figures.webhook_attempts.items()):
            attempts.add_metric([outcome], count)
        yield attempts
        depth = GaugeMetricFamily("aiorch_queue_depth", "Messages waiting per queue", labels=["queue"])
        for queue, waiting in queue_depths(self.services.celery).items():
            if waiting is not None:
                depth.add_metric([queue], waiting)
        yield depth


def _registry(app: Flask) -> CollectorRegistry:
    """One registry per app, built on the first scrape."""
    registry: CollectorRegistry | None = app.extensions.get("aiorch_registry")
    if registry is None:
        registry = CollectorRegistry()
        registry.register(JobCollector(app.extensions["aiorch"]))  # type: ignore[arg-type]
        app.extensions["aiorch_registry"] = registry
    return registry


@blp.route("/metrics")
class Metrics(MethodView):
    # Plain text, not JSON. An admin key only (app/auth.py), unless AIORCH_METRICS_PUBLIC=1.
    @blp.doc(
        description="Needs an admin key, unless the platform runs with AIORCH_METRICS_PUBLIC=1 "
        "(then no key at all).",
        responses={"200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    @blp.alt_response(403, schema=ErrorSchema, description="admin_only: a client key")
    @documents(blp, 401)
    def get(self) -> Response:
        """Prometheus exposition"""
        app: Any = current_app._get_current_object()  # type: ignore[attr-defined]
        return Response(generate_latest(_registry(app)), mimetype="text/plain; version=0.0.4")
