"""Aggregates for operators: a client's overview (``/stats``; every client's, by client, for an
admin key) and the platform's Prometheus figures (``/metrics``). Neither reads the jobs table
beyond one page of the latest jobs: both cost the same at a million jobs as at ten.

Counts by status, task and client come from ``job_status_counts`` (``models.jobs.JobStatusCount``),
which triggers on ``jobs`` keep in step with every INSERT, status change and DELETE (migration
0010, on Postgres and on SQLite alike): one row per client, task, engine task, status and shard,
summed here. ``/metrics`` reads the counters that the moves themselves keep (``models.counters``:
one row per series; deleting jobs lowers no counter) and its gauge of the jobs queued or running
now from the same status counts. Every API process and worker agrees without multiprocess
bookkeeping: the figures live in the database.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import ColumnElement, func, select, true

from models import counters
from models.db import Database
from models.jobs import Job, JobStatusCount
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


_counted = func.sum(JobStatusCount.n)
# One row per client, task and status (the shards summed); a key whose jobs all went is left out.
_COUNTS = (
    select(JobStatusCount.client_id, JobStatusCount.task, JobStatusCount.status, _counted)
    .group_by(JobStatusCount.client_id, JobStatusCount.task, JobStatusCount.status)
    .having(_counted != 0)
)


def client_overview(db: Database, client_id: str | None, recent: int = RECENT_JOBS) -> ClientOverview:
    """The overview of ``client_id``'s jobs, or of every client's for None: the latest jobs through
    the (client, created) or (created, id) index, the counts from ``job_status_counts``."""
    mine: ColumnElement[bool] = true() if client_id is None else Job.client_id == client_id
    counts = _COUNTS if client_id is None else _COUNTS.where(JobStatusCount.client_id == client_id)
    with db.session() as session:
        latest = select(Job).where(mine).order_by(Job.created_at.desc(), Job.id.desc()).limit(recent)
        rows = list(session.scalars(latest))
        counted = [(client, task, status, int(n)) for client, task, status, n in session.execute(counts)]
    by_status: dict[str, int] = defaultdict(int)
    by_task: dict[str, int] = defaultdict(int)
    by_client: dict[str, int] = defaultdict(int)
    for client, task, status, n in counted:
        by_status[status] += n
        by_task[task] += n
        by_client[client] += n
    return ClientOverview(
        recent=rows,
        by_status=dict(sorted(by_status.items())),
        by_task=dict(sorted(by_task.items())),
        by_client=dict(sorted(by_client.items())) if client_id is None else None,
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
    queue_waits: list[Histogram]  # accepted -> started, of the same jobs (fair share's waits)
    webhook_attempts: dict[str, int]  # "success" / "failure" -> attempts


# The status counts of the live jobs, every client's together: as many rows whatever the history
# (and however many jobs are queued now).
_live_count = func.sum(JobStatusCount.n)
_LIVE = (
    select(JobStatusCount.engine_task, JobStatusCount.status, _live_count)
    .where(JobStatusCount.status.in_(LIVE_STATUSES))
    .group_by(JobStatusCount.engine_task, JobStatusCount.status)
    .having(_live_count != 0)
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
        queue_waits=_histograms(buckets[counters.QUEUE_WAIT]),
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
