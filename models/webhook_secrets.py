"""Each client's webhook signing secret (Standard Webhooks ``whsec_<base64>``), and its rotation.

A client's first secret is derived from the operator's master ``AIORCH_WEBHOOK_SECRET``:
HMAC-SHA256(master key, ``"aiorch-webhook:" + client_id``). It needs no row, is the same in every
process and after every restart, and tells nothing about the master or about any other client's
secret. Once a client rotates, its secret is a random one stored in ``webhook_secrets``; the one
before stays in ``previous_secret`` and keeps signing (as a second signature) until
``rotated_at`` + ``AIORCH_WEBHOOK_SECRET_GRACE``, so receivers can switch over without losing an
event.

With no master configured, a client's first secret is random and stored on first use, so every
delivery is still signed, per client: an unsigned delivery is one anybody could forge.

The master itself never leaves this module: nothing here returns it, only keys derived from it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from datetime import datetime, timedelta

from sqlalchemy import update

from config import Settings
from models.db import Database, insert_or_ignore, utcnow
from models.jobs import WebhookSecret

PREFIX = "whsec_"
KEY_BYTES = 32
DERIVATION_LABEL = b"aiorch-webhook:"


def signing_key(secret: str) -> bytes:
    """Standard Webhooks keys are base64, usually behind ``whsec_``; the verifier libraries
    decode a key without the prefix the same way, so both sign alike (Settings refuses a master
    that is not base64)."""
    return base64.b64decode(secret.removeprefix(PREFIX), validate=True)


def _encode(key: bytes) -> str:
    return PREFIX + base64.b64encode(key).decode()


def new_secret() -> str:
    return _encode(os.urandom(KEY_BYTES))


def derived_secret(master: str, client_id: str) -> str:
    """The secret a client has before its first rotation. HMAC is a PRF: knowing one client's
    derived secret gives nothing about another's, nor about the master."""
    digest = hmac.new(signing_key(master), DERIVATION_LABEL + client_id.encode(), hashlib.sha256).digest()
    return _encode(digest)


class WebhookSecrets:
    """Read, create and rotate clients' signing secrets."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings

    def _first(self, client_id: str) -> str:
        """A client's secret before any row exists: derived, or (no master) a fresh random one."""
        master = self.settings.webhook_secret
        return derived_secret(master, client_id) if master else new_secret()

    def current(self, client_id: str) -> str:
        """The secret that signs the client's deliveries now (the one to give the client)."""
        return self._row(client_id).secret

    def signing_secrets(self, client_id: str, now: datetime | None = None) -> list[str]:
        """The secrets a delivery is signed with: the current one, then the previous one while
        the grace period after a rotation lasts."""
        row = self._row(client_id)
        now = now or utcnow()
        grace = timedelta(seconds=self.settings.webhook_secret_grace)
        if row.previous_secret and row.rotated_at is not None and now < row.rotated_at + grace:
            return [row.secret, row.previous_secret]
        return [row.secret]

    def rotate(self, client_id: str) -> str:
        """Give the client a new random secret and keep the old one for the grace period.

        Writes only, no read before them: the first statement makes sure a row exists (holding
        the client's first secret), the second swaps in one atomic UPDATE. Two rotations racing
        each other both succeed: the later one's old secret is the earlier one's new secret, which
        therefore still verifies during the grace period."""
        secret = new_secret()
        with self.db.writing() as session:
            insert_or_ignore(
                session, WebhookSecret, {"client_id": client_id, "secret": self._first(client_id)}
            )
            session.execute(
                update(WebhookSecret)
                .where(WebhookSecret.client_id == client_id)
                .values(previous_secret=WebhookSecret.secret, secret=secret, rotated_at=utcnow())
            )
        return secret

    def _row(self, client_id: str) -> WebhookSecret:
        """The client's stored row, or a transient one holding its derived secret. Without a
        master the first secret must be stored before it is used, or every process would sign with
        its own: insert-or-ignore, then read back whichever insert won."""
        with self.db.session() as session:
            row = session.get(WebhookSecret, client_id)
        if row is not None:
            return row
        if self.settings.webhook_secret:
            return WebhookSecret(client_id=client_id, secret=self._first(client_id))
        with self.db.writing() as session:
            insert_or_ignore(session, WebhookSecret, {"client_id": client_id, "secret": new_secret()})
            stored = session.get(WebhookSecret, client_id)
        assert stored is not None  # inserted just now, or by the process that won the race
        return stored
