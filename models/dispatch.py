"""Fair share: which waiting job gets a free slot of its queue, decided in Postgres.

A job for a local engine is not sent to its queue when it is accepted unless a slot is free: it
waits in the jobs table (``status = 'queued' AND dispatched_at IS NULL``). A queue has as many
slots as the workers consuming it have pool processes (``queue_slots``, written by each worker,
``tasks/slots.py``), plus ``ahead`` more so a worker never idles between two jobs. A job holds a
slot from the moment its first message is sent (its prepare or its run) until its run ends: it is
*in flight* (``models.jobs.IN_FLIGHT_SQL``). When a run ends, or a job is accepted while slots are
free, ``take_turns`` fills the free slots: each goes to the client with the fewest jobs in flight on
that queue, ties to the higher priority, then the older job, and within a client its jobs go by
priority, then age. So one client's backlog of thousands delays another client's single job by
about one job's run time, never by the backlog.

The broker still carries every job that runs, and Postgres stays the truth: a job is either
waiting here or sent. ``take_turns`` marks its picks sent (``dispatched_at``) and commits before its
caller publishes them, under a per-queue advisory lock, so two dispatchers never pick the same job
or overfill a queue; a dispatcher that dies between its commit and its publish leaves jobs marked
sent without a message, which the sweep publishes again after ``AIORCH_REPUBLISH_AFTER`` as it does
any lost message. The claim is conditional, so no job ever runs twice.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import String, Table, and_, bindparam, delete, func, select, text, update
from sqlalchemy.orm import Session

from config import Settings
from models.client_limits import running_caps
from models.db import Database, UTCDateTime, on_postgres, rowcount
from models.jobs import IN_FLIGHT_SQL, WAITING_SQL, DispatchTurn, Job, QueueSlot
from models.lifecycle import create, create_in, job_from
from models.state import JobStatus
from models.together import Together

SLOT_TTL = 90.0  # seconds a worker's slots count after it was last seen
# The submit path counts a queue's jobs in flight up to this many: it only needs to know whether
# one more fits, and jobs marked sent by something else than the dispatcher (rows another program
# wrote, jobs sent before this version) must not make every submit count all of them.
COUNT_BOUND = 1000
NEVER = datetime(1970, 1, 1, tzinfo=UTC)
_jobs: Table = Job.__table__  # type: ignore[assignment]
_slots: Table = QueueSlot.__table__  # type: ignore[assignment]
_turns: Table = DispatchTurn.__table__  # type: ignore[assignment]
_c = _jobs.c
QUEUE = bindparam("queue", type_=String())
WAITING = and_(_c.status == JobStatus.QUEUED.value, _c.dispatched_at.is_(None), _c.queue == QUEUE)
IN_FLIGHT = and_(_c.queue == QUEUE, text(f"({IN_FLIGHT_SQL})"))
_ALIVE = bindparam("alive", type_=UTCDateTime())
# A client's waiting jobs in the order they go (``ix_jobs_waiting``'s, from migration 0013).
CLIENT_ORDER = (_c.queue, _c.client_id, _c.priority.desc(), _c.created_at, _c.id)


def slots_serving(queue: Any) -> Any:
    """The pool processes of the workers seen lately that consume ``queue`` (a value or a column)."""
    return select(func.coalesce(func.sum(_slots.c.slots), 0)).where(
        _slots.c.queue == queue, _slots.c.seen_at > _ALIVE
    )


_SLOTS = slots_serving(QUEUE)
_FLYING_BY_CLIENT = select(_c.client_id, func.count()).where(IN_FLIGHT).group_by(_c.client_id)
_GRANT = (
    update(_jobs)
    .where(_c.id.in_(bindparam("ids", expanding=True)), _c.status == JobStatus.QUEUED.value)
    .where(_c.dispatched_at.is_(None))
    .values(dispatched_at=bindparam("now", type_=UTCDateTime()))
    .returning(*_jobs.c)
)

# Sent jobs whose message the broker did not take: waiting again, as if never sent.
_WITHDRAW = (
    update(_jobs)
    .where(_c.id.in_(bindparam("ids", expanding=True)), _c.status == JobStatus.QUEUED.value)
    .where(_c.dispatched_at == bindparam("sent", type_=UTCDateTime()))
    .values(dispatched_at=None)
)


@dataclass(frozen=True)
class Head:
    """A waiting job as the dispatcher orders it."""

    id: str
    client_id: str
    priority: int
    created_at: datetime

    def order(self) -> tuple[int, datetime, str]:
        return (-self.priority, self.created_at, self.id)


def alive_since(now: datetime) -> datetime:
    return now - timedelta(seconds=SLOT_TTL)


# -- slots ------------------------------------------------------------------------------------------


def register(session: Session, node: str, slots: Mapping[str, int], now: datetime) -> None:
    """A worker's slots per queue, as it starts or is still alive (replacing what it said before)."""
    session.execute(delete(_slots).where(_slots.c.node == node))
    if slots:
        session.execute(
            _slots.insert(),
            [{"node": node, "queue": q, "slots": n, "seen_at": now} for q, n in slots.items()],
        )


