"""The lifecycle table (``models.state.MOVES``) compiled into SQL: the only writer of a job's state.

Each move becomes, once at import, one prebuilt conditional statement::

    UPDATE jobs SET <target status and stage>, <the caller's columns>, <effects>,
                    updated_at = :now, event_seq = event_seq + 1
     WHERE id = :job_id AND (status, stage) IN (<sources>)
       [AND claim_token = :fence] [AND <guards>]
    RETURNING *

``apply`` runs it and, in the same transaction, INSERTs the move's event into the job's log
(``job_events``: the job's next sequence number, the event type, and the public job object after
the move, built from the RETURNING row rather than a second SELECT). A move whose source state,
claim token or guard does not match the row changes nothing: it is refused (``apply`` returns
None). ``create`` is the first move, the API's INSERT with its ``job.queued`` event.

An event a webhook wants is written *pending* (``dispatched_at`` NULL). The caller's ``on_notify``
hook (``models.jobstore.JobStore``) kicks the dispatcher on the cpu queue right after the commit,
and the periodic sweep dispatches whatever a crash between the commit and that kick left behind
(``models.outbox``). Every other event is written already dispatched: nothing waits on it, and its
readers (streams, blocking requests) read the log itself, woken by the NOTIFY that the log's
trigger sends on COMMIT (``models.feed``). A move that ends a job also adds it to the ``/metrics``
counters (``models.counters``) in the same transaction.

``TOUCHES`` are the only other UPDATEs of the jobs table: bookkeeping no one needs to hear of (a
heartbeat, the next poll's time, a poll lease, the recorded inputs, a re-dispatch). A touch never
writes a column that only moves write (``MOVE_COLUMNS``); a test holds it to that.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg2.extras
from sqlalchemy import (
    Integer,
    String,
    Table,
    bindparam,
    func,
    insert,
    literal,
    or_,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models import counters
from models.db import UTCDateTime
from models.jobs import Job, JobEvent
from models.public import job_object
from models.state import (
    INITIAL,
    MOVES,
    WEBHOOK_EVENTS,
    Effect,
    Event,
    Guard,
    IllegalTransition,
    JobStatus,
    Move,
)

_jobs: Table = Job.__table__  # type: ignore[assignment]
_events: Table = JobEvent.__table__  # type: ignore[assignment]
_c = _jobs.c
_NOW = bindparam("now", type_=UTCDateTime())
_ATTRIBUTES = {attr.columns[0].name: attr.key for attr in Job.__mapper__.column_attrs}
# The columns only a move writes; a touch never does.
MOVE_COLUMNS = frozenset(
    {
        "status",
        "stage",
        "attempts",
        "claim_token",
        "progress",
        "result",
        "error",
        "cancel_requested",
        "event_seq",
    }
)

_other = _jobs.alias("neighbour")
# Whether other jobs of the same task wait on the same queue: a claim returns it, so a batching
# engine looks for partners only when there are any.
_NEIGHBOURS = (
    select(literal(1))
    .where(
        _other.c.status == JobStatus.QUEUED.value,
        _other.c.engine_task == _c.engine_task,
        _other.c.queue == _c.queue,
        _other.c.id != _c.id,
    )
    .correlate(_jobs)
    .exists()
    .label("neighbours")
)
_EFFECTS: dict[Effect, dict[str, Any]] = {
    Effect.CLAIM: {
        "attempts": _c.attempts + 1,
        "claim_token": bindparam("new_token", type_=String()),
        "started_at": _NOW,
    },
    Effect.END: {"finished_at": _NOW},
    Effect.COMPLETE: {"progress": 100},
    Effect.FLAG_CANCEL: {"cancel_requested": true()},
}
_GUARDS: dict[Guard, Any] = {
    Guard.NOT_CANCELLING: _c.cancel_requested.is_(False),
    Guard.UNDER_LIMIT: _c.attempts < bindparam("max_attempts", type_=Integer()),
    Guard.AT_LIMIT: _c.attempts >= bindparam("max_attempts", type_=Integer()),
    Guard.CANCELLING: _c.cancel_requested.is_(True),
    Guard.UNCHANGED: _c.updated_at <= bindparam("seen", type_=UTCDateTime()),
}
# What a caller passes for an effect or a guard, besides the columns the move writes.
_PARAMS: dict[Effect | Guard, str] = {
    Effect.CLAIM: "new_token",
    Guard.UNDER_LIMIT: "max_attempts",
    Guard.AT_LIMIT: "max_attempts",
    Guard.UNCHANGED: "seen",
}


def _compile(move: Move) -> Any:
    values: dict[str, Any] = {}
    if move.target is not None:
        values["status"] = move.target.status.value
        values["stage"] = move.target.phase.value
    for name in move.writes:
        values[name] = bindparam(f"v_{name}", type_=_c[name].type)
    for name in move.keeps:
        values[name] = func.coalesce(bindparam(f"v_{name}", type_=_c[name].type), _c[name])
    for effect in sorted(move.effects):
        values.update(_EFFECTS[effect])
    values["updated_at"] = _NOW
    values["event_seq"] = _c.event_seq + 1
    sources = sorted((s.status.value, s.phase.value) for s in move.sources)
    where = [
        _c.id == bindparam("job_id"),
        tuple_(_c.status, _c.stage).in_(
            [tuple_(literal(status), literal(stage)) for status, stage in sources]
        ),
    ]
    if move.fenced:
        where.append(_c.claim_token == bindparam("fence", type_=String()))
    where.extend(_GUARDS[guard] for guard in sorted(move.guards))
    returning = [*_c, _NEIGHBOURS] if Effect.CLAIM in move.effects else list(_c)
    return update(_jobs).where(*where).values(values).returning(*returning)


# Built once: a job's hot path (claim, progress, finish) runs these, and building a statement
# costs more than running it on a local Postgres.
STATEMENTS: dict[str, Any] = {name: _compile(move) for name, move in MOVES.items()}


def _accepts(move: Move) -> frozenset[str]:
    parts: list[Effect | Guard] = [*move.effects, *move.guards]
    extra = (_PARAMS[part] for part in parts if part in _PARAMS)
    return frozenset({*move.writes, *move.keeps, *extra})


_ACCEPTS = {name: _accepts(move) for name, move in MOVES.items()}
_INSERT_JOB = insert(_jobs)
_INSERT_EVENT = insert(_events)


@dataclass(frozen=True)
class Moved:
    """A move that happened: the job as it is after it, and its event."""

    move: Move
    job: Job
    event: Event
    # The event waits for the dispatcher: a webhook wants it.
    notify: bool
    # (claims) other jobs of the same task wait on the same queue
    neighbours: bool = False

    @property
    def seq(self) -> int:
        return self.job.event_seq


def job_from(row: Any) -> Job:
    """A detached ``Job`` from a row of all the jobs table's columns (SELECT or RETURNING)."""
    mapping = row._mapping
    return Job(**{key: mapping[name] for name, key in _ATTRIBUTES.items()})


