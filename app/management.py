"""Operators' endpoints: /stats, /diag/backends, /v1/capabilities, /v1/models and /metrics."""

from __future__ import annotations

import threading
import time
from typing import Any

from flask import Response, current_app, g
from flask.views import MethodView
from marshmallow import Schema, fields, validate
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from sqlalchemy import ColumnElement, case, func, select

from app.errors import abort
from app.schemas import Blueprint
from config import QUEUES
from models.jobs import Job, WebhookDelivery
from models.public import job_object
from tasks import catalog
from tasks.model_registry import has_model_for

blp = Blueprint("management", __name__, description="Operators: stats, diagnostics, capabilities, models")

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
DIAG_CACHE_SECONDS = 3.0
DIAG_REPLY_SECONDS = 1.0  # how long one broadcast waits for the workers' answers


def services() -> Any:
    return current_app.extensions["aiorch"]


def queue_depths() -> dict[str, int | None]:
    """Messages ready in each queue (None when the broker cannot say)."""
    depths: dict[str, int | None] = {}
    try:
        with services().celery.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
            channel = connection.default_channel
            for name in QUEUES:
                try:
                    depths[name] = int(channel.queue_declare(queue=name, passive=True).message_count)
                except Exception:  # a queue no worker declared yet
                    depths[name] = 0
                    channel = connection.channel()
    except Exception:
        return {name: None for name in QUEUES}
    return depths


@blp.route("/stats")
class Stats(MethodView):
    @blp.response(200)
    def get(self) -> dict[str, Any]:
        """Recent jobs, counts by status and task, queue depths"""
        with services().db.session() as session:
            mine = Job.client_id == g.client_id
            recent = list(session.scalars(select(Job).where(mine).order_by(Job.created_at.desc()).limit(20)))
            by_status = dict(
                session.execute(select(Job.status, func.count()).where(mine).group_by(Job.status)).all()
            )
            by_task = dict(
                session.execute(select(Job.task, func.count()).where(mine).group_by(Job.task)).all()
            )
        return {
            "recent": [job_object(job) for job in recent],
            "counts": {"by_status": by_status, "by_task": by_task, "total": sum(by_status.values())},
            "queues": queue_depths(),
        }


class _DiagCache:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.value: dict[str, Any] | None = None
        self.at = 0.0


_diag = _DiagCache()


def collect_backends() -> dict[str, Any]:
    """Celery inspect (queues, slots, active jobs, our per-child info), cached briefly so a burst
    of requests costs the broker one broadcast."""
    with _diag.lock:
        if _diag.value is not None and time.monotonic() - _diag.at < DIAG_CACHE_SECONDS:
            return _diag.value
        inspect = services().celery.control.inspect(timeout=DIAG_REPLY_SECONDS)
        try:
            # One broadcast: every worker answers ``aiorch_info`` with its slots, queues, active
            # jobs, children and clock (see tasks/diag.py).
            info = inspect._request("aiorch_info") or {}
        except Exception as exc:
            abort(
                503,
                code="broker_unavailable",
                message=f"Cannot reach the workers: {type(exc).__name__}",
                headers={"Retry-After": "5"},
            )
        now = time.time()
        nodes = []
        for name in sorted(info):
            node = info[name]
            children = node.get("children", [])
            active_jobs = node.get("active_jobs") or []
            nodes.append(
                {
                    "name": name,
                    "queues": node.get("queues") or [],
                    "concurrency": node.get("concurrency"),
                    "busy": len(active_jobs),
                    "active_jobs": active_jobs,
                    "loaded_models": [m for child in children for m in child.get("loaded_models", [])],
                    "devices": [
                        {k: v for k, v in child.items() if k != "loaded_models"} for child in children
                    ]
                    or [node.get("parent", {})],
                    "pid": (node.get("parent") or {}).get("pid"),
                    "uptime": node.get("uptime"),
                    # The worker's own clock when it answered: its latest sign of life.
                    "last_heartbeat": node.get("now"),
                }
            )
        _diag.value = {"workers": nodes, "checked_at": now}
        _diag.at = time.monotonic()
        return _diag.value


@blp.route("/diag/backends")
class Backends(MethodView):
    @blp.response(200)
    def get(self) -> dict[str, Any]:
        """Workers: queues, slots, busy slots, active jobs, loaded models, devices"""
        return collect_backends()


def describe_field(name: str, field: fields.Field) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "type": type(field).__name__.lower(), "required": field.required}
    if field.metadata.get("description"):
        # What a parameter means where the schema says it (the face tasks' index order, e.g.).
        entry["description"] = field.metadata["description"]
    default = field.load_default
    if default is not None and not callable(default) and repr(default) != "<marshmallow.missing>":
        entry["default"] = default
    for rule in field.validators:
        if isinstance(rule, validate.OneOf):
            entry["choices"] = list(rule.choices)
        elif isinstance(rule, validate.Range):
            entry["min"], entry["max"] = rule.min, rule.max
        elif isinstance(rule, validate.Length):
            entry["min_length"], entry["max_length"] = rule.min, rule.max
    return entry


