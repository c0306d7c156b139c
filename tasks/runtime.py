"""What a worker process holds for the job's tasks, and the base class every one of them shares.

``Runtime``: the settings, database, job store, storage, asset store and input fetcher, built in
the process that uses them (after the fork: a child must not reuse its parent's connections) and
kept there, one per settings object. ``JobTask``: late acks and a requeue when the worker process
dies, no result backend, and its process's ``runtime``.

A task whose own job (its first argument) it ended ``failed`` or ``rejected`` ends in Celery's
FAILURE state, raising ``JobFailed`` ("<code>: <message>") after the job's final write, so Flower
and Celery's events count a failed job as a failed task. Celery expects it (``Task.throws``): it is
logged at INFO without a traceback, never retried, and its message is acked like any failure's.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from contextvars import ContextVar
from typing import Any

from billiard.process import current_process
from celery import Task
from celery.exceptions import Reject
from celery.signals import worker_process_init
from sqlalchemy import text

from config import Settings
from models.assets import AssetStore
from models.db import Database, database_unreachable
from models.failures import JobFailure
from models.jobstore import JobStore, Moved
from models.state import JobStatus
from tasks.celery_app import kick_dispatcher
from tasks.inputs import Fetcher, StoredAsset
from tasks.storage import Storage

log = logging.getLogger("aiorch.tasks")


class Runtime:
    """What a worker process needs, built lazily in the process that uses it (after fork).

    With ``app``, every move whose event a webhook wants kicks the dispatcher after its commit;
    without (a test's or a script's runtime), the sweep dispatches those events."""

    def __init__(self, settings: Settings, app: Any = None):
        self.settings = settings
        self.app = app
        self.db = Database(settings)
        self.store = JobStore(self.db, settings.max_attempts, self._kick if app is not None else None)
        self.storage = Storage(settings)
        self.assets = AssetStore(self.db)
        self.fetcher = Fetcher(settings, resolve_asset=self._asset_file)

    def _asset_file(self, asset_id: str, client_id: str) -> StoredAsset | None:
        """The stored file of ``asset://<asset_id>`` for a job of ``client_id``: looked up by id
        AND owner, so another client's asset is missing exactly like a deleted one."""
        row = self.assets.get(client_id, asset_id)
        if row is None:
            return None
        kind, name = row.kind, row.name
        return StoredAsset(row.size, lambda: self.storage.read_file(kind, name))

    def _kick(self, moved: Moved) -> None:
        crash = self.settings.debug_crash_before_dispatch
        if crash and self.settings.debug_tasks and moved.event == crash:
            # The fault tests' crash between a move's commit and its notification.
            os.kill(os.getpid(), signal.SIGKILL)
        kick_dispatcher(self.app, moved.job.id)


_runtimes: dict[int, Runtime] = {}


@worker_process_init.connect
def _forget_parent_runtime(**_: Any) -> None:
    # A forked child must not reuse the parent's database connections.
    _runtimes.clear()


class JobFailed(Exception):
    """The task's job ended ``failed`` or ``rejected``: ``str`` is ``"<code>: <message>"`` of its
    error, which Flower shows as the failed task's exception. Raised only after the job's final
    write; one string argument, so it pickles from a pool process to the worker as it is."""

    @classmethod
    def of(cls, failure: JobFailure) -> JobFailed:
        return cls(f"{failure.code}: {failure.message}")


# The statuses a job's failure turns into a FAILURE of the task that wrote it.
FAILING = frozenset({JobStatus.FAILED, JobStatus.REJECTED})
# Per task call: the jobs it ended failed or rejected (``note_ended``), by id.
_ended: ContextVar[dict[str, JobFailure] | None] = ContextVar("aiorch_jobs_ended", default=None)


def note_ended(job_id: str, failure: JobFailure | None) -> None:
    """Called after a final write that took effect: the running task ended ``job_id`` as
    ``failure`` says (None: it succeeded). ``JobTask`` fails the task when that is its own job."""
    ended = _ended.get()
    if ended is not None and failure is not None and failure.status in FAILING:
        ended[job_id] = failure