def forget(session: Session, node: str) -> None:
    """A worker that stops gives its slots back."""
    session.execute(delete(_slots).where(_slots.c.node == node))


def slots_of(session: Session, queue: str, now: datetime) -> int:
    """The pool processes of the workers seen lately that consume ``queue``."""
    return int(session.execute(_SLOTS, {"queue": queue, "alive": alive_since(now)}).scalar() or 0)


# The distinct queues, or one queue's distinct clients, that have jobs waiting: one probe of the
# waiting index per value found (a loose index scan). ``SELECT DISTINCT`` read every waiting row, and
# a backlog of 100,000 made each fill cost 80 ms.
# (Inside each subquery an unqualified column is the jobs row's; ``found.`` names the step before.)
_QUEUES_WAITING = text(f"""
    WITH RECURSIVE found(queue) AS (
        SELECT (SELECT queue FROM jobs WHERE {WAITING_SQL} ORDER BY queue LIMIT 1)
        UNION ALL
        SELECT (SELECT queue FROM jobs WHERE {WAITING_SQL} AND queue > found.queue ORDER BY queue LIMIT 1)
          FROM found WHERE found.queue IS NOT NULL
    )
    SELECT queue FROM found WHERE queue IS NOT NULL
""")
_CLIENTS_WAITING = text(f"""
    WITH RECURSIVE found(client_id) AS (
        SELECT (SELECT client_id FROM jobs WHERE {WAITING_SQL} AND queue = :queue
                 ORDER BY queue, client_id LIMIT 1)
        UNION ALL
        SELECT (SELECT client_id FROM jobs WHERE {WAITING_SQL} AND queue = :queue
                   AND client_id > found.client_id ORDER BY queue, client_id LIMIT 1)
          FROM found WHERE found.client_id IS NOT NULL
    )
    SELECT client_id FROM found WHERE client_id IS NOT NULL
""")


def queues_waiting(session: Session) -> list[str]:
    """The queues that have jobs waiting for a slot (the sweep dispatches each)."""
    return [row[0] for row in session.execute(_QUEUES_WAITING)]


def clients_waiting(session: Session, queue: str) -> list[str]:
    """The clients that have jobs waiting for a slot of ``queue``."""
    return [row[0] for row in session.execute(_CLIENTS_WAITING, {"queue": queue})]


def waiting_up_to(session: Session, queue: str, client: str, bound: int) -> int:
    """How many jobs ``client`` has waiting on ``queue``, counted no further than ``bound``."""
    if bound <= 0:
        return 0
    first = select(_c.id).where(WAITING, _c.client_id == client).order_by(*CLIENT_ORDER).limit(bound)
    return int(
        session.execute(select(func.count()).select_from(first.subquery()), {"queue": queue}).scalar() or 0
    )


# -- the choice -------------------------------------------------------------------------------------


