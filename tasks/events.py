"""The dispatcher: the jobs' event log feeds every webhook.

``models.lifecycle`` writes one event per move, and an event a webhook wants is written pending.
``dispatch`` takes a job's pending events (``models.outbox``: one conditional UPDATE, so a kick and
the sweep never both get one) and hands them to delivery (``tasks.webhooks``), each body composed
once, here, and stored. It runs in the ``dispatch_events`` task, kicked after the move's commit,
and the sweep runs ``dispatch_left_over`` for what a lost kick left and ``unattempted_events`` for
what a dispatcher that died after taking them left, so a crash between a commit and its
notification loses nothing. No other code path sends a job's webhook (but a manual redelivery).
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from celery import shared_task
from sqlalchemy import exists, select

from models import outbox
from models.db import insert_or_ignore, utcnow
from models.jobs import JobEvent, WebhookDelivery, WebhookEvent
from models.outbox import LoggedEvent
from models.public import iso
from models.state import FINAL_STATUSES
from tasks.celery_app import DELIVER, DISPATCH, FINISH, publish
from tasks.runtime import JobTask, Runtime
from tasks.webhooks import FINISHED, deliver_webhook, finished_event_id, schedule_event

# A stored event without any attempt this long after it was dispatched is sent by the sweep.
LOST_AFTER = 120.0


def webhook_event_id(job_id: str, seq: int, event: str) -> str:
    """The ``webhook-id`` of a logged event: 32 hex, the same however often it is dispatched
    (``job.finished`` keeps its one id per job, ``finished_event_id``)."""
    if event == FINISHED:
        return finished_event_id(job_id)
    return hashlib.sha256(f"{job_id}:{seq}:{event}".encode()).hexdigest()[:32]


def _logged_body(event: LoggedEvent, event_id: str) -> str:
    """The seed 000 body of a logged event: its job object (as the move left the job) with the
    event fields, and ``predictTime``."""
    body = {"event": event.type, "event_id": event_id, "ts": iso(utcnow()), **event.data}
    body["predictTime"] = event.data.get("predict_time")
    return json.dumps(body, separators=(",", ":"))


def _hand_over(session: Any, events: list[LoggedEvent]) -> list[tuple[str, str]]:
    """Store each taken event as a webhook event (its body composed once, here), in the
    transaction that marks it dispatched; returns (job id, event id) pairs to deliver."""
    handed = []
    for event in events:
        event_id = webhook_event_id(event.job_id, event.seq, event.type)
        values = {"event_id": event_id, "job_id": event.job_id, "event": event.type, "created_at": utcnow()}
        insert_or_ignore(session, WebhookEvent, {**values, "body": _logged_body(event, event_id)})
        handed.append((event.job_id, event_id))
    return handed


def dispatch(rt: Runtime, app: Any, job_id: str, inline: bool = False) -> int:
    """The dispatcher: hand the job's pending events (``models.outbox``) to webhook delivery, in
    their order; returns how many. ``inline``: make each first attempt here, for a caller on the
    cpu queue (the dispatch task), one broker hop fewer between a move and its webhook.

    Taking an event and storing its webhook body commit together; an attempt that then never
    happens (a crash, the broker away) is sent by the sweep (``unattempted_events``)."""
    with rt.db.writing() as session:
        handed = _hand_over(session, outbox.take_pending(session, job_id, utcnow()))
    for owner, event_id in handed:
        if inline:
            deliver_webhook(owner, event_id)  # a direct call runs the task body here, synchronously
        else:
            publish(app, DELIVER, owner, "cpu", task_kwargs={"event_id": event_id, "attempt": 1})
    return len(handed)


def dispatch_left_over(rt: Runtime, app: Any, older_than: float) -> int:
    """Sweep: dispatch the events still pending ``older_than`` seconds after their move, whose
    kick was lost (the process died between the commit and the kick, or the broker was away)."""
    now = utcnow()
    with rt.db.writing() as session:
        handed = _hand_over(session, outbox.take_left_over(session, now, now - timedelta(seconds=older_than)))
    for owner, event_id in handed:
        publish(app, DELIVER, owner, "cpu", task_kwargs={"event_id": event_id, "attempt": 1})
    return len(handed)


def unattempted_events(rt: Runtime, app: Any, older_than: float = LOST_AFTER, window: float = 86400.0) -> int:
    """Sweep: publish the first attempt of stored events that never had one (a dispatcher that
    died after taking them, a broker away at that moment). An event merely slow in the queue is
    harmless to send again: a second first attempt of an event already attempted is dropped."""
    now = utcnow()
    with rt.db.session() as session:
        rows = session.execute(
            select(WebhookEvent.job_id, WebhookEvent.event_id)
            .where(
                WebhookEvent.created_at < now - timedelta(seconds=older_than),
                WebhookEvent.created_at > now - timedelta(seconds=window),
                ~exists().where(WebhookDelivery.event_id == WebhookEvent.event_id),
            )
            .limit(500)
        ).all()
    for job_id, event_id in rows:
        publish(app, DELIVER, job_id, "cpu", task_kwargs={"event_id": event_id, "attempt": 1})
    return len(rows)


@shared_task(bind=True, base=JobTask, name=DISPATCH, queue="cpu", soft_time_limit=60, time_limit=90)
def dispatch_events(self: JobTask, job_id: str) -> None:
    """Kicked after a move whose event a webhook wants: dispatch the job's pending events, making
    their first attempts here (under the same per-receiver breaker and timeouts)."""
    dispatch(self.runtime, self.app, job_id, inline=True)


@shared_task(bind=True, base=JobTask, name=FINISH, queue="cpu", soft_time_limit=60, time_limit=90)
def finish_job(self: JobTask, job_id: str) -> None:
    """A finish message published before the event log existed (a rolling upgrade): the job's
    pending events are dispatched; a job that ended before its moves were logged gets its
    ``job.finished`` composed from its row, as then."""
    rt = self.runtime
    rt.storage.remove_inputs(job_id)
    if dispatch(rt, self.app, job_id, inline=True):
        return
    with rt.db.session() as session:
        logged = session.scalar(select(exists().where(JobEvent.job_id == job_id, JobEvent.type == FINISHED)))
    job = None if logged else rt.store.get(job_id)
    if job is not None and job.status in FINAL_STATUSES:
        schedule_event(rt.db, self.app, job, now=True)
