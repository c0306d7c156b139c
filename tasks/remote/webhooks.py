"""Webhooks that providers push to us: Zhinian can send a signed event instead of waiting for the
next poll. The event is verified and triggers one immediate poll; the provider's answer to an
authenticated poll is what finishes the job, and the download happens on a worker, never in the
API process."""

from __future__ import annotations

from typing import Any

from kombu.exceptions import OperationalError
from sqlalchemy import select

from config import Settings
from inference.remote import InvalidWebhookSignature
from models.db import Database
from models.jobs import Job
from models.state import JobStatus
from tasks.remote.common import client_for, schedule_poll


class WebhookRefused(Exception):
    """A provider webhook that is not acted on; ``status`` is the HTTP answer."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def handle_zhinian_webhook(
    settings: Settings, db: Database, app: Any, raw_body: bytes, signature: str | None
) -> str:
    """Verify a Zhinian webhook and poll its job now; returns ``scheduled`` or ``ignored``.

    The body is tried against the webhook secret of every configured Zhinian provider; the one
    whose secret verifies it is the provider the job must be at. Raises ``WebhookRefused``.
    """
    candidates = [
        p
        for p in settings.routes.providers.values()
        if p.kind == "zhinian" and "webhook_secret" in p.credentials
    ]
    for provider in candidates:
        client = client_for(settings, provider.name)
        try:
            _event, result = client.parse_webhook(raw_body, signature)  # type: ignore[attr-defined]
        except InvalidWebhookSignature:
            continue
        except ValueError as exc:
            raise WebhookRefused(400, "invalid_webhook", str(exc)) from None
        with db.session() as session:
            job = session.scalar(
                select(Job).where(
                    Job.backend == provider.name,
                    Job.remote_id == result.remote_id,
                    Job.status == JobStatus.RUNNING.value,
                )
            )
        if job is None or job.claim_token is None:
            # Finished already (by a poll), deleted, or not ours: nothing to do, and a 2xx stops
            # the provider from retrying.
            return "ignored"
        try:
            schedule_poll(app, job, job.claim_token, 0.0, follow_up=False)
        except OperationalError:
            raise WebhookRefused(503, "broker_unavailable", "The job queue is unreachable.") from None
        return "scheduled"
    raise WebhookRefused(401, "invalid_signature", "The webhook signature does not verify.")