def fair_order(
    heads: Mapping[str, list[Head]],
    flying: Mapping[str, int],
    take: int,
    caps: Mapping[str, int] | None = None,
    last_turns: Mapping[str, datetime] | None = None,
) -> list[Head]:
    """Up to ``take`` jobs in the order they get slots: each to the client with the fewest in
    flight (counting the ones picked before it), ties to the higher priority, then to the client
    served longest ago (``last_turns``; never served first), then the older job. ``heads``: each
    client's waiting jobs in its own order (priority, then age). ``caps``: a client's most in flight.

    Without the turn between the priority and the age, two clients' backlogs on a one-slot queue
    would not alternate: the slot frees when the job holding it ends, so both counts are 0 again
    and the older backlog would win every time."""
    caps = caps or {}
    last_turns = last_turns or {}
    counts = dict(flying)
    served = {client: (0, last_turns.get(client, NEVER)) for client in heads}
    queue: list[tuple[int, int, tuple[int, datetime], tuple[int, datetime, str], str, int]] = []

    def push(client: str, index: int) -> None:
        job = heads[client][index]
        key = (counts.get(client, 0), -job.priority, served[client], job.order(), client, index)
        heapq.heappush(queue, key)  # type: ignore[arg-type]

    for client, jobs in heads.items():
        if jobs:
            push(client, 0)
    picked: list[Head] = []
    while queue and len(picked) < take:
        count, _, _, _, client, index = heapq.heappop(queue)
        cap = caps.get(client)
        if cap is not None and count >= cap:
            continue  # at its limit: its other jobs wait for one of its own to end
        picked.append(heads[client][index])
        counts[client] = count + 1
        served[client] = (1, NEVER + timedelta(microseconds=len(picked)))  # served now, in order
        if index + 1 < len(heads[client]):
            push(client, index + 1)
    return picked


def waiting_heads(session: Session, queue: str, per_client: int) -> dict[str, list[Head]]:
    """Each client's first ``per_client`` waiting jobs on ``queue``, in its order (one index range
    per client: the clients with jobs waiting, then the head of each)."""
    heads: dict[str, list[Head]] = {}
    for client in clients_waiting(session, queue):
        rows = session.execute(
            select(_c.id, _c.client_id, _c.priority, _c.created_at)
            .where(WAITING, _c.client_id == client)
            .order_by(*CLIENT_ORDER)
            .limit(per_client),
            {"queue": queue},
        )
        heads[client] = [Head(*row) for row in rows]
    return heads


def last_turns(session: Session, queue: str) -> dict[str, datetime]:
    rows = session.execute(select(_turns.c.client_id, _turns.c.last_at).where(_turns.c.queue == queue))
    return {row[0]: row[1] for row in rows}


def _record_turns(session: Session, queue: str, picked: list[Head], now: datetime) -> None:
    """Remember when each client last got a slot (in pick order: a microsecond apart)."""
    last: dict[str, datetime] = {}
    for i, head in enumerate(picked):
        last[head.client_id] = now + timedelta(microseconds=i)
    session.execute(delete(_turns).where(_turns.c.queue == queue, _turns.c.client_id.in_(list(last))))
    session.execute(
        _turns.insert(), [{"queue": queue, "client_id": c, "last_at": at} for c, at in last.items()]
    )


# Whether anyone waits on a queue: the index's walk (``ix_jobs_waiting``), to its first entry.
_FIRST_WAITING = select(_c.id).where(WAITING).order_by(*CLIENT_ORDER).limit(1)
_WAITS_SQL = (
    f"SELECT 1 FROM jobs WHERE {WAITING_SQL} AND queue = %s"
    " ORDER BY queue, client_id, priority DESC, created_at, id LIMIT 1"
)


