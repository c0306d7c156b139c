"""Fair share, the workers' side (the choice itself is ``models.dispatch``).

- Each worker says how many slots it has on each queue it consumes (its pool's processes) when it
  is ready, again every ``HEARTBEAT`` seconds while it runs, and gives them back when it stops; a
  worker that died stops counting ``SLOT_TTL`` seconds after it was last seen.
- ``fill_slots`` sends waiting jobs into a queue's free slots in fair order. It runs where a slot
  frees or appears: after every run task on a local engine (whatever became of its job), when a
  worker is ready, in the sweep (a safety net), and as the ``aiorch.fill_slots`` task that the API
  asks for when it accepted a job that had to wait although slots were free.

The queues of local engines are dispatched this way; the cpu queue (preparing inputs, remote
providers, webhooks) is not: its work is short and a provider queues jobs itself.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from celery import shared_task
from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown
from kombu.exceptions import OperationalError

from config import Settings
from models import dispatch
from models.db import Database, utcnow
from tasks.celery_app import FILL_SLOTS
from tasks.next_step import SLOTTED, send_next, sendable
from tasks.runtime import JobTask, Runtime

log = logging.getLogger("aiorch.scheduling")

HEARTBEAT = 30.0  # seconds between a worker's reminders of its slots


def fill_slots(rt: Runtime, app: Any, queue: str) -> int:
    """Send waiting jobs into ``queue``'s free slots (committed first, then published); returns
    how many were sent. When the broker refuses a publish, that job and the ones not yet published
    wait again (``dispatch.withdraw``); a message lost after the broker took it is the re-publish
    sweep's, after ``AIORCH_REPUBLISH_AFTER``."""
    if queue not in SLOTTED or not dispatch.anyone_waits(rt.db, queue):
        return 0
    with rt.db.session() as session:
        jobs = dispatch.take_turns(session, queue, utcnow(), rt.settings.dispatch_ahead, rt.settings)
    if jobs and rt.settings.debug_tasks and rt.settings.debug_crash_before_dispatch == "fill_slots":
        os.kill(os.getpid(), signal.SIGKILL)  # the fault tests' death between COMMIT and publish
    ready = sendable(rt.store, jobs)
    for index, job in enumerate(ready):
        try:
            send_next(app, rt.settings, job)
        except (OperationalError, OSError):
            # The broker is down: this job and the rest wait for a slot again (the next fill, or
            # the sweep's, sends them), rather than count as sent until the re-publish sweep.
            unsent = ready[index:]
            with rt.db.session() as session:
                dispatch.withdraw(session, unsent)
            log.warning("broker unavailable: %d job(s) wait for their turn again", len(unsent))
            return index
    return len(jobs)


@shared_task(bind=True, base=JobTask, name=FILL_SLOTS, queue="cpu")
def fill_slots_task(self: JobTask, queue: str) -> int:
    return fill_slots(self.runtime, self.app, queue)


# -- a worker's slots --------------------------------------------------------------------------------


class _Worker:
    """This worker process's node name, queues and pool size, from Celery's set-up signals."""

    node: str | None = None
    slots: dict[str, int] = {}
    stop = threading.Event()


def _database(app: Any) -> Database:
    settings: Settings = app.aiorch_settings
    return Database(settings)


@celeryd_after_setup.connect
def _remember(sender: str, instance: Any, **_: Any) -> None:
    queues = [q for q in instance.app.amqp.queues.consume_from if q in SLOTTED]
    _Worker.node = sender
    _Worker.slots = {q: int(instance.concurrency or 1) for q in queues}


@worker_ready.connect
def _ready(sender: Any, **_: Any) -> None:
    """Count this worker's slots and fill them; keep them counted while it runs."""
    if _Worker.node is None or not _Worker.slots:
        return
    app = sender.app
    db = _database(app)
    with db.session() as session:
        dispatch.register(session, _Worker.node, _Worker.slots, utcnow())
    rt = Runtime(app.aiorch_settings, app)
    for queue in _Worker.slots:
        fill_slots(rt, app, queue)
    threading.Thread(target=_heartbeat, args=(db,), name="aiorch-slots", daemon=True).start()


def _heartbeat(db: Database) -> None:
    while not _Worker.stop.wait(HEARTBEAT):
        try:
            with db.session() as session:
                dispatch.register(session, _Worker.node or "", _Worker.slots, utcnow())
        except Exception as exc:  # the next beat tries again; the slots count for SLOT_TTL
            log.warning("could not refresh this worker's slots: %s", exc)


@worker_shutdown.connect
def _shutdown(sender: Any = None, **_: Any) -> None:
    _Worker.stop.set()
    if _Worker.node is None or not _Worker.slots or sender is None:
        return
    try:
        db = _database(sender.app)
        with db.session() as session:
            dispatch.forget(session, _Worker.node)
        db.dispose()
    except Exception as exc:  # the slots stop counting after SLOT_TTL anyway
        log.warning("could not give this worker's slots back: %s", exc)
