"""The job event log (``job_events``), read: what the dispatcher takes, what readers follow, what
the sweep prunes. ``models.lifecycle`` is its only writer (one row per move).

An event waiting for the dispatcher has ``dispatched_at`` NULL. Taking events is one conditional
UPDATE ... RETURNING (``dispatched_at`` set where it is still NULL), so a kick and the sweep, or
two kicks, racing for the same event never both get it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, delete, select, update
from sqlalchemy.orm import Session

from models.db import UTCDateTime
from models.jobs import JobEvent

_events: Table = JobEvent.__table__  # type: ignore[assignment]
_e = _events.c
_NOW = bindparam("now", type_=UTCDateTime())
_COLUMNS = (_e.id, _e.job_id, _e.seq, _e.type, _e.created_at, _e.data)
PRUNE_BATCH = 5000


@dataclass(frozen=True)
class LoggedEvent:
    id: int
    job_id: str
    seq: int
    type: str
    created_at: datetime
    data: dict[str, Any]  # the public job object after the move


def _events_of(rows: Any) -> list[LoggedEvent]:
    events = [LoggedEvent(*row) for row in rows]
    return sorted(events, key=lambda e: (e.job_id, e.seq))


_TAKE_JOB = (
    update(_events)
    .where(_e.job_id == bindparam("owner"), _e.dispatched_at.is_(None))
    .values(dispatched_at=_NOW)
    .returning(*_COLUMNS)
)
_TAKE_LEFT = (
    update(_events)
    .where(
        # Checked again on the row itself: a second sweep waiting on the first one's row locks
        # finds the events taken and leaves them.
        _e.dispatched_at.is_(None),
        _e.id.in_(
            select(_e.id)
            .where(_e.dispatched_at.is_(None), _e.created_at < bindparam("cutoff", type_=UTCDateTime()))
            .order_by(_e.id)
            .limit(bindparam("limit"))
        ),
    )
    .values(dispatched_at=_NOW)
    .returning(*_COLUMNS)
)
_PRUNE = delete(_events).where(
    _e.id.in_(
        select(_e.id)
        .where(_e.created_at < bindparam("before", type_=UTCDateTime()))
        .order_by(_e.id)
        .limit(bindparam("limit"))
    )
)


def take_pending(session: Session, job_id: str, now: datetime) -> list[LoggedEvent]:
    """The job's events waiting for the dispatcher, in order, marked dispatched (commit to keep)."""
    return _events_of(session.execute(_TAKE_JOB, {"owner": job_id, "now": now}))


def take_left_over(
    session: Session, now: datetime, older_than: datetime, limit: int = 500
) -> list[LoggedEvent]:
    """Events of any job still waiting since before ``older_than``: their kick was lost."""
    return _events_of(session.execute(_TAKE_LEFT, {"cutoff": older_than, "limit": limit, "now": now}))


def events_of(session: Session, job_id: str, after_seq: int = 0) -> list[LoggedEvent]:
    """The job's log after sequence number ``after_seq``, in order (what a stream resumes from)."""
    rows = session.execute(select(*_COLUMNS).where(_e.job_id == job_id, _e.seq > after_seq).order_by(_e.seq))
    return [LoggedEvent(*row) for row in rows]


def prune(session: Session, before: datetime, limit: int = PRUNE_BATCH) -> int:
    """Delete up to ``limit`` events older than ``before``, oldest first; returns how many."""
    return int(session.execute(_PRUNE, {"before": before, "limit": limit}).rowcount)  # type: ignore[attr-defined]