def anyone_waits(db: Database, queue: str) -> bool:
    """Whether a job waits for a slot of ``queue``: the look every run's end takes before filling
    its slot (``tasks.scheduling.fill_slots``), made alone. On Postgres one statement on a bare
    pooled cursor in autocommit, with no ``BEGIN``, no ``COMMIT`` and no session: at a run's end it
    shares the machine with the delivery of that run's final event. A job that starts waiting just
    after it is looked at is the submit's to hand on (``insert_in_turn`` says a dispatch is due)."""
    if not db.is_postgres:
        with db.reading() as session:
            return session.execute(_FIRST_WAITING, {"queue": queue}).first() is not None
    with db.statement() as cursor:
        cursor.execute(_WAITS_SQL, (queue,))
        return cursor.fetchone() is not None


def take_turns(
    session: Session, queue: str, now: datetime, ahead: int, limits: Settings | None = None
) -> list[Job]:
    """Fill ``queue``'s free slots with waiting jobs in fair order and mark them sent; returns the
    jobs to publish once the caller has committed (see the module's docstring). ``limits``: the
    settings whose ``max_running_per_client`` (and each client's own ``max_running``) cap how many
    jobs a client has in flight across all queues (``models.client_limits``)."""
    if session.execute(_FIRST_WAITING, {"queue": queue}).first() is None:
        return []  # nobody waits: no lock taken, nothing counted
    if on_postgres(session):
        lock = text("SELECT pg_advisory_xact_lock(hashtext(:key))")
        session.execute(lock, {"key": f"aiorch-dispatch:{queue}"})
    flying = {row[0]: int(row[1]) for row in session.execute(_FLYING_BY_CLIENT, {"queue": queue})}
    free = slots_of(session, queue, now) + ahead - sum(flying.values())
    if free <= 0:
        return []
    heads = waiting_heads(session, queue, free)
    caps = None if limits is None else running_caps(session, queue, list(heads), limits)
    picked = fair_order(heads, flying, free, caps, last_turns(session, queue))
    if not picked:
        return []
    rows = session.execute(_GRANT, {"ids": [head.id for head in picked], "now": now})
    granted = {row.id: job_from(row) for row in rows}
    _record_turns(session, queue, [head for head in picked if head.id in granted], now)
    return [granted[head.id] for head in picked if head.id in granted]


# A submit's turn on Postgres, decided in the statement that INSERTs the job (``insert_in_turn``):
# the row is written already sent or not, with no second version of it. Each look-up is ordered
# like the partial index it should walk and limited: with statistics that lag a burst of inserts,
# the planner would otherwise scan the whole table. psycopg2's ``%(name)s`` placeholders.
# The jobs in flight are counted only as far as the decision needs (up to the queue's capacity, up
# to the client's cap): a backlog of thousands sent costs a submit no more than an idle queue.
_TURN = f"""
    SELECT capacity.n - (SELECT count(*) FROM (
                SELECT 1 FROM jobs f WHERE f.queue = %(queue)s AND ({IN_FLIGHT_SQL})
                 ORDER BY f.queue, f.client_id LIMIT capacity.n) AS flying) AS free,
           (SELECT w.id FROM jobs w WHERE w.status = 'queued' AND w.dispatched_at IS NULL
               AND w.queue = %(queue)s
             ORDER BY w.queue, w.client_id, w.priority DESC, w.created_at, w.id
             LIMIT 1) IS NOT NULL AS others,
           (%(cap)s > 0 AND (SELECT count(*) FROM (
                SELECT 1 FROM jobs m WHERE m.client_id = %(client)s AND ({IN_FLIGHT_SQL})
                 LIMIT %(cap)s) AS mine) >= %(cap)s) AS capped,
           CAST(%(now)s AS timestamptz) AS now
      FROM (SELECT greatest(0, %(ahead)s + (SELECT coalesce(sum(s.slots), 0) FROM queue_slots s
                                             WHERE s.queue = %(queue)s AND s.seen_at > %(alive)s)) AS n
           ) AS capacity
"""
_GOES = "turn.free > 0 AND NOT turn.others AND NOT turn.capped"
_SENT_IF_GOES = f"(SELECT CASE WHEN {_GOES} THEN turn.now END FROM turn)"
# w1: the new job's event, as ``lifecycle.create_in`` gathers it (its id, for a stream's first word).
_TURN_ANSWER = (
    f"SELECT {_GOES} AS granted, turn.free, turn.others, turn.capped,"
    " (SELECT id FROM w1) AS event_id FROM turn"
)


