"""The places of queued jobs that the stream hub follows (``app.stream_hub``): their live objects
(``queue_position``, an ETA that counts the jobs ahead), read a few at a time or together, each
reused for a while, and how often they are read again."""

from __future__ import annotations

import time
from typing import Any

from models import feed
from models.db import Database
from models.standing import live_objects, read_live_alone

POSITIONS_EVERY = 0.5  # seconds between recomputations of followed queued jobs' places
POSITIONS_SHARE = 0.05  # at most this share of the hub's time goes to them (see ``next_positions``)
LIVE_CACHE_PRUNE = 1000  # cached live objects past which the expired ones are dropped
FEW = 4  # queued jobs whose places are read one statement each; more are found together


def next_positions(began: float, spent: float) -> float:
    """When the followed queued jobs' places are next recomputed, after a pass that began at
    ``began`` and took ``spent`` seconds: ``POSITIONS_EVERY`` later, or later still so that places
    take at most ``POSITIONS_SHARE`` of the hub's time. A place deep in a backlog is a count of the
    jobs before it (50 ms at 100,000 deep): the events of every stream in the process wait while
    the hub counts, and so do the API's request threads, for the GIL."""
    return began + max(POSITIONS_EVERY, spent / POSITIONS_SHARE)


class LivePlaces:
    """Live objects of queued jobs, each reused for ``POSITIONS_EVERY`` seconds (a thousand
    streams opened on one job cost one place, not a thousand). Used by the hub's thread only."""

    def __init__(self, db: Database, ahead: int):
        self.db = db
        self.ahead = ahead  # AIORCH_DISPATCH_AHEAD
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}

    def of(self, job_ids: list[str], now: Any) -> dict[str, dict[str, Any]]:
        """The live objects of those of ``job_ids`` still queued, by id. A few are read with their
        places in one statement each (``read_live_alone``, a poll's read); more are found together
        (``models.standing.standings``: a batch of 2,000 cost 8 s one by one)."""
        at = time.monotonic()
        if len(self._cache) > LIVE_CACHE_PRUNE:  # what is too old to be reused goes
            self._cache = {k: v for k, v in self._cache.items() if at - v[0] < POSITIONS_EVERY}
        bodies: dict[str, dict[str, Any]] = {}
        stale = []
        for job_id in job_ids:
            cached = self._cache.get(job_id)
            if cached is not None and at - cached[0] < POSITIONS_EVERY:
                bodies[job_id] = cached[1]
            else:
                stale.append(job_id)
        if len(stale) <= FEW:
            read = (read_live_alone(self.db, job_id, now, self.ahead) for job_id in stale)
            fresh = {job.id: body for job, body in filter(None, read) if job.status == "queued"}
        else:
            with self.db.reading() as session:
                jobs = feed.queued_rows(session, stale)
                bodies_of = live_objects(session, jobs, now, self.ahead)
            fresh = {job.id: body for job, body in zip(jobs, bodies_of, strict=True)}
        for job_id, body in fresh.items():
            self._cache[job_id] = (at, body)
            bodies[job_id] = body
        return bodies

    def forget(self, job_id: str) -> None:
        """Nobody follows ``job_id`` any more."""
        self._cache.pop(job_id, None)
