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

import contextlib
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

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
from sqlalchemy.orm import Session

from models import counters
from models.db import Database, UTCDateTime, on_postgres
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
from models.together import Together, insert_rows

_jobs: Table = Job.__table__  # type: ignore[assignment]
_events: Table = JobEvent.__table__  # type: ignore[assignment]
_c = _jobs.c
_NOW = bindparam("now", type_=UTCDateTime())
_ATTRIBUTES = {attr.columns[0].name: attr.key for attr in Job.__mapper__.column_attrs}
_UTC = UTCDateTime()
_TIMES = tuple(column.name for column in _c if isinstance(column.type, UTCDateTime))
# The columns only a move writes; a touch never does.
MOVE_COLUMNS = frozenset(
    {
        "status",
        "stage",
        "attempts",
        "claim_token",
        "progress",
        "progress_detail",
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
    """A detached ``Job`` from a row of all the jobs table's columns (SELECT or RETURNING), built
    without the ORM's per-attribute bookkeeping (``Job.transient``): every poll and every move
    reads one, and none is ever added to a session."""
    return job_of(row._mapping)


def job_of(row: Mapping[Any, Any]) -> Job:
    return Job.transient(**{key: row[name] for name, key in _ATTRIBUTES.items()})


def wanted_by_webhook(event: Event, job: Job) -> bool:
    """Whether the job's webhook receives ``event``: ``job.finished`` whenever the job has a
    webhook_url, ``job.started`` and ``job.progress`` only when it opted in with webhook_events."""
    if event not in WEBHOOK_EVENTS or not job.webhook_url:
        return False
    return event is Event.FINISHED or event.value in (job.webhook_events or ())


def event_row(event: Event, job: Job, now: datetime) -> dict[str, Any]:
    """The log row of a move's event (sequence number ``job.event_seq``): pending (``dispatched_at``
    NULL) only when a webhook waits for it."""
    return {
        "job_id": job.id,
        "seq": job.event_seq,
        "type": event.value,
        "created_at": now,
        "data": job_object(job, now),
        "dispatched_at": None if wanted_by_webhook(event, job) else now,
    }


# A transaction whose COMMIT does not wait for the WAL flush (the flush follows within
# ``wal_writer_delay``, and any later synchronous commit flushes it first). For writes a database
# crash may lose without harm, as a claim: its job reads queued again, the fenced finish of the
# lost claim matches nothing, and the sweep publishes the job again.
_RELAXED = "SET LOCAL synchronous_commit TO OFF"


def apply(
    session: Session,
    move: Move,
    job_id: str,
    now: datetime,
    fence: str | None = None,
    *,
    also: Sequence[tuple[Table, list[dict[str, Any]]]] = (),
    relaxed: bool = False,
    **given: Any,
) -> Moved | None:
    """Make ``move`` on the job in this transaction, with its event; None when it was refused.

    ``fence``: the caller's claim token, required by a fenced move. ``given``: the columns the
    move writes (``Move.writes``, ``Move.keeps``) and the values its effects and guards compare
    with (``new_token``, ``max_attempts``, ``seen``); anything else is a programming error.
    ``also``: rows INSERTed with the move when it is made (a run's output files). ``relaxed``: the
    transaction's COMMIT does not wait for the WAL flush once the move is made (a claim).

    On Postgres the UPDATE is one round trip and everything that goes with it (the event, the
    counters of a final move, ``also``) one more (``models.together``).
    """
    row = session.execute(STATEMENTS[move.name], _params(move, job_id, now, fence, given)).first()
    if row is None:
        return None
    moved, event = _made(move, row._mapping, now)
    if on_postgres(session):
        batch = Together(session)
        _gather(batch, moved, event, also, relaxed)
        batch.send()
    else:
        session.execute(_INSERT_EVENT, event)
        if _is_final(move):
            counters.count_final(session, moved.job)
        for table, rows in also:
            insert_rows(session, table, rows)
    return moved


def apply_alone(
    db: Database,
    move: Move,
    job_id: str,
    now: datetime,
    fence: str | None = None,
    *,
    also: Sequence[tuple[Table, list[dict[str, Any]]]] = (),
    relaxed: bool = False,
    **given: Any,
) -> Moved | None:
    """``apply`` as a unit of work of its own. On Postgres on a bare pooled cursor
    (``Database.statement``) in two round trips: ``BEGIN`` with the UPDATE, then everything that
    goes with it and ``COMMIT``. Through a session the same unit took four (``BEGIN``, the UPDATE,
    the event, ``COMMIT``) and the session's own bookkeeping: a job's claim and its final write
    are on the path from its submit to the event that says it succeeded. Errors come out as
    SQLAlchemy's; any failure rolls the transaction back before the connection goes back to the
    pool. Elsewhere (SQLite) ``apply`` in a session of its own."""
    if not db.is_postgres:
        with db.session() as session:
            return apply(session, move, job_id, now, fence, also=also, relaxed=relaxed, **given)
    params = _params(move, job_id, now, fence, given)
    begun = _begun(move.name, db.engine.dialect)
    with db.statement() as cursor:
        try:
            found = begun.fetch(cursor, params)
            if found is None:
                cursor.execute("ROLLBACK")
                return None
            moved, event = _made(move, found, now)
            batch = Together.gathered_on(cursor, db.engine.dialect)
            _gather(batch, moved, event, also, relaxed)
            batch.statement("COMMIT")
            batch.send()
        except BaseException:
            if not cursor.connection.closed:
                with contextlib.suppress(Exception):  # a broken connection is dropped by ``statement``
                    cursor.execute("ROLLBACK")
            raise
    return moved


def _params(
    move: Move, job_id: str, now: datetime, fence: str | None, given: dict[str, Any]
) -> dict[str, Any]:
    """The bound values of ``move``'s statement (``apply``'s arguments, checked)."""
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
    return params


def _is_final(move: Move) -> bool:
    return move.target is not None and move.target.final  # counted with the move or not at all


def _made(move: Move, row: Mapping[Any, Any], now: datetime) -> tuple[Moved, dict[str, Any]]:
    """The move made, from its RETURNING row, and its event's row."""
    job = job_of(row)
    event = event_row(move.event, job, now)
    notify = event["dispatched_at"] is None
    return Moved(move, job, move.event, notify, bool(row.get("neighbours", False))), event


def _gather(
    batch: Together,
    moved: Moved,
    event: dict[str, Any],
    also: Sequence[tuple[Table, list[dict[str, Any]]]],
    relaxed: bool,
) -> None:
    """(Postgres) What goes with a move, gathered to be sent in one round trip."""
    if relaxed:
        batch.statement(_RELAXED)
    batch.insert(_events, [event])
    if _is_final(moved.move):
        counters.count_final(batch, moved.job)
    for table, rows in also:
        batch.insert(table, rows)


@dataclass(frozen=True)
class BareStatement:
    """(Postgres) A SQLAlchemy statement over the jobs table for a bare cursor
    (``Database.statement``): psycopg2 text, its values bound as SQLAlchemy binds them (each type's
    own processor), a row's job times read back as ``UTCDateTime`` reads them. Compiled once."""

    sql: str
    compiled: Any
    processors: Mapping[str, Any]

    @classmethod
    def compile(cls, statement: Any, dialect: Any, prefix: str = "") -> BareStatement:
        compiled = statement.compile(dialect=dialect)
        return cls(prefix + compiled.string, compiled, dict(compiled._bind_processors))

    def bind(self, params: dict[str, Any]) -> dict[str, Any]:
        values: dict[str, Any] = self.compiled.construct_params(params)
        for name, process in self.processors.items():
            values[name] = process(values[name])
        return values

    def mapping(self, names: list[str], found: Sequence[Any]) -> dict[str, Any]:
        row = dict(zip(names, found, strict=True))
        for name in _TIMES:
            row[name] = _UTC.process_result_value(row[name], None)
        return row

    def fetch(self, cursor: Any, params: dict[str, Any]) -> dict[str, Any] | None:
        """Run it on ``cursor``; its first row as a mapping (None for no row)."""
        cursor.execute(self.sql, self.bind(params))
        found = cursor.fetchone()
        return None if found is None else self.mapping([c.name for c in cursor.description], found)


@functools.cache
def _begun(name: str, dialect: Any) -> BareStatement:
    """A move's statement for ``apply_alone``: ``BEGIN; UPDATE ... RETURNING ...``."""
    return BareStatement.compile(STATEMENTS[name], dialect, "BEGIN; ")


def create(session: Session, job: Job) -> dict[str, Any]:
    """The first move: INSERT a new job at ``INITIAL`` from a transient ``Job`` (the attributes it
    was given, column defaults for the rest), without the ORM unit of work, and its ``job.queued``
    event (at ``created_at``). Returns the job object, which the caller answers with. On Postgres
    both INSERTs go in one round trip (``models.together``)."""
    row, event, body = _first_rows(job)
    if on_postgres(session):
        gathered = Together(session)
        gathered.insert(_jobs, [row])
        gathered.insert(_events, [event])
        gathered.send()
    else:
        session.execute(_INSERT_JOB, row)
        session.execute(_INSERT_EVENT, event)
    return body


def create_in(batch: Together, job: Job) -> dict[str, Any]:
    """(Postgres) ``create``'s two INSERTs, only gathered in ``batch``, for the caller to send with
    what it writes next (the submit's turn, ``models.dispatch.insert_in_turn``: the single submit
    is then one statement). Returns the job object."""
    row, event, body = _first_rows(job)
    batch.insert(_jobs, [row])
    batch.insert(_events, [event], "RETURNING id")  # w1 of ``send_within``: the event's id
    return body


def _first_rows(job: Job) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A new job's row, its ``job.queued`` event's row and its job object."""
    job.status, job.stage, job.event_seq = INITIAL.status.value, INITIAL.phase.value, 1
    state = job.__dict__
    row = {name: state[key] for name, key in _ATTRIBUTES.items() if key in state}
    body = job_object(job, job.created_at)
    return row, _queued_event(job, body), body


def _queued_event(job: Job, body: dict[str, Any]) -> dict[str, Any]:
    """The row of a new job's ``job.queued`` event (``event_row``'s, at ``created_at``)."""
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
