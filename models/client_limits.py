"""A client's scheduling limits: its own (table ``client_limits``, set with ``aiorch keys
create|update CLIENT --rate-per-minute N --max-queued N --max-running N --max-priority P``) over
the environment's defaults (``AIORCH_RATE_LIMIT_PER_MINUTE``, ``AIORCH_MAX_QUEUED_PER_CLIENT``,
``AIORCH_MAX_RUNNING_PER_CLIENT``, ``AIORCH_MAX_PRIORITY``).

Kept per client, not per key: a client may have several keys, and static keys have no row at all.
A column left NULL (or no row) takes the default, so changing the environment changes every client
that did not get a value of its own. For the three counts 0 means "no limit", as in the
environment, so a client can be exempted from a default limit; ``max_priority`` is 0-9.

The API reads a client's limits on every submit (rate, queued, priority); ``LimitsCache`` keeps
them per process for a few seconds, so the hot path costs no extra query (a change reaches every
API process within ``ttl``). ``max_running`` is the fair-share dispatcher's to hold
(``running_caps``: its caps per queue), since it alone decides when a client's job takes a slot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from config import Settings
from models.db import Database, utcnow
from models.jobs import IN_FLIGHT_SQL, ApiKey, ClientLimit, Job

# The most a count limit may be: the column is a 32-bit integer, and a billion jobs a minute is
# "no limit" in all but name (0 says that).
MAX_COUNT = 1_000_000_000
MAX_PRIORITY = 9  # priorities are 0-9 (higher first), as on the queues (tasks/celery_app.py)


@dataclass(frozen=True)
class Limits:
    """A client's limits in force: its own where it has them, else the defaults. 0 = no limit
    for the counts."""

    rate_per_minute: int  # jobs created in any 60 s
    max_queued: int  # jobs waiting in ``queued`` at once
    max_running: int  # jobs running at once, across all workers
    max_priority: int  # the highest priority its jobs get (0-9)


NAMES = tuple(f.name for f in fields(Limits))
# How the CLI spells each limit (its option, without the dashes).
OPTIONS = {name: name.replace("_", "-") for name in NAMES}


class InvalidLimit(ValueError):
    """A limit value that makes no sense (negative, not a whole number, a priority above 9)."""


def check(name: str, value: Any) -> int:
    """``value`` as the limit ``name`` takes it, or ``InvalidLimit`` with a message naming it."""
    if name not in NAMES:
        raise InvalidLimit(f"unknown limit {name!r}; known: {', '.join(OPTIONS.values())}")
    high = MAX_PRIORITY if name == "max_priority" else MAX_COUNT
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value).strip())
        except ValueError:
            raise InvalidLimit(f"{OPTIONS[name]} must be a whole number, got {value!r}") from None
    if not 0 <= value <= high:
        meaning = "" if name == "max_priority" else " (0 = no limit)"
        raise InvalidLimit(f"{OPTIONS[name]} must be between 0 and {high}{meaning}, got {value}")
    return value


def defaults(settings: Settings) -> Limits:
    return Limits(
        rate_per_minute=settings.rate_limit_per_minute,
        max_queued=settings.max_queued_per_client,
        max_running=settings.max_running_per_client,
        max_priority=settings.max_priority,
    )


def own_values(row: ClientLimit | None) -> dict[str, int | None]:
    """A client's own values, None where it takes the default."""
    return {name: None if row is None else getattr(row, name) for name in NAMES}


def in_force(own: dict[str, int | None], settings: Settings) -> Limits:
    """The limits in force: the client's own values over the defaults."""
    base = defaults(settings)
    values: dict[str, int] = {}
    for name in NAMES:
        value = own.get(name)
        values[name] = getattr(base, name) if value is None else value
    return Limits(**values)


