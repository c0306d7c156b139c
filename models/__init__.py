"""Persistence: SQLAlchemy models, sessions, migrations and the job lifecycle."""

from models.db import Base, Database, utcnow
from models.jobs import ApiKey, Job, JobEvent, StoredFile, WebhookDelivery, WebhookEvent, WebhookSecret
from models.state import FINAL_STATUSES, IllegalTransition, JobStatus, Phase, State

__all__ = [
    "FINAL_STATUSES",
    "ApiKey",
    "Base",
    "Database",
    "IllegalTransition",
    "Job",
    "JobEvent",
    "JobStatus",
    "Phase",
    "State",
    "StoredFile",
    "WebhookDelivery",
    "WebhookEvent",
    "WebhookSecret",
    "utcnow",
]
