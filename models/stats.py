"""Aggregates for operators: a client's overview (``/stats``; every client's, by client, for an
admin key) and the platform's Prometheus figures (``/metrics``).

``/metrics`` reads the counters that the moves themselves keep (``models.counters``: one row per
series, so a scrape costs the same at a million jobs as at ten, and deleting jobs lowers no
counter) and counts only the jobs queued or running now, through the status index. Every API
process and worker agrees without multiprocess bookkeeping: the figures live in the database.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import ColumnElement, func, select, true

from models import counters
from models.db import Database
from models.jobs import Job
from models.state import JobStatus

RECENT_JOBS = 20
LIVE_STATUSES = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


@dataclass(frozen=True)
class ClientOverview:
    """A client's latest jobs (newest first) and how many of its jobs are in each status and task;
    for every client (an admin's overview), also how many jobs each client has."""

    recent: list[Job]
    by_status: dict[str, int]
    by_task: dict[str, int]
    by_client: dict[str, int] | None = None  # only in the overview of every client


def client_overview(db: Database, client_id: str | None, recent: int = RECENT_JOBS) -> ClientOverview:
    """The overview of ``client_id``'s jobs, or of every client's for None."""
    mine: ColumnElement[bool] = true() if client_id is None else Job.client_id == client_id
    with db.session() as session:
        rows = list(session.scalars(select(Job).where(mine).order_by(Job.created_at.desc()).limit(recent)))
        by_status = session.execute(select(Job.status, func.count()).where(mine).group_by(Job.status))
        by_task = session.execute(select(Job.task, func.count()).where(mine).group_by(Job.task))
        by_client = None
        if client_id is None:
            counted = session.execute(select(Job.client_id, func.count()).group_by(Job.client_id))
            by_client = {client: count for client, count in counted}
        return ClientOverview(
            recent=rows,
            by_status={status: count for status, count in by_status},
            by_task={task: count for task, count in by_task},
            by_client=by_client,
        )


@dataclass(frozen=True)
class Histogram:
    """One task's observations: how many, their sum, and how many were at most each bound."""

    task: str
    count: int
    total: float
    at_most: list[int]  # one per bound of ``counters.BOUNDS``, in order (cumulative)


@dataclass(frozen=True)
class JobMetrics:
    """Everything ``/metrics`` reports from the database, read in one session."""

    live: list[tuple[str, str, int]]  # (engine task, status, jobs) queued or running now
    finished: list[tuple[str, str, int]]  # (engine task, final status, jobs ended since the start)
    durations: list[Histogram]  # run time (started -> finished) of the jobs that ran
    predict_times: list[Histogram]  # the estimate made at queueing, of the same jobs
    webhook_attempts: dict[str, int]  # "success" / "failure" -> attempts


# Few rows whatever the history: the status index finds the live jobs, the final ones are skipped.
_LIVE = (
    select(Job.engine_task, Job.status, func.count())
    .where(Job.status.in_(LIVE_STATUSES))
    .group_by(Job.engine_task, Job.status)
)


def job_metrics(db: Database) -> JobMetrics:
    """The figures behind ``/metrics``: the live jobs' gauge and the counters, one row per series."""
    with db.session() as session:
        live = [(task, status, int(count)) for task, status, count in session.execute(_LIVE)]
        stored = counters.read(session)
    finished: list[tuple[str, str, int]] = []
    attempts: dict[str, int] = {}
    buckets: dict[str, dict[str, list[counters.Series]]] = {
        name: defaultdict(list) for name in counters.HISTOGRAMS
    }
    for series in stored:
        if series.metric == counters.JOBS_FINISHED:
            finished.append((series.task, series.label, series.value))
        elif series.metric == counters.WEBHOOK_ATTEMPTS:
            attempts[series.label] = series.value
        elif series.metric in buckets:
            buckets[series.metric][series.task].append(series)
    return JobMetrics(
        live=sorted(live),
        finished=sorted(finished),
        durations=_histograms(buckets[counters.DURATION]),
        predict_times=_histograms(buckets[counters.PREDICT_TIME]),
        webhook_attempts=attempts,
    )


def _histograms(by_task: dict[str, list[counters.Series]]) -> list[Histogram]:
    """Per task, the bucket rows (each holding only its own observations) made cumulative."""
    histograms = []
    for task, rows in sorted(by_task.items()):
        uppers = [(float(row.label), row.value) for row in rows]  # float("+Inf") is infinity
        at_most = [sum(n for upper, n in uppers if upper <= bound) for bound in counters.BOUNDS]
        histograms.append(
            Histogram(task, sum(row.value for row in rows), sum(row.total for row in rows), at_most)
        )
    return histograms
