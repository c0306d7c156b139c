"""Where a queued job stands: its place in its queue (``queue_position``), the slots serving it and
the ETA they give, in the order the dispatcher (``models.dispatch``) and the broker will really use;
and the scheduler's state per queue for operators.

- A job already sent starts in the broker's order: the higher priority, then the one sent earlier
  (one statement; a poll reads it with the job's row, ``read_live``).
- A job still waiting for a slot starts after every job sent, then in the dispatcher's fair order
  from now: played out pick by pick (``play_order``) while it is near the head of its queue, in
  closed form deeper in a backlog (each other client gets as many turns as it has jobs, up to the
  job's own client's count at its turn).
- Many jobs of one queue (a stream that follows a batch) are placed together (``standings``): what
  every job of the queue needs is read once, and each client's order once, to the deepest of its
  jobs asked. Placed one by one, 2,000 followed jobs cost the stream hub 8 s every half second.

Index ranges of live jobs only (``ix_jobs_waiting``, ``ix_jobs_in_flight``), never the history. A
job's place deep in a backlog costs a count of the jobs before it (about 50 ms at 100,000).
"""

from __future__ import annotations

import functools
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Integer, String, Table, and_, bindparam, case, func, or_, select, text, tuple_
from sqlalchemy.orm import Session

from models.db import Database, UTCDateTime
from models.dispatch import (
    CLIENT_ORDER,
    COUNT_BOUND,
    IN_FLIGHT,
    NEVER,
    QUEUE,
    WAITING,
    Head,
    alive_since,
    clients_waiting,
    last_turns,
    slots_of,
    slots_serving,
    waiting_heads,
    waiting_up_to,
)
from models.jobs import IN_FLIGHT_SQL, Job, QueueSlot
from models.lifecycle import BareStatement, job_of
from models.public import iso, job_object
from models.state import JobStatus

# A waiting job's place is played out pick by pick while it is within this many jobs of the head of
# its queue; deeper in a backlog it is computed in closed form.
PLAY_OUT_DEPTH = 200
_jobs: Table = Job.__table__  # type: ignore[assignment]
_slots: Table = QueueSlot.__table__  # type: ignore[assignment]
_c = _jobs.c
_peer = _jobs.alias("peer")
_ALIVE = bindparam("alive", type_=UTCDateTime())
_SENT = and_(_c.status == JobStatus.QUEUED.value, _c.dispatched_at.isnot(None), _c.queue == QUEUE)


def _sent_ahead_of(queue: Any, job_id: Any, priority: Any, dispatched: Any) -> Any:
    """How many sent jobs of ``queue`` the broker hands out before a sent job (``job_id``, of
    ``priority``, sent at ``dispatched``): the higher priorities, then the ones sent earlier.
    Values for a job known here (``standing``), or the columns of the row being read (``read_live``)."""
    return (
        select(func.count())
        .select_from(_peer)
        .where(
            _peer.c.status == JobStatus.QUEUED.value,
            _peer.c.dispatched_at.isnot(None),
            _peer.c.queue == queue,
            _peer.c.id != job_id,
            or_(
                _peer.c.priority > priority,
                and_(_peer.c.priority == priority, _peer.c.dispatched_at < dispatched),
            ),
        )
    )


_SLOTS_BY_QUEUE = (
    select(_slots.c.queue, func.sum(_slots.c.slots)).where(_slots.c.seen_at > _ALIVE).group_by(_slots.c.queue)
)
# A sent job's place: the sent jobs the broker hands out before it, and the slots serving its queue.
_SENT_STANDING = select(
    slots_serving(QUEUE).scalar_subquery().label("slots"),
    _sent_ahead_of(
        QUEUE,
        bindparam("id", type_=String()),
        bindparam("priority", type_=Integer()),
        bindparam("dispatched", type_=UTCDateTime()),
    )
    .scalar_subquery()
    .label("ahead"),
)
# A poll's read (``read_live``): the job's row and, while it is queued and sent, the same place,
# in one round trip; the subqueries run only for such a job (CASE).
_IS_SENT = and_(_c.status == JobStatus.QUEUED.value, _c.dispatched_at.isnot(None))
_LIVE_JOB = select(
    _jobs,
    case((_IS_SENT, slots_serving(_c.queue).scalar_subquery()), else_=None).label("standing_slots"),
    case(
        (_IS_SENT, _sent_ahead_of(_c.queue, _c.id, _c.priority, _c.dispatched_at).scalar_subquery()),
        else_=None,
    ).label("standing_ahead"),
).where(_c.id == bindparam("job_id", type_=String()))
# The clients of the jobs holding a slot, in the order they will free it: running ones by start,
# then the ones sent and not started by the time they were sent.
_FLYING_IN_ORDER = (
    select(_c.client_id)
    .where(IN_FLIGHT)
    .order_by((_c.status == JobStatus.QUEUED.value), func.coalesce(_c.started_at, _c.dispatched_at), _c.id)
)


