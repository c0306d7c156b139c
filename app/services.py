"""What the API process holds: settings, database, key ring, Celery publisher, storage."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from flask import current_app

from config import Settings
from models.db import Database
from models.jobstore import JobStore
from models.keys import KeyRing
from tasks.after_answer import AfterAnswer
from tasks.storage import Storage


@dataclass
class Services:
    settings: Settings
    db: Database
    store: JobStore
    keyring: KeyRing
    celery: Celery
    storage: Storage
    after_answer: AfterAnswer

    @classmethod
    def build(cls, settings: Settings, celery: Celery | None = None) -> Services:
        from tasks.celery_app import create_celery, kick_dispatcher

        db = Database(settings)
        celery = celery or create_celery(settings)
        return cls(
            settings=settings,
            db=db,
            # A move a webhook wants (a cancel) kicks the dispatcher once it is committed.
            store=JobStore(db, settings.max_attempts, lambda moved: kick_dispatcher(celery, moved.job.id)),
            keyring=KeyRing(db, settings.api_keys, settings.admin_keys),
            celery=celery,
            storage=Storage(settings),
            after_answer=AfterAnswer(celery, settings, db),
        )


def current_services() -> Services:
    """The services of the app handling the current request (``create_app`` put them there)."""
    services: Services = current_app.extensions["aiorch"]
    return services
