"""The job event log read by live streams (``GET /v1/jobs/{id}/events``, ``GET /v1/events``) and by
the API's waiters, and the wake-up that tells them to read it.

Wake-up: on Postgres every INSERT into ``job_events`` NOTIFYs the ids of the jobs it logged, each
on its job's channel (``channel_of``: one of 16, so a listener hears only the jobs it watches and
a few of their neighbours; a statement trigger, migrations 0009 and 0014: one notification per
statement, channel and 200 jobs, so a move sends one), delivered on COMMIT, so a listener never
reads an event before it is visible. A job's first event (``job.queued``, in the statement that
creates it) is announced to nobody: nothing can follow a job before it exists. On SQLite (the
embedded default) there is no NOTIFY: the listener reads the log's tail (``tail``) instead; SQLite
has one writer at a time, so ids commit in order and nothing is skipped.

Event ids: every event's ``id`` is the log's global, increasing id, so one job's events have
increasing ids (a move commits before the next one starts: both take the job's row lock) and a
stream over many jobs can resume from one number.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Table, bindparam, func, select, text
from sqlalchemy.orm import Session

from models.db import Database
from models.jobs import Job, JobEvent
from models.public import job_object

EVENT_CHANNEL = "aiorch_job_event"  # the channels' common prefix


def channel_of(job_id: str) -> str:
    """The channel a job's events are announced on: the prefix and the first hex digit of the md5
    of its id, as the trigger of migration 0014 chooses it."""
    return f"{EVENT_CHANNEL}_{hashlib.md5(job_id.encode(), usedforsecurity=False).hexdigest()[0]}"


def by_channel(job_ids: Iterable[str]) -> dict[str, list[str]]:
    """Job ids grouped by the channel each is announced on (``channel_of``)."""
    grouped: dict[str, list[str]] = {}
    for job_id in job_ids:
        grouped.setdefault(channel_of(job_id), []).append(job_id)
    return grouped


Logged = tuple[int, str, dict[str, Any]]  # (event id, job id, the job object after the event)

_events: Table = JobEvent.__table__  # type: ignore[assignment]
_jobs: Table = Job.__table__  # type: ignore[assignment]
_e = _events.c
_j = _jobs.c

_AFTER = (
    select(_e.id, _e.job_id, _e.data)
    .where(_e.job_id.in_(bindparam("ids", expanding=True)), _e.id > bindparam("after"))
    .order_by(_e.id)
)
_LATEST = (
    select(_e.id, _e.job_id, _e.data)
    .where(
        _e.id.in_(
            select(func.max(_e.id)).where(_e.job_id.in_(bindparam("ids", expanding=True))).group_by(_e.job_id)
        )
    )
    .order_by(_e.id)
)
_TAIL = select(_e.id, _e.job_id).where(_e.id > bindparam("after")).order_by(_e.id).limit(5000)
_LAST_ID = select(func.max(_e.id))
_OWNED = select(_j.id).where(_j.id.in_(bindparam("ids", expanding=True)), _j.client_id == bindparam("client"))
_ANY = select(_j.id).where(_j.id.in_(bindparam("ids", expanding=True)))
_IN_BATCH = select(_j.id).where(_j.batch_id == bindparam("batch")).order_by(_j.created_at, _j.id)


# The same two reads as plain SQL, for a bare cursor (``read_after``, ``read_latest``).
_AFTER_SQL = "SELECT id, job_id, data FROM job_events WHERE job_id = ANY(%s) AND id > %s ORDER BY id"
_LATEST_SQL = (
    "SELECT id, job_id, data FROM job_events WHERE id IN "
    "(SELECT max(id) FROM job_events WHERE job_id = ANY(%s) GROUP BY job_id) ORDER BY id"
)


def read_after(db: Database, job_ids: Iterable[str], after: int) -> list[Logged]:
    """``events_after`` as a unit of work of its own: on Postgres one statement on a bare pooled
    cursor (``Database.statement``: a stream hub reads the log on every wake-up, and a session
    around the statement cost it more than the statement), elsewhere in a reading session."""
    ids = list(job_ids)
    if not ids:
        return []
    if not db.is_postgres:
        with db.reading() as session:
            return events_after(session, ids, after)
    with db.statement() as cursor:
        cursor.execute(_AFTER_SQL, (ids, after))
        return [(row[0], row[1], row[2]) for row in cursor.fetchall()]


def read_latest(db: Database, job_ids: Iterable[str]) -> list[Logged]:
    """``latest`` as a unit of work of its own, as ``read_after`` reads (a job whose log was
    pruned: its row, read in a session)."""
    ids = list(job_ids)
    if not ids:
        return []
    if not db.is_postgres:
        with db.reading() as session:
            return latest(session, ids)
    with db.statement() as cursor:
        cursor.execute(_LATEST_SQL, (ids,))
        found: list[Logged] = [(row[0], row[1], row[2]) for row in cursor.fetchall()]
    if len(found) == len(ids):
        return found
    logged = {job_id for _, job_id, _ in found}
    with db.reading() as session:
        return _rows_of(session, [job_id for job_id in ids if job_id not in logged]) + found


_OPENING_SQL = (
    "SELECT j.client_id, e.id, e.data FROM jobs j LEFT JOIN LATERAL (SELECT id, data FROM job_events "
    "WHERE job_id = j.id ORDER BY seq DESC LIMIT 1) AS e ON true WHERE j.id = %s"
)


def read_opening(db: Database, job_id: str) -> tuple[str, Logged | None] | None:
    """A stream's first read of one job, as a unit of work of its own: the job's client (for the
    caller's check) and its newest event (None where its log was pruned); None: no such job. On
    Postgres one statement on a bare pooled cursor, where the check and the log's read were two
    (a queued job's place is the stream hub's to add: it keeps places a while, so a thousand
    streams opened on one job deep in a backlog count its place once)."""
    if not db.is_postgres:
        with db.reading() as session:
            owner = session.execute(select(_j.client_id).where(_j.id == job_id)).scalar()
            found = [row for row in latest(session, [job_id]) if row[0]] if owner is not None else []
        return None if owner is None else (owner, found[0] if found else None)
    with db.statement() as cursor:
        cursor.execute(_OPENING_SQL, (job_id,))
        row = cursor.fetchone()
    if row is None:
        return None
    return str(row[0]), None if row[1] is None else (int(row[1]), job_id, row[2])


def events_after(session: Session, job_ids: Iterable[str], after: int) -> list[Logged]:
    """``(id, job_id, job object)`` of the jobs' events with an id above ``after``, in id order."""
    ids = list(job_ids)
    if not ids:
        return []
    return [(row[0], row[1], row[2]) for row in session.execute(_AFTER, {"ids": ids, "after": after})]


def latest(session: Session, job_ids: Iterable[str]) -> list[Logged]:
    """Each job's newest event (its current public object), in id order; a job whose log was
    pruned long ago comes first, as its row's object with id 0."""
    ids = list(job_ids)
    if not ids:
        return []
    found = [(row[0], row[1], row[2]) for row in session.execute(_LATEST, {"ids": ids})]
    logged = {job_id for _, job_id, _ in found}
    missing = [job_id for job_id in ids if job_id not in logged]
    if not missing:
        return found
    return _rows_of(session, missing) + found


def _rows_of(session: Session, job_ids: list[str]) -> list[Logged]:
    """Jobs with no event left in the log, each as its row's object with id 0."""
    jobs = session.execute(select(Job).where(_j.id.in_(job_ids))).scalars()
    return [(0, job.id, job_object(job)) for job in jobs]


def tail(session: Session, after: int) -> list[tuple[int, str]]:
    """``(id, job_id)`` of the log after ``after``: the embedded default's wake-up, read by id."""
    return [(row[0], row[1]) for row in session.execute(_TAIL, {"after": after})]


def last_id(session: Session) -> int:
    """The newest event id (0 for an empty log): where a tail reader starts."""
    return int(session.execute(_LAST_ID).scalar() or 0)


def visible_jobs(session: Session, job_ids: list[str], client_id: str | None) -> set[str]:
    """Which of ``job_ids`` exist and belong to ``client_id`` (any client's when None: an admin)."""
    if not job_ids:
        return set()
    if client_id is None:
        return {row[0] for row in session.execute(_ANY, {"ids": job_ids})}
    return {row[0] for row in session.execute(_OWNED, {"ids": job_ids, "client": client_id})}


def batch_jobs(session: Session, client_id: str | None, batch_id: str) -> list[str]:
    """The ids of a client's jobs in ``batch_id`` (any client's for None: an admin), oldest first."""
    query = _IN_BATCH if client_id is None else _IN_BATCH.where(_j.client_id == client_id)
    return [row[0] for row in session.execute(query, {"batch": batch_id})]


def announce(session: Session, job_ids: Iterable[str]) -> None:
    """Wake the listeners of jobs that changed without logging an event (deleted): the trigger
    of ``job_events`` announces every other change. Delivered on COMMIT; SQLite has no NOTIFY."""
    if session.get_bind().dialect.name != "postgresql":
        return
    for channel, ids in by_channel(job_ids).items():
        for start in range(0, len(ids), 200):
            session.execute(
                text("SELECT pg_notify(:channel, :ids)"),
                {"channel": channel, "ids": ",".join(ids[start : start + 200])},
            )


def queued_rows(session: Session, job_ids: Iterable[str]) -> list[Job]:
    """The rows of those of ``job_ids`` that are queued now."""
    ids = list(job_ids)
    if not ids:
        return []
    return list(session.scalars(select(Job).where(_j.id.in_(ids), _j.status == "queued")))
