"""Queue depths for ``/stats`` and ``/metrics`` (``app.management.queues``), on the run's RabbitMQ
vhost: counted on a pooled connection, a queue that does not exist shows 0 and is not asked about
again for a while, a broker that cannot be reached shows None for every queue."""

from __future__ import annotations

import uuid
from typing import Any

import amqp.channel
import pytest
from kombu import Exchange, Queue

from app.management import queues
from config import Settings
from tasks.celery_app import create_celery
from tests.support.platform import free_port


def test_depths_count_ready_messages_and_skip_a_missing_queue_for_a_while(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_celery(settings)
    present, missing = f"depth.{uuid.uuid4().hex[:8]}", f"depth.none-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(queues, "QUEUES", [present, missing])
    exchange = Exchange("depths-test", type="direct")
    with app.connection_for_write() as conn:
        queue = Queue(present, exchange, routing_key=present, auto_delete=False)
        bound = queue.bind(conn.default_channel)
        bound.declare()
        try:
            producer = conn.Producer(exchange=exchange)
            for n in range(3):
                producer.publish({"n": n}, routing_key=present, declare=[queue])
            asked: list[str] = []
            declare = amqp.channel.Channel.queue_declare

            def counting(self: Any, queue: str = "", *args: Any, **kwargs: Any) -> Any:
                asked.append(queue)
                return declare(self, queue, *args, **kwargs)

            monkeypatch.setattr(amqp.channel.Channel, "queue_declare", counting)
            assert queues.queue_depths(app) == {present: 3, missing: 0}
            assert asked == [present, missing]
            # Within MISSING_TTL the missing queue is not asked about again; after it, it is.
            assert queues.queue_depths(app) == {present: 3, missing: 0}
            assert asked == [present, missing, present]
            monkeypatch.setitem(queues._missing, missing, queues._missing[missing] - queues.MISSING_TTL)
            assert queues.queue_depths(app) == {present: 3, missing: 0}
            assert asked[-2:] == [present, missing]
        finally:
            bound.delete()


def test_a_broker_that_cannot_be_reached_shows_no_depth(settings: Settings) -> None:
    app = create_celery(settings.with_overrides(broker_url=f"amqp://guest:guest@127.0.0.1:{free_port()}//"))
    assert set(queues.queue_depths(app).values()) == {None}
