"""Queue depths, asked of the broker (``/stats`` and ``/metrics`` both show them)."""

from __future__ import annotations

from celery import Celery

from config import QUEUES


def queue_depths(celery: Celery) -> dict[str, int | None]:
    """Messages ready in each queue (None for every queue when the broker cannot say)."""
    depths: dict[str, int | None] = {}
    try:
        with celery.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
            channel = connection.default_channel
            for name in QUEUES:
                try:
                    depths[name] = int(channel.queue_declare(queue=name, passive=True).message_count)
                except Exception:  # a queue no worker declared yet; the failure closed the channel
                    depths[name] = 0
                    channel = connection.channel()
    except Exception:  # any transport error: the broker is down or refuses us
        return {name: None for name in QUEUES}
    return depths