@dataclass(frozen=True)
class Standing:
    """How many jobs will start before a queued job on its queue, and the slots serving it."""

    position: int
    slots: int

    def eta(self, now: datetime, per_job: float | None) -> datetime | None:
        """When the job should be done: the jobs ahead of it run ``slots`` at a time, each about
        ``per_job`` seconds (the recent median run time of its task), then the job itself."""
        if per_job is None:
            return None
        ahead = self.position * per_job / max(1, self.slots)
        return now + timedelta(seconds=ahead + per_job)


def with_place(body: dict[str, Any], job: Job, place: Standing | None, now: datetime) -> dict[str, Any]:
    """``body`` (the job object) with the job's place in its queue and the ETA it gives, if queued."""
    if place is not None:
        body["queue_position"] = place.position
        body["eta_utc"] = iso(place.eta(now, job.predict_time))
    return body


def live_object(session: Session, job: Job, now: datetime, ahead: int = 1) -> dict[str, Any]:
    """The job object with, while it is queued, its place in its queue (``standing``) and an ETA
    that counts the jobs ahead of it on the slots serving that queue."""
    return with_place(job_object(job, now), job, standing(session, job, now, ahead), now)


def live_objects(
    session: Session, jobs: Sequence[Job], now: datetime, ahead: int = 1
) -> list[dict[str, Any]]:
    """``live_object`` of each of ``jobs``, their places found together (``standings``)."""
    places = standings(session, jobs, now, ahead)
    return [with_place(job_object(job, now), job, places.get(job.id), now) for job in jobs]


def read_live(
    session: Session, job_id: str, now: datetime, ahead: int = 1
) -> tuple[Job, dict[str, Any]] | None:
    """A job and its ``live_object``, or None: a poll's read. A queued job that was sent (the common
    case of a poll) gets its row and its place from one statement; one still waiting for a slot
    has its place played out by ``standing``."""
    row = session.execute(_LIVE_JOB, {"job_id": job_id, "alive": alive_since(now)}).first()
    if row is None:
        return None
    return _live(row._mapping, now, lambda job: live_object(session, job, now, ahead))


def read_live_alone(
    db: Database, job_id: str, now: datetime, ahead: int = 1
) -> tuple[Job, dict[str, Any]] | None:
    """``read_live`` as a unit of work of its own. On Postgres its statement on a bare pooled
    cursor (``Database.statement``): a poll, and a stream's first word on a queued job, need no
    ORM session, nor its ``BEGIN`` and ``ROLLBACK``; only a job still waiting for a slot has its
    place played out in a reading session. Elsewhere (SQLite) ``read_live`` in a reading session."""
    if not db.is_postgres:
        with db.reading() as session:
            return read_live(session, job_id, now, ahead)
    with db.statement() as cursor:
        row = _live_job(db.engine.dialect).fetch(cursor, {"job_id": job_id, "alive": alive_since(now)})
    return None if row is None else _live(row, now, _waiting_in(db, now, ahead))


@functools.cache
def _live_job(dialect: Any) -> BareStatement:
    return BareStatement.compile(_LIVE_JOB, dialect)


def _waiting_in(db: Database, now: datetime, ahead: int) -> Callable[[Job], dict[str, Any]]:
    """The live object of a job still waiting for its slot, its place played out in a reading
    session of its own."""

    def waiting(job: Job) -> dict[str, Any]:
        with db.reading() as session:
            return live_object(session, job, now, ahead)

    return waiting


def _live(
    row: Mapping[Any, Any], now: datetime, waiting: Callable[[Job], dict[str, Any]]
) -> tuple[Job, dict[str, Any]]:
    """The job of a ``_LIVE_JOB`` row and its live object; ``waiting`` gives that of a job still
    waiting for its slot (its place is played out)."""
    job = job_of(row)
    if row["standing_slots"] is not None:  # queued and sent: its place came with its row
        place = Standing(int(row["standing_ahead"] or 0), int(row["standing_slots"]))
        return job, with_place(job_object(job, now), job, place, now)
    if job.status != JobStatus.QUEUED.value:
        return job, job_object(job, now)  # no place to give
    return job, waiting(job)


