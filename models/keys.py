"""API keys: generated with 256 random bits, stored only as SHA-256."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select

from models.db import Database, utcnow
from models.jobs import ApiKey

KEY_PREFIX = "aio_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyRing:
    """Resolves a presented key to its client: static keys from settings, then the database."""

    def __init__(self, db: Database, static_keys: tuple[tuple[str, str], ...] = ()):
        self.db = db
        # Static keys are hashed too, so the comparison below is the same constant-time one.
        self.static = [(client, hash_key(key)) for client, key in static_keys]

    def client_for(self, key: str) -> str | None:
        if not key:
            return None
        digest = hash_key(key)
        for client, stored in self.static:
            if hmac.compare_digest(digest, stored):
                return client
        with self.db.session() as session:
            return session.scalar(
                select(ApiKey.client_id).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
            )

    def create(self, client_id: str, label: str | None = None) -> tuple[ApiKey, str]:
        key = generate_key()
        row = ApiKey(client_id=client_id, key_hash=hash_key(key), prefix=key[:10], label=label)
        with self.db.session() as session:
            session.add(row)
        return row, key

    def list(self) -> list[ApiKey]:
        with self.db.session() as session:
            return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))

    def revoke(self, key_id: int) -> bool:
        with self.db.session() as session:
            row = session.get(ApiKey, key_id)
            if row is None or row.revoked_at is not None:
                return False
            row.revoked_at = utcnow()
            return True

    def any_configured(self) -> bool:
        if self.static:
            return True
        with self.db.session() as session:
            return session.scalar(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)) is not None