class ClientLimits:
    """The ``client_limits`` table: read and change a client's own limits."""

    def __init__(self, db: Database):
        self.db = db

    def own(self, client_id: str) -> dict[str, int | None]:
        with self.db.session() as session:
            return own_values(session.get(ClientLimit, client_id))

    def effective(self, client_id: str, settings: Settings) -> Limits:
        """The client's limits in force (one primary-key read)."""
        return in_force(self.own(client_id), settings)

    def set(self, client_id: str, changes: dict[str, int | None]) -> dict[str, int | None]:
        """Change the named limits of ``client_id`` (None: back to the default), leave the others;
        returns its own values after the change. Raises ``InvalidLimit`` before writing anything."""
        checked = {name: None if value is None else check(name, value) for name, value in changes.items()}
        try:
            return self._write(client_id, checked)
        except IntegrityError:  # another process created the row meanwhile: it exists now
            return self._write(client_id, checked)

    def _write(self, client_id: str, checked: dict[str, int | None]) -> dict[str, int | None]:
        with self.db.session() as session:
            row = session.get(ClientLimit, client_id)
            if row is None:
                row = ClientLimit(client_id=client_id, **dict.fromkeys(NAMES))
                session.add(row)
            for name, value in checked.items():
                setattr(row, name, value)
            row.updated_at = utcnow()
            session.flush()
            return own_values(row)

    def listed(self) -> dict[str, dict[str, int | None]]:
        """Own values of every client that has keys in the database or limits of its own, by
        client (clients with only static keys and no limits of their own are not known here)."""
        with self.db.session() as session:
            rows = {row.client_id: own_values(row) for row in session.scalars(select(ClientLimit))}
            for client_id in session.scalars(select(ApiKey.client_id).distinct()):
                rows.setdefault(client_id, own_values(None))
        return dict(sorted(rows.items()))


def running_caps(session: Session, queue: str, clients: Iterable[str], settings: Settings) -> dict[str, int]:
    """For the fair-share dispatcher (``models.dispatch.take_turns(..., caps=)``): how many jobs
    each of ``clients`` may have in flight on ``queue``, for those with a ``max_running``: the
    limit less its jobs in flight on the other queues (so the limit holds across all workers),
    never below 0. A client without a limit (0) is not in the answer. Two queries at most, on the
    primary key of ``client_limits`` and the in-flight index of ``jobs``."""
    wanted = list(dict.fromkeys(clients))
    if not wanted:
        return {}
    rows = session.execute(
        select(ClientLimit.client_id, ClientLimit.max_running).where(
            ClientLimit.client_id.in_(wanted), ClientLimit.max_running.is_not(None)
        )
    )
    own = {str(client): int(limit or 0) for client, limit in rows}  # never NULL: filtered above
    limits = {c: own.get(c, settings.max_running_per_client) for c in wanted}
    capped = [c for c, limit in limits.items() if limit]
    if not capped:
        return {}
    elsewhere = dict(
        session.execute(
            select(Job.client_id, func.count())
            .where(Job.client_id.in_(capped), Job.queue != queue, text(f"({IN_FLIGHT_SQL})"))
            .group_by(Job.client_id)
        ).all()
    )
    return {c: max(0, limits[c] - int(elsewhere.get(c, 0))) for c in capped}


class LimitsCache:
    """A client's limits in force, read at most once per ``ttl`` seconds per process (the API
    reads them on every submit). Clients without limits of their own are cached too."""

    MAX_ENTRIES = 10_000  # past this many clients the cache starts again (memory stays bounded)

    def __init__(self, db: Database, settings: Settings, ttl: float):
        self.table = ClientLimits(db)
        self.settings = settings
        self.ttl = ttl
        self._entries: dict[str, tuple[float, Limits]] = {}
        self._lock = threading.Lock()

    def get(self, client_id: str) -> Limits:
        now = time.monotonic()
        entry = self._entries.get(client_id)
        if entry is not None and now - entry[0] < self.ttl:
            return entry[1]
        limits = self.table.effective(client_id, self.settings)
        with self._lock:
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
            self._entries[client_id] = (now, limits)
        return limits
