"""The floor of the job-latency benchmark: a trivial Celery task on the platform's own Celery app.

``build(settings)`` is ``tasks.celery_app.create_celery(settings)`` (same broker, transport
options, serializer, acks, prefetch, events) plus one queue of the same kind as the platform's
and one task, ``bench.ping``. The task sends a UDP datagram to the benchmark process, so the
round trip send -> broker -> worker -> task body is measured without any polling.
"""

from __future__ import annotations

import json
import socket
import time

from celery import Celery
from kombu import Queue

from config import Settings
from tasks.celery_app import EXCHANGE, MAX_PRIORITY, create_celery

RAW_QUEUE = "bench.raw"
PING = "bench.ping"


def build(settings: Settings) -> Celery:
    app = create_celery(settings)
    queue = Queue(RAW_QUEUE, EXCHANGE, routing_key=RAW_QUEUE, durable=True,
                  queue_arguments={"x-max-priority": MAX_PRIORITY})
    app.conf.task_queues = [*app.conf.task_queues, queue]
    app.conf.task_routes = {**app.conf.task_routes, PING: {"queue": RAW_QUEUE}}

    @app.task(name=PING, ignore_result=True)
    def ping(token: str, port: int) -> None:
        executed_at = time.time()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            message = json.dumps({"token": token, "executed_at": executed_at}).encode()
            sock.sendto(message, ("127.0.0.1", port))

    return app