def play_order(
    heads: Mapping[str, list[Head]],
    in_flight: list[str],
    capacity: int,
    last_turns: Mapping[str, datetime],
) -> Iterator[str]:
    """The waiting jobs of ``heads`` in the order they get a slot, the way the platform hands slots
    out: the free ones at once (``take_turns``), then one each time a job in flight ends, oldest
    sent first (``in_flight``: their clients, in that order). Each pick is ``fair_order``'s: the
    fewest in flight, the higher priority, the client served longest ago, the older job."""
    counts: dict[str, int] = {}
    for client in in_flight:
        counts[client] = counts.get(client, 0) + 1
    flying = deque(in_flight)
    free = max(0, capacity - len(flying))
    served = {client: (0, last_turns.get(client, NEVER)) for client in heads}
    index = dict.fromkeys(heads, 0)
    for picked in range(sum(len(jobs) for jobs in heads.values())):
        if free > 0:
            free -= 1
        elif flying:
            ended = flying.popleft()
            counts[ended] -= 1
        client = min(
            (c for c in heads if index[c] < len(heads[c])),
            key=lambda c: (
                counts.get(c, 0),
                -heads[c][index[c]].priority,
                served[c],
                heads[c][index[c]].order(),
            ),
        )
        yield heads[client][index[client]].id
        index[client] += 1
        counts[client] = counts.get(client, 0) + 1
        flying.append(client)
        served[client] = (1, NEVER + timedelta(microseconds=picked + 1))


def standing(session: Session, job: Job, now: datetime, ahead: int = 1) -> Standing | None:
    """The job's place in its queue while it is queued (None otherwise): ``standings`` of one."""
    return standings(session, [job], now, ahead).get(job.id)


def standings(session: Session, jobs: Sequence[Job], now: datetime, ahead: int = 1) -> dict[str, Standing]:
    """The places of those of ``jobs`` that are queued, by id (see the module). ``ahead``:
    ``AIORCH_DISPATCH_AHEAD``."""
    places: dict[str, Standing] = {}
    waiting: dict[str, list[Job]] = defaultdict(list)
    alive = alive_since(now)
    for job in jobs:
        if job.status != JobStatus.QUEUED.value:
            continue
        if job.dispatched_at is None:
            waiting[job.queue].append(job)
            continue
        # Sent already (the common case of a poll; a queue has few): one prebuilt statement each.
        given = {"queue": job.queue, "alive": alive, "id": job.id, "priority": job.priority}
        row = session.execute(_SENT_STANDING, {**given, "dispatched": job.dispatched_at}).one()
        places[job.id] = Standing(int(row.ahead or 0), int(row.slots or 0))
    for queue, asked in waiting.items():
        places.update(_waiting_places(session, queue, asked, now, ahead))
    return places


def _waiting_places(
    session: Session, queue: str, jobs: list[Job], now: datetime, ahead: int
) -> dict[str, Standing]:
    """The places of jobs of ``queue`` that wait for a slot: every job sent goes first, then the
    waiting ones in fair order (played out near the head, in closed form deeper)."""
    params = {"queue": queue, "alive": alive_since(now)}
    slots = slots_of(session, queue, now)
    sent = int(session.execute(select(func.count()).where(_SENT), params).scalar() or 0)
    flying = [row[0] for row in session.execute(_FLYING_IN_ORDER.limit(COUNT_BOUND), params)]
    ranks = _ranks(session, jobs, params)
    placed = [job for job in jobs if job.id in ranks]  # a job sent meanwhile has no rank here
    # No client gets more than this many slots before a job's own client has had its rank more.
    depth = {job.id: ranks[job.id] + len(flying) + 2 for job in placed}
    near = {job.id for job in placed if depth[job.id] <= PLAY_OUT_DEPTH}
    places: dict[str, Standing] = {}
    if near:
        heads = waiting_heads(session, queue, max(depth[job_id] for job_id in near))
        turns = last_turns(session, queue)
        for picked, job_id in enumerate(play_order(heads, flying, max(1, slots + ahead), turns)):
            if job_id in near:
                places[job_id] = Standing(sent + picked, slots)
                if len(places) == len(near):
                    break
    deep = [job for job in placed if job.id not in near]
    if deep:
        # Each other client gets as many turns as it has jobs, up to the job's own client's count
        # at its turn (ties before): each client's jobs counted once, to the deepest turn asked,
        # and only where some job asked is another client's (its own are its rank).
        counts = {client: flying.count(client) for client in set(flying)}
        turns_at = {job.id: counts.get(job.client_id, 0) + ranks[job.id] for job in deep}
        last_turn = max(turns_at.values())
        has = {
            client: waiting_up_to(session, queue, client, last_turn + 1 - counts.get(client, 0))
            for client in clients_waiting(session, queue)
            if any(job.client_id != client for job in deep)
        }
        for job in deep:
            turn = turns_at[job.id]
            others = sum(
                min(n, max(0, turn + 1 - counts.get(client, 0)))
                for client, n in has.items()
                if client != job.client_id
            )
            places[job.id] = Standing(sent + ranks[job.id] + others, slots)
    return places


