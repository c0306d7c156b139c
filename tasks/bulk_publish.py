"""Many jobs' next messages in one confirmed batch (``POST /v1/jobs/batch``).

``publish`` confirms each message on its own: one broker round trip per job, which for a batch of
1000 is most of the request. Here every message of a batch goes out on one channel in confirm
mode without waiting, and the broker's acks (usually a few ``multiple`` acks) are awaited once at
the end: the batch is published when every message is confirmed, and fails as a whole otherwise
(a nack, a closed channel, a lost connection, no acks within ``CONFIRM_TIMEOUT``).

Each message is built exactly as ``publish`` builds one (``celery_app.task_message``) and routed
by ``next_step``, so a job sent in a batch travels as it would alone. The channel belongs to a
small pool of connections opened *without* kombu's per-message ``confirm_publish`` (which would
make every publish wait); confirm mode is switched on per channel instead.

On a transport without publisher confirms (the embedded filesystem transport, ``memory://``) the
messages are sent one by one through ``publish``, which is what those transports do anyway.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

from celery import Celery
from kombu import Producer
from kombu.common import maybe_declare
from kombu.exceptions import OperationalError

from config import Settings
from models.jobs import Job
from tasks.celery_app import EXCHANGE, MAX_PRIORITY, task_message
from tasks.next_step import next_step, send_next

CONFIRM_TIMEOUT = 10.0  # seconds for the broker to confirm a whole batch
POOL_LIMIT = 8  # connections per process; a batch request holds one for its publish only
ATTEMPTS = 2  # a pooled connection the broker dropped since its last use gets one fresh try

_pools: weakref.WeakKeyDictionary[Celery, Any] = weakref.WeakKeyDictionary()
_pools_lock = threading.Lock()


def _pool(app: Celery) -> Any:
    """This app's pool of publishing connections without per-message confirms."""
    with _pools_lock:
        pool = _pools.get(app)
        if pool is None:
            connection = app.connection_for_write(transport_options={"confirm_publish": False})
            pool = _pools[app] = connection.Pool(limit=POOL_LIMIT)
        return pool


def confirms_supported(app: Celery) -> bool:
    """Whether the app's broker speaks AMQP (RabbitMQ), the transport with publisher confirms."""
    return str(app.conf.broker_url or "").startswith(("amqp", "pyamqp"))


def publish_batch(app: Celery, settings: Settings, jobs: Sequence[Job]) -> None:
    """Publish each job's next step (``next_step``); returns once the broker confirmed all of them.
    Raises kombu's ``OperationalError`` when it did not (the caller withdraws the jobs)."""
    if not jobs:
        return
    if not confirms_supported(app):
        for job in jobs:
            send_next(app, settings, job)
        return
    messages = []
    for job in jobs:
        step = next_step(settings, job)
        _, message = task_message(
            app,
            step.task,
            job.id,
            step.kwargs or None,
            soft_time_limit=step.soft_time_limit,
            time_limit=step.time_limit,
        )
        messages.append((message, step.queue, max(0, min(MAX_PRIORITY, job.priority))))
    queues = app.amqp.queues
    pool = _pool(app)
    for attempt in range(1, ATTEMPTS + 1):
        with pool.acquire(block=True, timeout=CONFIRM_TIMEOUT) as connection:
            errors = connection.connection_errors + connection.channel_errors + (TimeoutError,)
            try:
                _send_confirmed(connection, messages, queues)
                return
            except errors as exc:
                # Drop the broken connection (the pool reconnects it on its next use).
                connection.collect()
                if attempt == ATTEMPTS:
                    raise OperationalError(f"the broker did not confirm the batch: {exc}") from exc


def _send_confirmed(connection: Any, messages: list[tuple[Any, str, int]], queues: Any) -> None:
    """Publish ``messages`` on a fresh channel in confirm mode, then wait for every ack."""
    channel = connection.channel()
    try:
        outstanding: set[int] = set()
        nacked: list[int] = []

        def on_ack(tag: int, multiple: bool) -> None:
            if multiple:
                outstanding.difference_update([t for t in outstanding if t <= tag])
            else:
                outstanding.discard(tag)

        def on_nack(tag: int, multiple: bool) -> None:
            nacked.append(tag)
            on_ack(tag, multiple)

        channel.events["basic_ack"].add(on_ack)
        channel.events["basic_nack"].add(on_nack)
        channel.confirm_select()
        producer = Producer(channel, exchange=EXCHANGE, auto_declare=False)
        for name in {queue for _, queue, _ in messages}:
            maybe_declare(queues[name], channel)
        # A fresh channel in confirm mode numbers its publishes 1, 2, ... (the acks' delivery tags).
        for tag, ((headers, properties, body, _), queue, priority) in enumerate(messages, start=1):
            outstanding.add(tag)
            producer.publish(
                body,
                exchange=EXCHANGE.name,
                routing_key=queue,
                serializer="json",
                delivery_mode="persistent",
                headers=headers,
                priority=priority,
                **properties,
            )
        deadline = time.monotonic() + CONFIRM_TIMEOUT
        while outstanding:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(outstanding)} of {len(messages)} messages unconfirmed")
            connection.drain_events(timeout=left)
        if nacked:
            raise OperationalError(f"the broker refused {len(nacked)} of {len(messages)} messages")
    finally:
        connection.maybe_close_channel(channel)
