"""The Celery app, built from ``Settings``, and the queue topology.

RabbitMQ carries only job ids. Queues are durable, messages persistent, publishes confirmed;
workers ack late with a prefetch of one, so a message is removed only after its job's outcome is
in Postgres, and a worker that dies mid-job hands its message back to the broker.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from celery import Celery
from kombu import Exchange, Queue
from kombu.exceptions import OperationalError
from kombu.utils.uuid import uuid

from config import QUEUES, Settings
from tasks import fs_transport  # registers its transport alias with kombu

log = logging.getLogger("aiorch.tasks")

EXCHANGE = Exchange("aiorch", type="direct", durable=True)
MAX_PRIORITY = 9

# Every task's name, here where the API and every task module can read them without importing
# one another. Messages in flight name them: a name never changes.
PREPARE = "aiorch.prepare_job"  # tasks/prepare.py
RUN = "aiorch.run_job"  # tasks/run.py
SUBMIT_REMOTE = "aiorch.submit_remote"  # tasks/remote/submit.py
POLL_REMOTE = "aiorch.poll_remote"  # tasks/remote/poll.py
SWEEP = "aiorch.sweep_jobs"  # tasks/sweeps.py
# The dispatcher of a job's logged events (webhooks), kicked after a move that a webhook wants.
DISPATCH = "aiorch.dispatch_events"  # tasks/events.py
# Only messages published before the event log existed still name it (tasks/events.py).
FINISH = "aiorch.finish_job"
DELIVER = "aiorch.deliver_webhook"  # tasks/webhooks.py
# Fill a local engine queue's free slots with waiting jobs in fair order (the argument: the queue).
FILL_SLOTS = "aiorch.fill_slots"  # tasks/scheduling.py
# The modules that define the tasks, and the worker's signal handlers: ``tasks.worker`` imports
# each of them, and a worker started from ``create_celery`` includes them.
TASK_MODULES = (
    "tasks.prepare",
    "tasks.run",
    "tasks.remote.submit",
    "tasks.remote.poll",
    "tasks.sweeps",
    "tasks.events",
    "tasks.webhooks",
    "tasks.diag",
    "tasks.warmup",
    "tasks.revocation",
    "tasks.scheduling",
)


def broker_options(settings: Settings) -> tuple[str, dict[str, Any]]:
    url = settings.broker_url
    if url.startswith("filesystem"):
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        # A host part, which the transport ignores, keeps kombu from warning on every connection.
        return f"{fs_transport.ALIAS}://localhost//", {
            # One folder in and out: every process on this machine shares the same queues.
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
            "processed_folder": str(folder / "processed"),
            # The default 1 s poll adds a second to every hop of a job's pipeline.
            "polling_interval": settings.broker_poll_interval,
        }
    if url.startswith(("amqp", "pyamqp")):
        return url, {"confirm_publish": True, "max_retries": 2}
    return url, {}


def queue_topology() -> list[Queue]:
    return [
        Queue(
            name, EXCHANGE, routing_key=name, durable=True, queue_arguments={"x-max-priority": MAX_PRIORITY}
        )
        for name in QUEUES
    ]


def create_celery(settings: Settings) -> Celery:
    url, transport_options = broker_options(settings)
    app = Celery("aiorch", broker=url, set_as_current=True)
    app.conf.update(
        task_queues=queue_topology(),
        task_default_queue="cpu",
        task_default_exchange=EXCHANGE.name,
        task_default_routing_key="cpu",
        task_default_delivery_mode="persistent",
        task_routes={name: {"queue": "cpu"} for name in (PREPARE, FINISH, SWEEP, DISPATCH)},
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        # Postgres holds every result; Celery's result backend is not used.
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        # Events let Flower and /diag/backends see workers and tasks. No "sent" event: it would
        # cost every POST /v1/jobs a second confirmed publish (workers still report received,
        # started and succeeded).
        worker_send_task_events=True,
        task_send_sent_event=False,
        # ... published without waiting for the broker's confirm (``tasks.consumer``).
        worker_consumer="tasks.consumer:Consumer",
        enable_utc=True,
        timezone="UTC",
        beat_schedule={
            "sweep-jobs": {"task": SWEEP, "schedule": timedelta(seconds=30), "options": {"queue": "cpu"}},
        },
        include=list(TASK_MODULES),
    )
    app.aiorch_settings = settings  # type: ignore[attr-defined]
    return app


# Publisher retries: a client waiting on POST /v1/jobs gets a 503 in about a second rather than
# hanging while the broker is away.
RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.3, "interval_max": 0.5}


def task_id_for(job_id: str, task_name: str) -> str:
    """A message's Celery task id: ``<job_id>.<step>.<12 random hex digits>`` (``step``: the task's
    name without ``aiorch.`` and its second word, e.g. ``run``), so Flower's list, its search and
    the worker's log show which job a task is about. Still unique per message, as Celery expects:
    a revoke names one message, and nothing dedups by task id (a job's claim does)."""
    step = task_name.removeprefix("aiorch.").split("_")[0]
    return f"{job_id}.{step}.{uuid().replace('-', '')[:12]}"


def task_message(
    app: Celery,
    task_name: str,
    job_id: str,
    task_kwargs: dict[str, Any] | None = None,
    *,
    countdown: float | None = None,
    soft_time_limit: float | None = None,
    time_limit: float | None = None,
) -> tuple[str, Any]:
    """One job id's message, exactly as Celery's ``send_task`` builds it (``amqp.as_task_v2``):
    its task id (``task_id_for``) and the ``(headers, properties, body, sent_event)`` tuple.
    ``publish`` sends one; ``tasks.bulk_publish`` sends many on one confirmed channel."""
    task_id = task_id_for(job_id, task_name)
    kwargs = task_kwargs or {}
    message = app.amqp.as_task_v2(
        task_id,
        task_name,
        args=[job_id],
        kwargs=kwargs,
        countdown=countdown,
        soft_time_limit=soft_time_limit,
        time_limit=time_limit,
        argsrepr=repr([job_id]),
        kwargsrepr=repr(kwargs),
    )
    return task_id, message


def publish(
    app: Celery,
    task_name: str,
    job_id: str,
    queue: str,
    priority: int = 0,
    task_kwargs: dict[str, Any] | None = None,
    *,
    countdown: float | None = None,
    soft_time_limit: float | None = None,
    time_limit: float | None = None,
) -> Any:
    """Send one job id to a queue; raises kombu's OperationalError when the broker is down.
    Returns Celery's ``AsyncResult`` (the platform keeps results in its own tables, not there).

    The message is Celery's own (``amqp.as_task_v2``), sent by Celery's own sender on a pooled
    producer, with the queue declared and the publish confirmed; what ``send_task`` adds on top
    (routing by name, merging a registered task's options, parent links) is skipped: the queue is
    always named here, and on a 2-core API host that part cost more than the publish itself.
    """
    task_id, message = task_message(
        app,
        task_name,
        job_id,
        task_kwargs,
        countdown=countdown,
        soft_time_limit=soft_time_limit,
        time_limit=time_limit,
    )
    with app.producer_or_acquire() as producer, producer.connection._reraise_as_library_errors():
        app.amqp.send_task_message(
            producer,
            task_name,
            message,
            queue=queue,
            exchange=EXCHANGE.name,
            routing_key=queue,
            priority=max(0, min(MAX_PRIORITY, priority)),
            retry=True,
            retry_policy=RETRY_POLICY,
        )
    return app.AsyncResult(task_id)


def kick_dispatcher(app: Celery, job_id: str) -> None:
    """Ask the cpu queue to dispatch the job's new events now. The events are in the database
    already: a kick the broker does not take is only late, the sweep dispatches what it left."""
    try:
        publish(app, DISPATCH, job_id, "cpu")
    except (OperationalError, OSError):
        log.warning("events of %s left to the sweep: broker unavailable", job_id)


def ask_to_fill(app: Celery, queue: str) -> None:
    """Ask the cpu queue to fill ``queue``'s free slots with waiting jobs (``tasks.scheduling``).
    A request the broker does not take is only late: the sweep fills every queue's slots."""
    try:
        publish(app, FILL_SLOTS, queue, "cpu")
    except (OperationalError, OSError):
        log.warning("slots of %s left to the sweep to fill: broker unavailable", queue)