def _ranks(session: Session, jobs: list[Job], params: Mapping[str, Any]) -> dict[str, int]:
    """Each waiting job's rank in its client's own order (how many of the client's waiting jobs go
    before it). One job of a client: a count of the jobs before it, two ranges of the waiting index
    (the higher priorities, then the older ones of its own: an OR of the two would filter the
    client's whole range). Several: the client's order read once, to the deepest of them."""
    by_client: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        by_client[job.client_id].append(job)
    ranks: dict[str, int] = {}
    for client, mine in by_client.items():
        deepest = max(mine, key=lambda job: (-job.priority, job.created_at, job.id))
        mark = bindparam("created", deepest.created_at, UTCDateTime())
        before = (
            (_c.priority > deepest.priority,),
            (_c.priority == deepest.priority, tuple_(_c.created_at, _c.id) < tuple_(mark, deepest.id)),
        )
        of_client = (WAITING, _c.client_id == client)
        rank = sum(
            int(session.execute(select(func.count()).where(*of_client, *range_), params).scalar() or 0)
            for range_ in before
        )
        if len(mine) == 1:
            ranks[deepest.id] = rank
            continue
        order = select(_c.id).where(*of_client).order_by(*CLIENT_ORDER).limit(rank + 1)
        index = {row[0]: i for i, row in enumerate(session.execute(order, params))}
        ranks.update({job.id: index[job.id] for job in mine if job.id in index})
    return ranks


@dataclass(frozen=True)
class QueueState:
    """One local engine queue as the dispatcher sees it: its slots, and per client the jobs in
    flight (sent or running) and the jobs waiting for a slot."""

    queue: str
    slots: int
    ahead: int
    in_flight: dict[str, int]
    waiting: dict[str, int]


# Per queue and client, each set from its own partial index alone (an index-only scan of the
# ``(queue, client_id)`` it starts with: one pass over the rows that went to the heap cost 5 ms
# per 5,000 live jobs).
_BY_QUEUE_AND_CLIENT = (_c.queue, _c.client_id)
_WAITING_BY_QUEUE = (
    select(*_BY_QUEUE_AND_CLIENT, func.count())
    .where(_c.status == JobStatus.QUEUED.value, _c.dispatched_at.is_(None))
    .group_by(*_BY_QUEUE_AND_CLIENT)
)
_FLYING_BY_QUEUE = (
    select(*_BY_QUEUE_AND_CLIENT, func.count())
    .where(text(f"({IN_FLIGHT_SQL})"))
    .group_by(*_BY_QUEUE_AND_CLIENT)
)


def scheduler_state(session: Session, queues: list[str], now: datetime, ahead: int) -> list[QueueState]:
    """Every queue's slots, in-flight and waiting jobs per client (live jobs only, through their
    partial indexes: what is queued or running now, never the history)."""
    flying: dict[str, dict[str, int]] = {q: {} for q in queues}
    waiting: dict[str, dict[str, int]] = {q: {} for q in queues}
    for target, query in ((waiting, _WAITING_BY_QUEUE), (flying, _FLYING_BY_QUEUE)):
        for queue, client, count in session.execute(query):
            if queue in target:
                target[queue][client] = int(count)
    slots = dict(session.execute(_SLOTS_BY_QUEUE, {"alive": alive_since(now)}).all())
    return [QueueState(q, int(slots.get(q) or 0), ahead, flying[q], waiting[q]) for q in queues]
