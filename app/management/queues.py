"""Queue depths, asked of the broker (``/stats`` and ``/metrics`` both show them).

On a connection of the Celery app's pool, kept open between calls (a connection of its own made
every ``/stats`` and every scrape pay the AMQP handshake), with a channel of its own per call,
closed after. A queue that does not exist (no worker of it has started, nothing was sent to it)
holds no message: asking costs an error and a new channel (about 1.3 ms each here, 7 ms of a
``/stats`` with five such queues), so its absence is remembered for ``MISSING_TTL`` seconds and
it shows 0 meanwhile."""

from __future__ import annotations

import contextlib
import threading
import time

from celery import Celery

from config import QUEUES

ACQUIRE_TIMEOUT = 2.0  # seconds to wait for a pooled connection (the pool is the publishers' too)
MISSING_TTL = 10.0  # seconds a queue found missing shows 0 without asking again

_missing: dict[str, float] = {}  # queue -> when it was found missing (monotonic)
_lock = threading.Lock()


def queue_depths(celery: Celery) -> dict[str, int | None]:
    """Messages ready in each queue (None for every queue when the broker cannot say)."""
    depths: dict[str, int | None] = {}
    now = time.monotonic()
    with _lock:
        known_missing = {name for name, seen in _missing.items() if now - seen < MISSING_TTL}
    try:
        with celery.pool.acquire(block=True, timeout=ACQUIRE_TIMEOUT) as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
            channel = connection.channel()
            try:
                for name in QUEUES:
                    if name in known_missing:
                        depths[name] = 0
                        continue
                    try:
                        depths[name] = int(channel.queue_declare(queue=name, passive=True).message_count)
                    except Exception:  # a queue nobody declared yet; the failure closed the channel
                        # (a connection that died instead raises here, to the handler below)
                        channel = connection.channel()
                        depths[name] = 0
                        with _lock:
                            _missing[name] = time.monotonic()
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
    except Exception:  # any transport error: the broker is down or refuses us
        return {name: None for name in QUEUES}
    return depths