def _runs_now(settings: Any, name: str) -> bool:
    """Whether ``POST /v1/jobs`` would accept the task now: the same check job creation makes, so
    a task served by a configured remote route counts as installed without a local model."""
    try:
        catalog.resolve(
            name,
            debug_tasks=settings.debug_tasks,
            has_model=lambda s: has_model_for(settings, s.name, s.model_types),
            routes=settings.routes,
        )
    except (catalog.UnknownTask, catalog.TaskUnavailable):
        return False
    return True


@blp.route("/v1/capabilities")
class Capabilities(MethodView):
    @blp.response(200)
    def get(self) -> dict[str, Any]:
        """Every task, its queue, parameters and whether it can run here now"""
        settings = services().settings
        debug = settings.debug_tasks
        tasks = []
        for spec in catalog.TASKS.values():
            if spec.debug_only and not debug:
                continue
            schema: Schema = spec.schema()
            tasks.append(
                {
                    "task": spec.name,
                    "queue": spec.queue,
                    "summary": spec.summary,
                    "installed": _runs_now(settings, spec.name),
                    "aliases": sorted(
                        alias for alias, target in catalog.ALIASES.items() if target == spec.name
                    ),
                    "inputs": list(spec.inputs),
                    "parameters": [describe_field(name, field) for name, field in schema.fields.items()],
                }
            )
        for name, summary in catalog.REMOTE_ONLY.items():
            target = catalog.TASKS.get(catalog.REMOTE_TARGETS.get(name, ""))
            tasks.append(
                {
                    "task": name,
                    "queue": "cpu",
                    "summary": summary,
                    "installed": _runs_now(settings, name),
                    "aliases": [],
                    "inputs": list(target.inputs) if target else [],
                    "parameters": [describe_field(n, f) for n, f in target.schema().fields.items()]
                    if target
                    else [],
                }
            )
        return {"tasks": tasks}


class ModelsQuery(Schema):
    type = fields.String(validate=validate.Length(max=32))
    size = fields.Integer(load_default=50, validate=validate.Range(min=1, max=200))
    offset = fields.Integer(load_default=0, validate=validate.Range(min=0))


@blp.route("/v1/models")
class Models(MethodView):
    @blp.arguments(ModelsQuery, location="query")
    @blp.response(200)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """Models in the model store and built-in engines, paged"""
        from tasks.model_registry import list_models

        entries = list_models(services().settings, args.get("type"))
        page = entries[args["offset"] : args["offset"] + args["size"]]
        return {"data": page, "have_next": args["offset"] + args["size"] < len(entries)}


class JobCollector:
    """Prometheus metrics read from Postgres at scrape time, so every worker's jobs count without
    multiprocess bookkeeping; the histograms are cumulative over the jobs still in the database."""

    def __init__(self, app: Any):
        self.app = app

    def collect(self) -> Any:
        svc = self.app.extensions["aiorch"]
        db = svc.db
        jobs = GaugeMetricFamily(
            "aiorch_jobs", "Jobs in the database by task and status", labels=["task", "status"]
        )
        with db.session() as session:
            for task, status, count in session.execute(
                select(Job.engine_task, Job.status, func.count()).group_by(Job.engine_task, Job.status)
            ):
                jobs.add_metric([task, status], count)
            yield jobs
            seconds: ColumnElement[Any]
            if db.is_postgres:
                seconds = func.extract("epoch", Job.finished_at - Job.started_at)
            else:
                seconds = (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0
            for name, column, doc in (
                ("aiorch_job_duration_seconds", seconds, "Run time of finished jobs"),
                ("aiorch_job_predict_time_seconds", Job.predict_time, "Predicted run time at queueing"),
            ):
                family = HistogramMetricFamily(name, doc, labels=["task"])
                cols = [func.sum(case((column <= bound, 1), else_=0)) for bound in DURATION_BUCKETS]
                query = (
                    select(Job.engine_task, func.count(), func.coalesce(func.sum(column), 0.0), *cols)
                    .where(Job.finished_at.is_not(None), Job.started_at.is_not(None))
                    .group_by(Job.engine_task)
                )
                for task, count, total, *cumulative in session.execute(query):
                    buckets = [
                        (floatToGoString(b), int(c or 0))
                        for b, c in zip(DURATION_BUCKETS, cumulative, strict=True)
                    ]
                    buckets.append(("+Inf", int(count)))
                    family.add_metric([task], buckets, float(total or 0.0))
                yield family
            attempts = CounterMetricFamily(
                "aiorch_webhook_attempts", "Webhook delivery attempts", labels=["outcome"]
            )
            for ok, count in session.execute(
                select(WebhookDelivery.ok, func.count()).group_by(WebhookDelivery.ok)
            ):
                attempts.add_metric(["success" if ok else "failure"], count)
            yield attempts
        depth = GaugeMetricFamily("aiorch_queue_depth", "Messages waiting per queue", labels=["queue"])
        for queue, count in queue_depths().items():
            if count is not None:
                depth.add_metric([queue], count)
        yield depth


@blp.route("/metrics")
class Metrics(MethodView):
    # Public, like /healthz (see app/auth.py), and plain text, not JSON.
    @blp.doc(
        security=[],
        responses={"200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    def get(self) -> Response:
        """Prometheus exposition"""
        registry = current_app.extensions.get("aiorch_registry")
        if registry is None:
            registry = CollectorRegistry()
            registry.register(JobCollector(current_app._get_current_object()))  # type: ignore[attr-defined]
            current_app.extensions["aiorch_registry"] = registry
        return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4")