def wanted_by_webhook(event: Event, job: Job) -> bool:
    """Whether the job's webhook receives ``event``: ``job.finished`` whenever the job has a
    webhook_url, ``job.started`` and ``job.progress`` only when it opted in with webhook_events."""
    if event not in WEBHOOK_EVENTS or not job.webhook_url:
        return False
    return event is Event.FINISHED or event.value in (job.webhook_events or ())


def record(
    session: Session, event: Event, job: Job, now: datetime, body: dict[str, Any] | None = None
) -> bool:
    """INSERT the event of a move into the job's log (sequence number ``job.event_seq``); returns
    whether it waits for the dispatcher."""
    notify = wanted_by_webhook(event, job)
    session.execute(
        _INSERT_EVENT,
        {
            "job_id": job.id,
            "seq": job.event_seq,
            "type": event.value,
            "created_at": now,
            "data": job_object(job, now) if body is None else body,
            "dispatched_at": None if notify else now,
        },
    )
    return notify


def apply(
    session: Session, move: Move, job_id: str, now: datetime, fence: str | None = None, **given: Any
) -> Moved | None:
    """Make ``move`` on the job in this transaction, with its event; None when it was refused.

    ``fence``: the caller's claim token, required by a fenced move. ``given``: the columns the
    move writes (``Move.writes``, ``Move.keeps``) and the values its effects and guards compare
    with (``new_token``, ``max_attempts``, ``seen``); anything else is a programming error.
    """
    params: dict[str, Any] = {"job_id": job_id, "now": now}
    if move.fenced:
        if fence is None:
            raise IllegalTransition(move.name, "a job whose claim the caller does not hold")
        params["fence"] = fence
    columns = {*move.writes, *move.keeps}
    for name, value in given.items():
        if name not in _ACCEPTS[move.name]:
            raise TypeError(f"move {move.name} takes no {name!r}")
        params[f"v_{name}" if name in columns else name] = value
    row = session.execute(STATEMENTS[move.name], params).first()
    if row is None:
        return None
    job = job_from(row)
    notify = record(session, move.event, job, now)
    if move.target is not None and move.target.final:
        counters.count_final(session, job)  # the /metrics counters, with the move or not at all
    return Moved(move, job, move.event, notify, bool(row._mapping.get("neighbours", False)))


