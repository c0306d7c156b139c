"""A client's admission: its per-minute and queued-jobs limits (429 with ``Retry-After`` and the
``X-RateLimit-*`` headers) and its priority cap, for a single submit and for each job of a batch."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from flask import current_app, g

from app.errors import abort
from app.services import Services
from models.client_limits import Limits, LimitsCache
from models.reads import AdmissionCounts, admission_counts

LIMITS_TTL = 5.0  # seconds a client's limits are reused by this process (models/client_limits.py)
QUEUED_RETRY_AFTER = 5  # seconds: when to try again after too_many_queued_jobs
_LIMITS_KEY = "aiorch.client_limits"


def client_limits(svc: Services, client_id: str) -> Limits:
    """The client's limits in force, from this app's ``LimitsCache``: no query on the hot path."""
    cache = current_app.extensions.get(_LIMITS_KEY)
    if cache is None:
        cache = current_app.extensions.setdefault(_LIMITS_KEY, LimitsCache(svc.db, svc.settings, LIMITS_TTL))
    limits: Limits = cache.get(client_id)
    return limits


def rate_headers(limit: int, remaining: int, reset: int) -> dict[str, str]:
    return {
        "X-RateLimit-Limit": str(limit),
        "X-RateLimit-Remaining": str(max(0, remaining)),
        "X-RateLimit-Reset": str(reset),
    }


class Admission:
    """A client's admission for one request, against its own limits (``models.client_limits``,
    the environment's defaults where it has none): 429 when it is over its per-minute or
    queued-jobs limit, and the priority its job gets (lowered to its ``max_priority``).

    Counted in the database once, at the first job admitted (so the limit holds across every API
    process; both counts use the jobs' indexes), and then each job admitted counts too, so the jobs
    of a batch are held to the limits one by one. A 429 carries ``Retry-After`` and
    ``X-RateLimit-Limit``/``-Remaining``/``-Reset`` of the limit that refused it (``-Reset``: seconds
    until a place frees); ``success_headers`` are the per-minute limit's after the jobs admitted,
    for the answer that accepted them."""

    def __init__(self, svc: Services, client_id: str, now: datetime):
        self.db = svc.db
        self.client_id = client_id
        self.now = now
        self.limits = client_limits(svc, client_id)
        self.counts: AdmissionCounts | None = None
        self.admitted = 0
        g.admission = self  # the view adds its success_headers to the answer

    def admit(self, priority: int) -> int:
        """Admit one job asking for ``priority`` (or abort with a 429); returns the priority it
        gets."""
        limits, now = self.limits, self.now
        if limits.rate_per_minute or limits.max_queued:
            if self.counts is None:
                since = now - timedelta(seconds=60) if limits.rate_per_minute else None
                self.counts = admission_counts(self.db, self.client_id, since, queued=bool(limits.max_queued))
            counts = self.counts
            rate = limits.rate_per_minute
            if rate and counts.created_since + self.admitted >= rate:
                wait = self.window_reset()
                abort(
                    429,
                    code="rate_limited",
                    message=f"More than {rate} jobs in a minute; retry in {wait} s.",
                    headers={"Retry-After": str(wait), **rate_headers(rate, 0, wait)},
                )
            waiting = counts.queued + self.admitted
            if limits.max_queued and waiting >= limits.max_queued:
                abort(
                    429,
                    code="too_many_queued_jobs",
                    message=f"{waiting} of your jobs are still queued (limit {limits.max_queued}).",
                    headers={
                        "Retry-After": str(QUEUED_RETRY_AFTER),
                        **rate_headers(limits.max_queued, 0, QUEUED_RETRY_AFTER),
                    },
                )
        self.admitted += 1
        return min(priority, limits.max_priority)

    def window_reset(self) -> int:
        """Seconds until the oldest job of the last minute leaves the window (a place frees)."""
        oldest = self.counts.oldest_since if self.counts is not None else None
        wait = 60 - (self.now - oldest).total_seconds() if oldest is not None else 60
        return max(1, math.ceil(wait))

    def success_headers(self) -> dict[str, str]:
        """The per-minute limit's X-RateLimit-* after the jobs admitted; none without one."""
        rate = self.limits.rate_per_minute
        if not rate or self.counts is None:
            return {}
        return rate_headers(rate, rate - self.counts.created_since - self.admitted, self.window_reset())


def admission_headers() -> dict[str, str]:
    """The X-RateLimit-* headers of this request's admission, for the answer that accepted jobs."""
    admission: Admission | None = g.get("admission")
    return {} if admission is None else admission.success_headers()