# A pool child whose GPU faulted (a sticky CUDA error: its context fails every later call) exits
# with this status after its task, and the pool starts a fresh one in its place.
EXIT_DEVICE_FAULT = 70
_device_faults: list[str] = []


def note_device_fault(job_id: str) -> None:
    """The job ``job_id`` hit a GPU fault that leaves this process's CUDA context broken: once its
    task has written every outcome, the process is replaced (``retire_process``)."""
    _device_faults.append(job_id)


def retire_process() -> None:
    """End this pool child now (the pool replaces it; the message of the task it was running goes
    back to the queue, and a redelivered copy finds its job already ended). Outside a prefork
    pool, where nothing would replace it, the process goes on and says so."""
    jobs = ", ".join(_device_faults)
    _device_faults.clear()
    if not current_process().name.startswith("ForkPoolWorker"):
        log.error("GPU fault in job %s; not a pool process, so it is not replaced", jobs)
        return
    log.critical("GPU fault in job %s: replacing this worker process (pid %d)", jobs, os.getpid())
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(EXIT_DEVICE_FAULT)


# How long a task whose database went away waits for it before it gives its message back anyway
# (it is then delivered again, and waits again): under the run task's soft time limit.
DATABASE_WAIT = 60.0


def wait_for_database(db: Database, limit: float = DATABASE_WAIT) -> bool:
    """Block until the database answers ``SELECT 1`` (True) or ``limit`` seconds pass (False),
    trying again after 0.2 s, then twice as long each time, up to 5 s."""
    deadline = time.monotonic() + limit
    delay = 0.2
    while True:
        try:
            with db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception as exc:
            if not database_unreachable(exc):
                raise
        if time.monotonic() + delay > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


class JobTask(Task):
    """Base of every task of the platform: late acks, requeue when the worker process dies, and a
    FAILURE (``JobFailed``) when the task ended its own job failed or rejected.

    A task that fails because the database is unreachable (a restart, an outage) neither acks nor
    burns its message: it waits until the database answers (``wait_for_database``), meanwhile
    taking no other message (one prefetched message per process), then gives the message back to
    the queue (``Reject(requeue=True)``), so the job runs once the database is back instead of
    being dropped with an acknowledged failure.

    A task whose job hit a GPU fault (``note_device_fault``) ends its process once it is done."""

    abstract = True
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    # Expected: Celery logs it at INFO without a traceback (the job's own log has the error).
    throws = (JobFailed,)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ended: dict[str, JobFailure] = {}
        token = _ended.set(ended)
        try:
            if self.request.called_directly:
                # A direct call (a test, a script, a task run inline by another): Celery's own
                # ``__call__`` gives it a request context.
                result = super().__call__(*args, **kwargs)
            else:
                # In a worker, Celery's tracer already pushed the message's request (delivery info,
                # retries, hostname); calling ``run`` keeps it, as Celery's guide for a custom
                # ``__call__`` says.
                result = self.run(*args, **kwargs)
        except Exception as exc:
            if self.request.called_directly or not database_unreachable(exc):
                raise
            # Not this job's fault: keep the message, wait for the database, give it back.
            log.warning("%s: database unreachable; waiting for it: %s", self.name, exc)
            wait_for_database(self.runtime.db)
            raise Reject("the database was unreachable", requeue=True) from None
        finally:
            _ended.reset(token)
            if _device_faults:
                retire_process()
        job_id = args[0] if args else kwargs.get("job_id")
        failure = ended.get(job_id) if isinstance(job_id, str) else None
        if failure is not None:
            raise JobFailed.of(failure)
        return result

    @property
    def runtime(self) -> Runtime:
        settings: Settings = self.app.aiorch_settings  # type: ignore[attr-defined]
        key = id(settings)
        if key not in _runtimes:
            _runtimes[key] = Runtime(settings, self.app)
        return _runtimes[key]
