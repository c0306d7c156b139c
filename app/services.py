"""What the API process holds: settings, database, key ring, Celery publisher, storage."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery

from config import Settings
from models.db import Database
from models.jobstore import JobStore
from models.keys import KeyRing
from tasks.storage import Storage


@dataclass
class Services:
    settings: Settings
    db: Database
    store: JobStore
    keyring: KeyRing
    celery: Celery
    storage: Storage

    @classmethod
    def build(cls, settings: Settings, celery: Celery | None = None) -> Services:
        from tasks.celery_app import create_celery

        db = Database(settings)
        return cls(
            settings=settings,
            db=db,
            store=JobStore(db, settings.max_attempts),
            keyring=KeyRing(db, settings.api_keys),
            celery=celery or create_celery(settings),
            storage=Storage(settings),
        )
