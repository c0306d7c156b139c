"""The floors of the job-latency benchmark: trivial Celery tasks on the platform's own Celery app.

``build(settings)`` is ``tasks.celery_app.create_celery(settings)`` (same broker, transport
options, serializer, acks, prefetch, events) plus one queue of the same kind as the platform's
and two tasks:

- ``bench.echo``, the raw Celery round trip the tiny job is held to: a task whose result goes to
  Celery's database result backend on the platform's own database (Postgres, or the embedded
  SQLite file) and that the caller polls for at the interval the benchmark polls a job with, as
  someone building the same service on raw Celery would (``send_task(...)`` then ``get()``);
- ``bench.ping``, the one-way transport alone, for information: the task body sends a UDP
  datagram to the benchmark process, so send -> broker -> worker -> task body is timed without any
  result and without polling.
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
ECHO = "bench.echo"
# Tables of their own, dropped by the benchmark after the run.
RESULT_TABLES = {"task": "bench_celery_taskmeta", "group": "bench_celery_groupmeta"}


def result_backend_url(settings: Settings) -> str:
    """Celery's SQLAlchemy result backend on the database the platform keeps its jobs in."""
    url = settings.database_url
    for bare in ("postgres://", "postgresql://"):
        if url.startswith(bare):
            url = "postgresql+psycopg2://" + url[len(bare) :]
    return "db+" + url


def build(settings: Settings) -> Celery:
    app = create_celery(settings)
    queue = Queue(RAW_QUEUE, EXCHANGE, routing_key=RAW_QUEUE, durable=True,
                  queue_arguments={"x-max-priority": MAX_PRIORITY})
    app.conf.task_queues = [*app.conf.task_queues, queue]
    app.conf.task_routes = {**app.conf.task_routes, PING: {"queue": RAW_QUEUE}, ECHO: {"queue": RAW_QUEUE}}
    app.conf.result_backend = result_backend_url(settings)
    app.conf.database_table_names = RESULT_TABLES

    @app.task(name=PING, ignore_result=True)
    def ping(token: str, port: int) -> None:
        executed_at = time.time()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            message = json.dumps({"token": token, "executed_at": executed_at}).encode()
            sock.sendto(message, ("127.0.0.1", port))

    @app.task(name=ECHO, ignore_result=False)
    def echo(token: str) -> dict[str, object]:
        return {"token": token, "executed_at": time.time()}

    return app