def create(session: Session, job: Job) -> dict[str, Any]:
    """The first move: INSERT a new job at ``INITIAL`` from a transient ``Job`` (the attributes it
    was given, column defaults for the rest), without the ORM unit of work, and its ``job.queued``
    event (at ``created_at``). Returns the job object, which the caller answers with.

    On Postgres both INSERTs go in one round trip (``insert_together``): the single submit waits
    on the database twice (these and COMMIT) instead of three times."""
    job.status, job.stage, job.event_seq = INITIAL.status.value, INITIAL.phase.value, 1
    state = job.__dict__
    row = {name: state[key] for name, key in _ATTRIBUTES.items() if key in state}
    body = job_object(job, job.created_at)
    event = _queued_event(job, body)
    if session.get_bind().dialect.name == "postgresql":
        insert_together(session, [(_jobs, [row]), (_events, [event])])
    else:
        session.execute(_INSERT_JOB, row)
        session.execute(_INSERT_EVENT, event)
    return body


def _queued_event(job: Job, body: dict[str, Any]) -> dict[str, Any]:
    """The row of a new job's ``job.queued`` event (``record``'s, without a statement of its own)."""
    return {
        "job_id": job.id,
        "seq": 1,
        "type": Event.QUEUED.value,
        "created_at": job.created_at,
        "data": body,
        # As in ``record``: nothing waits on a job.queued event unless a webhook wants it.
        "dispatched_at": None if wanted_by_webhook(Event.QUEUED, job) else job.created_at,
    }


