"""The run's own Postgres databases and RabbitMQ vhosts on the machine's shared servers.

Every run names its databases and vhosts ``aiorch_t_<RUN_ID>...`` and drops them at the end, so
parallel runs never see each other's jobs. Each integration platform gets a database of its own
(``fresh_database``): a module's left-over jobs, events and webhook retries can then never be
swept, dispatched or delivered by the next module's workers.
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import uuid
from collections.abc import Iterator

import psycopg2
from kombu import Connection

from config import QUEUES, Settings
from models.db import Database
from models.migrate import upgrade

PG_ADMIN = "dbname=postgres user=postgres host=127.0.0.1 port=5432"
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
RUN_ID = uuid.uuid4().hex[:10]
_numbers = itertools.count(1)
created: list[str] = []  # databases made by ``fresh_database``, dropped by ``drop_created``


def pg_admin(sql: str) -> None:
    conn = psycopg2.connect(PG_ADMIN)
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql)
    finally:
        conn.close()


def rabbitmqctl(*args: str) -> None:
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(
            f"rabbitmqctl {' '.join(args)} exited {done.returncode} (is this machine's RabbitMQ "
            f"running? `rabbitmq-server -detached` starts it): {done.stdout}{done.stderr}"
        )


def vhost(suffix: str) -> contextlib.AbstractContextManager[str]:
    """This run's vhost ``aiorch_t_<RUN_ID>_<suffix>`` (``private_vhost``)."""
    return private_vhost(f"aiorch_t_{RUN_ID}_{suffix}")


@contextlib.contextmanager
def private_vhost(name: str) -> Iterator[str]:
    """A RabbitMQ vhost for guest, deleted (with every queue and message in it) on exit."""
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@127.0.0.1:5672/{name}"
    finally:
        rabbitmqctl("delete_vhost", name)


def fresh_database(settings: Settings) -> str:
    """A new database of this run, migrated to head; its URL. Dropped by ``drop_created``."""
    name = f"aiorch_t_{RUN_ID}_{next(_numbers)}"
    pg_admin(f"CREATE DATABASE {name}")
    created.append(name)
    url = f"{PG_SERVER}/{name}"
    db = Database(settings.with_overrides(database_url=url))
    try:
        upgrade(db)
    finally:
        db.dispose()
    return url


def drop_created() -> None:
    while created:
        pg_admin(f"DROP DATABASE IF EXISTS {created.pop()} WITH (FORCE)")


def purge_queues(broker_url: str) -> None:
    """Empty the platform's queues in ``broker_url`` (messages an earlier module's workers handed
    back when they stopped: webhook retries, polls, re-published jobs)."""
    if not broker_url.startswith("amqp"):
        return
    with Connection(broker_url, connect_timeout=5) as conn:
        for queue in QUEUES:
            channel = conn.channel()
            try:
                channel.queue_purge(queue)
            except Exception:  # not declared yet: nothing to purge (the error closed the channel)
                pass
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
