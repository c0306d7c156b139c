"""What a Celery revoke of a job's task does to the job: Flower's Revoke and Terminate buttons,
``celery control revoke``, ``app.control.revoke(task_id, terminate=...)``.

A revoke names a task id, and every worker keeps it in its set of revoked ids. The job the task
carries (its first argument) ends ``cancelled``, ``error.code`` ``revoked_by_operator`` (the
``revoke`` move: from any live state, whoever holds the claim), when a worker

- discards the revoked message instead of running it (it was queued, or reserved by the worker):
  Celery's ``task_revoked`` signal;
- terminates the task's pool process (``terminate=True``): the same signal. Celery acks the
  message first, so the broker never hands it out again, and the sweep leaves a final job alone;
- has the task running and the revoke does not terminate it: the ``revoke`` control command,
  wrapped here. The run reads the job final at its next step and stops (``JobControl``), and its
  outputs are discarded by the fenced finish.

Only the pipeline's tasks (prepare, run, submit, poll) stand for their job; revoking a webhook's
delivery or the sweep ends nothing. A revoke that reaches no worker holding the message (a worker
restarted before it received it forgets the revoke) ends nothing either: cancel through the API.

This runs in the worker's main process, where Celery handles signals of revoked tasks and control
commands: with a database engine of its own, disposed before it returns, so no pool process forked
later inherits a connection of it; a failure is logged and never reaches Celery's consumer.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from celery.signals import task_revoked
from celery.utils.functional import maybe_list
from celery.worker import state as worker_state
from celery.worker.control import Panel, control_command

from config.routes import LOCAL
from inference.remote import build_client
from models.jobs import Job
from models.state import REMOTE_STATES
from tasks.celery_app import POLL_REMOTE, PREPARE, RUN, SUBMIT_REMOTE
from tasks.outbound import tls_context
from tasks.remote.provider_inputs import delete_public_copies
from tasks.runtime import Runtime

log = logging.getLogger("aiorch.tasks")

# The tasks that stand for their job: revoking one ends the job.
PIPELINE_TASKS = frozenset({PREPARE, RUN, SUBMIT_REMOTE, POLL_REMOTE})
# A provider's cancel of a revoked remote job may hold up the worker's consumer this long at most.
PROVIDER_CANCEL_SECONDS = 5.0


def job_of(task_name: str | None, args: Any) -> str | None:
    """The job a message of ``task_name`` with ``args`` stands for, or None."""
    if task_name not in PIPELINE_TASKS or not args:
        return None
    first = list(args)[0]
    return first if isinstance(first, str) else None


def cancel_revoked(app: Any, job_id: str, *, still_running: bool = False) -> bool:
    """End the job ``cancelled`` (``revoked_by_operator``) unless it is final already; True when
    this call ended it. ``still_running``: the revoked task goes on running the job here (a revoke
    without terminate), and removes the job's inputs itself once it stops."""
    rt: Runtime | None = None
    try:
        rt = Runtime(app.aiorch_settings, app)
        before = rt.store.get(job_id)
        if before is None or rt.store.revoke(job_id) is None:
            return False
        log.warning("job %s cancelled: an operator revoked its task", job_id)
        if any(before.stage == state.phase.value for state in REMOTE_STATES):
            _cancel_at_provider(rt, before)
            delete_public_copies(rt, job_id)
        if not still_running:
            rt.storage.remove_inputs(job_id)
        return True
    except Exception:  # the consumer that called this must go on whatever happened here
        log.exception("cancelling job %s after its task was revoked failed", job_id)
        return False
    finally:
        if rt is not None:
            rt.db.dispose()


def _cancel_at_provider(rt: Runtime, job: Job) -> None:
    """Best effort: ask the provider to drop the revoked job (it may bill for a job nobody waits
    for any more); whatever it answers, the job stays cancelled here."""
    provider = rt.settings.routes.providers.get(job.backend or "")
    if provider is None or not job.remote_id or job.backend == LOCAL:
        return
    client = build_client(provider.kind, **provider.client_kwargs(), ssl_context=tls_context(rt.settings))
    try:
        budget = getattr(client, "time_budget", None)
        with budget(PROVIDER_CANCEL_SECONDS) if budget is not None else contextlib.nullcontext():
            client.cancel(job.remote_id)
    except Exception as exc:  # best effort, as the poll's own cancel
        log.warning("provider cancel of revoked job %s failed: %s", job.id, exc)
    finally:
        close = getattr(client, "close", None)
        if close is not None:
            close()


@task_revoked.connect
def _job_task_revoked(
    sender: Any = None, request: Any = None, terminated: bool = False, expired: bool = False, **_: Any
) -> None:
    """A worker discarded a revoked message, or terminated the process running it."""
    if sender is None or expired:
        return  # an expired message is not an operator's revoke (and no task here sets expires)
    job_id = job_of(getattr(sender, "name", None), getattr(request, "args", None))
    if job_id is not None and cancel_revoked(sender.app, job_id):
        how = "terminated" if terminated else "discarded"
        log.info("revoked %s of job %s (%s)", sender.name, job_id, how)


class _NoResultBackendNoise(logging.Filter):
    """Celery's revoke tries to mark the task revoked in the result backend, and warns that it
    "failed" on every worker when there is none (this platform keeps results in Postgres): a
    warning that reads as if the revoke itself failed, so it is left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No result backend is configured" not in record.getMessage()


logging.getLogger("celery.worker.control").addFilter(_NoResultBackendNoise())
_celery_revoke = Panel.data["revoke"]


@control_command(variadic="task_id", signature="[id1 [id2 [... [idN]]]]")
def revoke(state: Any, task_id: Any, terminate: bool = False, signal: Any = None, **kwargs: Any) -> Any:
    """Celery's ``revoke``, and the job of a pipeline task running here that the revoke does not
    terminate ends at once (a terminated or discarded one ends by ``task_revoked``)."""
    ids = set(maybe_list(task_id) or [])
    running = [] if terminate else [r for r in list(worker_state.active_requests) if r.id in ids]
    reply = _celery_revoke(state, task_id, terminate=terminate, signal=signal, **kwargs)
    for request in running:
        job_id = job_of(request.name, request.args)
        if job_id is not None:
            cancel_revoked(state.consumer.app, job_id, still_running=True)
    return reply