def insert_in_turn(
    db: Database, job: Job, now: datetime, ahead: int, max_running: int = 0
) -> tuple[dict[str, Any], bool, bool, int | None]:
    """A submit's write: INSERT the new job (``lifecycle.create``) and give it its own turn
    (``grant_new``'s rules), as a unit of work of its own. Returns ``(job object, granted, a
    dispatch is due, the id of its first event)`` (that id on Postgres only).

    On Postgres one statement does both, on a bare cursor in autocommit (``Database.statement``):
    the turn is decided in a common table expression and the job's row is written with
    ``dispatched_at`` set or not by it, with its event, in one round trip. Elsewhere the INSERT,
    then ``grant_new``, in one transaction."""
    if not db.is_postgres:
        with db.writing() as session:
            body = create(session, job)
            return (body, *grant_new(session, job, now, ahead, max_running), None)
    params = {"queue": job.queue, "alive": alive_since(now), "ahead": ahead, "cap": max_running}
    params.update(client=job.client_id, now=now)
    with db.statement() as cursor:
        computed = {"jobs": {"dispatched_at": _SENT_IF_GOES}}
        batch = Together.on_cursor(cursor, db.engine.dialect, computed)
        body = create_in(batch, job)
        row = batch.send_within("turn", _TURN, params, _TURN_ANSWER)
    assert row is not None  # one row, always
    due = bool(row["free"] > 0 and row["others"] and not row["capped"])
    return body, bool(row["granted"]), due, int(row["event_id"])


def grant_new(
    session: Session, job: Job, now: datetime, ahead: int, max_running: int = 0
) -> tuple[bool, bool]:
    """The turn of a job already inserted, in its transaction: it is sent at once when its queue
    has a free slot, nobody else waits for one and its client is under its ``max_running`` (0: no
    limit). Returns ``(granted, a dispatch is due)``: a job left waiting while slots are free
    (others waited too) needs a dispatcher to run. (A submit on Postgres decides it in its INSERT:
    ``insert_in_turn``.)"""
    job_id, queue = job.id, job.queue
    params = {"queue": queue, "alive": alive_since(now)}
    flying = select(_c.id).where(IN_FLIGHT).limit(COUNT_BOUND).subquery()
    free = (
        slots_of(session, queue, now)
        + ahead
        - int(session.execute(select(func.count()).select_from(flying), params).scalar() or 0)
    )
    others = session.execute(
        select(_c.id).where(WAITING, _c.id != job_id).order_by(*CLIENT_ORDER).limit(1), params
    ).first()
    if free <= 0 or others is not None:
        return False, free > 0 and others is not None
    if max_running:
        mine = select(func.count()).where(_c.client_id == job.client_id, text(f"({IN_FLIGHT_SQL})"))
        if int(session.execute(mine).scalar() or 0) >= max_running:
            return False, False  # its client is at its limit: one of its own jobs ending sends it
    done = session.execute(
        update(_jobs)
        .where(_c.id == job_id, _c.dispatched_at.is_(None), _c.status == JobStatus.QUEUED.value)
        .values(dispatched_at=now)
    )
    return bool(done.rowcount), False  # type: ignore[attr-defined]


def withdraw(session: Session, jobs: list[Job]) -> int:
    """Jobs ``take_turns`` sent whose publish failed (the broker down): they wait for a slot again,
    so the next fill sends them, instead of the re-publish sweep after ``AIORCH_REPUBLISH_AFTER``.
    Only while still queued and marked by that same turn; returns how many."""
    done = 0
    for sent in {job.dispatched_at for job in jobs if job.dispatched_at is not None}:
        ids = [job.id for job in jobs if job.dispatched_at == sent]
        done += rowcount(session.execute(_WITHDRAW, {"ids": ids, "sent": sent}))
    return done
