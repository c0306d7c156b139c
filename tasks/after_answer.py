"""A submitted job's message, published just after its ``202`` is on its way (the API's side).

A job that got its slot at submit is committed, with ``dispatched_at`` set, before anything is
published: Postgres holds it whatever becomes of the message. Waiting in the request for the
broker's publisher confirm before answering made every submit as slow as the broker, and a client
polling the job learned of it later than it could have. So while the broker is known to answer
(a publish of this process succeeded in the last ``FRESH`` seconds and none has failed since), the
request hands the message to this process's publisher thread and answers at once; the thread
publishes it (confirmed, as before) moments later, in submit order.

When the broker refuses one: the job waits for its slot again (``dispatch.withdraw``, as the
dispatcher does), so the next fill of its queue sends it (a run's end, a worker's start, the
sweep); nothing is lost and nothing is sent twice. From then on, and after ``FRESH`` seconds with
no publish at all, submits publish in the request as before, so a broker that is down is answered
``503`` + ``Retry-After`` and no job is kept. An API process killed between its answer and the
publish leaves the job marked sent: the re-publish sweep sends it after ``AIORCH_REPUBLISH_AFTER``,
the same window as a process killed between COMMIT and publish.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any

from kombu.exceptions import OperationalError

from config import Settings
from models import dispatch
from models.db import Database
from models.jobs import Job
from tasks.bulk_publish import publish_batch
from tasks.next_step import send_next

log = logging.getLogger("aiorch.api")

FRESH = 10.0  # seconds a successful publish vouches for the broker
BATCH = 500  # messages published as one confirmed batch when submits come faster than confirms


class AfterAnswer:
    """This API process's publisher of submitted jobs' messages (one thread, started on first use
    in each process: gunicorn forks after the app is built)."""

    def __init__(self, app: Any, settings: Settings, db: Database):
        self.app, self.settings, self.db = app, settings, db
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._last_ok = float("-inf")
        self._failing = False

    def broker_answers(self) -> bool:
        """Whether a submit may answer before its publish: the broker took one lately, none failed since."""
        return not self._failing and time.monotonic() - self._last_ok < FRESH

    def published(self) -> None:
        """A publish of this process (in a request) succeeded."""
        self._last_ok, self._failing = time.monotonic(), False

    def refused(self) -> None:
        """A publish of this process failed: submits publish in their request until one succeeds."""
        self._failing = True

    def send(self, job: Job) -> None:
        """Publish ``job``'s next step from the publisher thread, after the caller answered."""
        self._ensure_thread()
        self._jobs.put(job)

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="aiorch-after-answer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            jobs = [self._jobs.get()]
            while len(jobs) < BATCH:  # what queued meanwhile goes out with it, confirmed once
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            try:
                if len(jobs) == 1:  # the kept channel; a batch opens one of its own
                    send_next(self.app, self.settings, jobs[0])
                else:
                    publish_batch(self.app, self.settings, jobs)
            except (OperationalError, OSError) as exc:
                self.refused()
                self._withdraw(jobs, exc)
            except Exception:  # never let one message end the thread: the sweep re-publishes it
                log.exception(
                    "publishing jobs %s failed; the re-publish sweep will send them", [j.id for j in jobs]
                )
            else:
                self.published()

    def _withdraw(self, jobs: list[Job], exc: Exception) -> None:
        ids = [job.id for job in jobs]
        try:
            with self.db.session() as session:
                dispatch.withdraw(session, jobs)
            log.warning("broker unreachable (%s); jobs %s wait for their slots again", exc, ids)
        except Exception:  # the database too: they stay marked sent, for the re-publish sweep
            log.exception("jobs %s not withdrawn; the re-publish sweep will send them", ids)