def create_many(session: Session, jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """``create`` for many jobs at once (``POST /v1/jobs/batch``): one multi-row INSERT of the jobs
    and one of their ``job.queued`` events, in the caller's transaction. The jobs must have been
    given the same attributes (one statement, one column list). Returns their job objects, in order."""
    if not jobs:
        return []
    for job in jobs:
        job.status, job.stage, job.event_seq = INITIAL.status.value, INITIAL.phase.value, 1
    given = [(name, key) for name, key in _ATTRIBUTES.items() if key in jobs[0].__dict__]
    rows: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    bodies: list[dict[str, Any]] = []
    for job in jobs:
        state = job.__dict__
        rows.append({name: state[key] for name, key in given})
        body = job_object(job, job.created_at)
        bodies.append(body)
        events.append(_queued_event(job, body))
    insert_rows(session, _jobs, rows)
    insert_rows(session, _events, events)
    return bodies


def insert_rows(session: Session, table: Table, rows: list[dict[str, Any]]) -> None:
    """One multi-row write of ``rows`` (the same keys in each) in the session's transaction.

    On Postgres through ``COPY ... FROM STDIN`` (text format), each value bound by its column
    type's own processor first (JSON serialized, UTC times checked), as SQLAlchemy binds: a batch
    of 500 jobs spent a third of its INSERT in SQLAlchemy's executemany machinery, and then most of
    the rest quoting each value into a 500-row ``VALUES`` list (psycopg2's ``mogrify``) for the
    server to parse again; COPY sends the values as they are. A value of a type COPY's text form is
    not written for here falls back to one multi-row INSERT (``execute_values``). A unique
    violation is raised as SQLAlchemy's ``IntegrityError``, as ``session.execute`` would raise it.
    Elsewhere (SQLite) through SQLAlchemy's own executemany."""
    if not rows:
        return
    dialect = session.get_bind().dialect
    if dialect.name != "postgresql":
        session.execute(insert(table), rows)
        return
    columns, values = _bound(table, rows, dialect)
    cursor = session.connection().connection.cursor()
    try:
        text_rows = _copy_text(values)
        if text_rows is None:
            statement = f'INSERT INTO "{table.name}" ({columns}) VALUES %s'
            psycopg2.extras.execute_values(cursor, statement, values, page_size=len(values))
        else:
            statement = f'COPY "{table.name}" ({columns}) FROM STDIN'
            cursor.copy_expert(statement, io.StringIO(text_rows))
    except psycopg2.IntegrityError as exc:
        raise IntegrityError(statement, None, exc) from exc
    finally:
        cursor.close()


def _bound(table: Table, rows: list[dict[str, Any]], dialect: Any) -> tuple[str, list[tuple[Any, ...]]]:
    """The column list of ``rows`` and their values, each bound by its column type's own
    processor (JSON serialized, UTC times checked), as SQLAlchemy binds them."""
    names = list(rows[0])
    processors = [(name, table.c[name].type.bind_processor(dialect)) for name in names]
    values = [
        tuple(row[name] if process is None else process(row[name]) for name, process in processors)
        for row in rows
    ]
    return ", ".join(f'"{name}"' for name in names), values


def insert_together(session: Session, writes: Sequence[tuple[Table, list[dict[str, Any]]]]) -> None:
    """(Postgres) One multi-row INSERT per ``(table, rows)``, all sent in one round trip, in the
    session's transaction; a unique violation is raised as SQLAlchemy's ``IntegrityError``."""
    dialect = session.get_bind().dialect
    cursor = session.connection().connection.cursor()
    statement = b""
    try:
        parts = []
        for table, rows in writes:
            columns, values = _bound(table, rows, dialect)
            row_sql = "(" + ", ".join(["%s"] * len(values[0])) + ")"
            head = f'INSERT INTO "{table.name}" ({columns}) VALUES '.encode()
            parts.append(head + b", ".join(cursor.mogrify(row_sql, v) for v in values))
        statement = b";\n".join(parts)
        cursor.execute(statement)  # no parameters: nothing in it is read as a placeholder
    except psycopg2.IntegrityError as exc:
        raise IntegrityError(statement.decode(errors="replace"), None, exc) from exc
    finally:
        cursor.close()


# COPY's text format: a backslash, a newline, a carriage return and a tab are escaped.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _copy_value(value: Any) -> str | None:
    if value is None:
        return "\\N"
    kind = type(value)
    if kind is str:
        return value.translate(_COPY_ESCAPES)  # type: ignore[no-any-return]
    if kind is bool:
        return "t" if value else "f"
    if kind is int or kind is float:
        return repr(value)
    if kind is datetime and value.tzinfo is not None:
        return value.isoformat()  # type: ignore[no-any-return]
    return None  # anything else: not written by hand


def _copy_text(values: list[tuple[Any, ...]]) -> str | None:
    """``values`` as COPY text rows, or None when one of them is of a type not handled here."""
    lines = []
    for row in values:
        fields = [_copy_value(value) for value in row]
        if None in fields:
            return None
        lines.append("\t".join(fields))  # type: ignore[arg-type]
    lines.append("")
    return "\n".join(lines)


# -- touches ----------------------------------------------------------------------------------------


def _touch(*conditions: Any, fenced: bool = True, running: bool = True, **values: Any) -> Any:
    where = [_c.id == bindparam("job_id"), *conditions]
    if fenced:
        where.append(_c.claim_token == bindparam("fence", type_=String()))
    if running:
        where.append(_c.status == JobStatus.RUNNING.value)
    return update(_jobs).where(*where).values(values)


_DUE = or_(_c.next_poll_at.is_(None), _c.next_poll_at <= bindparam("due_by", type_=UTCDateTime()))
_WHEN = bindparam("when", type_=UTCDateTime())
TOUCHES: dict[str, Any] = {
    # A live claim's sign of life (the sweep measures silence from updated_at); returns whether
    # the job was asked to stop.
    "heartbeat": _touch(updated_at=_NOW).returning(_c.cancel_requested),
    # When a remote job is next due to be polled.
    "next_poll": _touch(running=False, next_poll_at=_WHEN, updated_at=_NOW),
    # A poll task takes a due neighbour into its batch for a while.
    "lease": _touch(_DUE, _c.cancel_requested.is_(False), next_poll_at=_WHEN, updated_at=_NOW),
    # Inputs recorded by the claim holder (public copies made for a provider).
    "inputs": _touch(running=False, inputs=bindparam("inputs", type_=_c.inputs.type), updated_at=_NOW),
    # A queued job's message was published again.
    "dispatched": _touch(fenced=False, running=False, dispatched_at=_NOW),
}


def touch(
    session: Session, name: str, job_id: str, now: datetime, fence: str | None = None, **params: Any
) -> Any:
    """Run one touch; returns its result (``rowcount``, or the RETURNING row of a heartbeat)."""
    return session.execute(TOUCHES[name], {"job_id": job_id, "now": now, "fence": fence, **params})
