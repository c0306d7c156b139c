"""Persistence: SQLAlchemy models, sessions, migrations and the job state machine."""

from models.db import Base, Database, utcnow
from models.jobs import ApiKey, Job, StoredFile, WebhookDelivery, WebhookEvent, WebhookSecret
from models.state import FINAL_STATUSES, IllegalTransition, JobStatus, transition

__all__ = [
    "FINAL_STATUSES",
    "ApiKey",
    "Base",
    "Database",
    "IllegalTransition",
    "Job",
    "JobStatus",
    "StoredFile",
    "WebhookDelivery",
    "WebhookEvent",
    "WebhookSecret",
    "transition",
    "utcnow",
]
