"""What a worker process holds for the job's tasks, and the base class every one of them shares.

``Runtime``: the settings, database, job store, storage, asset store and input fetcher, built in
the process that uses them (after the fork: a child must not reuse its parent's connections) and
kept there, one per settings object. ``JobTask``: late acks and a requeue when the worker process
dies, no result backend, and its process's ``runtime``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from celery import Task
from celery.signals import worker_process_init

from config import Settings
from models.assets import AssetStore
from models.db import Database
from models.jobstore import JobStore, Moved
from tasks.celery_app import kick_dispatcher
from tasks.inputs import Fetcher
from tasks.storage import Storage


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
        self.fetcher = Fetcher(settings, resolve_asset=self._asset_path)

    def _asset_path(self, asset_id: str, client_id: str) -> Path | None:
        """The file of ``asset://<asset_id>`` for a job of ``client_id``: looked up by id AND
        owner, so another client's asset is missing exactly like a deleted one."""
        row = self.assets.get(client_id, asset_id)
        return None if row is None else self.storage.asset_path(row.kind, row.name)

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


class JobTask(Task):
    """Base of every task of the platform: late acks, requeue when the worker process dies."""

    abstract = True
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True

    @property
    def runtime(self) -> Runtime:
        settings: Settings = self.app.aiorch_settings  # type: ignore[attr-defined]
        key = id(settings)
        if key not in _runtimes:
            _runtimes[key] = Runtime(settings, self.app)
        return _runtimes[key]
