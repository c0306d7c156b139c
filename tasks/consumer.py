"""The worker's consumer: Celery's own, but its monitoring events are published without waiting
for the broker's confirm.

``broker_transport_options`` ask RabbitMQ to confirm every publish (``tasks.celery_app``): a job's
message must not be lost between its ``202`` and a worker. Celery's worker publishes its task
events (``task-received``, ``task-started``, ``task-succeeded``: what Flower and
``/diag/backends`` show) on a connection of their own (the ``Events`` bootstep, through
``Consumer.connection_for_write``), with the same options, so each flush of those events waited
for a confirm in the worker's main loop, the loop that hands a received task to its pool process:
on the path of every job from its message to its run (a py-spy profile of the GPU worker's main
process under a stream of tiny jobs: half of its time). Those events are monitoring: Celery sends
them to a transient exchange whose queues are Flower's, and a confirm adds nothing to them.
"""

from __future__ import annotations

from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, its event connection opened without publisher confirms."""

    def connection_for_write(self, url: str | None = None, heartbeat: float | None = None) -> Any:
        options = {**(self.app.conf.broker_transport_options or {}), "confirm_publish": False}
        return self.ensure_connected(
            self.app.connection_for_write(url=url, heartbeat=heartbeat, transport_options=options)
        )
