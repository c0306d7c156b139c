"""Assets: the stored files a client owns (``stored_files`` rows with an ``asset_id``).

Two kinds share the table: a job's outputs (``output``, also served at ``/files/<name>``) and the
client's uploads (``upload``: multipart, a registered URL, or a large ``data:`` input turned into
an asset at submit). Every read here takes the owner: another client's asset is found exactly as
often as one that does not exist, never. A row past its ``expires_at`` is gone for readers even
before the sweep deletes it.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, text
from sqlalchemy.orm import Session

from models.db import Database, on_postgres, utcnow
from models.jobs import StoredFile

OUTPUT = "output"
UPLOAD = "upload"
ASSET_ID_RE = re.compile(r"^[0-9a-f]{32}$")


class QuotaExceeded(Exception):
    """The client's uploads would pass its storage quota."""

    def __init__(self, used: int, adding: int, quota: int):
        super().__init__(f"{used} + {adding} bytes would pass the quota of {quota} bytes")
        self.used = used
        self.adding = adding
        self.quota = quota


def new_asset_id() -> str:
    """128 random bits, unrelated to the file's storage name."""
    return secrets.token_hex(16)


def output_asset(
    name: str, job_id: str, client_id: str, content_type: str, size: int, width: Any, height: Any
) -> StoredFile:
    """A job output's row, also an asset of the job's client under an id of its own: the file's
    name is public through ``/files``, the asset id is what ``asset://`` takes."""
    return StoredFile(
        name=name,
        asset_id=new_asset_id(),
        kind=OUTPUT,
        job_id=job_id,
        client_id=client_id,
        filename=name,
        content_type=content_type,
        size=size,
        width=width if isinstance(width, int) else None,
        height=height if isinstance(height, int) else None,
    )


def stamps(now: datetime, count: int) -> list[datetime]:
    """``count`` creation times one microsecond apart from ``now``: listings page by
    ``before=<created_at>``, and files sharing one instant would be skipped when a page ends
    between them."""
    return [now + timedelta(microseconds=index) for index in range(count)]


def _live(now: datetime) -> Any:
    return or_(StoredFile.expires_at.is_(None), StoredFile.expires_at > now)


class AssetStore:
    """Reads and writes of one database's assets, always for one owner."""

    def __init__(self, db: Database):
        self.db = db

    def get(self, client_id: str, asset_id: str) -> StoredFile | None:
        """The client's live asset, or None (not an id, missing, expired, or another's)."""
        if not ASSET_ID_RE.fullmatch(asset_id):
            return None  # not looked up: a NUL byte would make the driver raise
        with self.db.session() as session:
            return session.scalar(
                select(StoredFile).where(
                    StoredFile.asset_id == asset_id,
                    StoredFile.client_id == client_id,
                    _live(utcnow()),
                )
            )

    def page(
        self, client_id: str, limit: int, before: datetime | None = None
    ) -> tuple[list[StoredFile], bool]:
        """The client's live assets, newest first: up to ``limit`` and whether more follow."""
        query = select(StoredFile).where(
            StoredFile.client_id == client_id, StoredFile.asset_id.is_not(None), _live(utcnow())
        )
        if before is not None:
            query = query.where(StoredFile.created_at < before)
        query = query.order_by(StoredFile.created_at.desc(), StoredFile.asset_id.desc()).limit(limit + 1)
        with self.db.session() as session:
            rows = list(session.scalars(query))
        return rows[:limit], len(rows) > limit

    def add_uploads(self, rows: Sequence[StoredFile], quota: int, retention: float | None) -> None:
        """INSERT upload rows of one client, all or none, within its quota (0 = none).

        The quota is checked and the rows written in one transaction that holds a per-client lock
        (Postgres: an advisory lock; SQLite writes one at a time anyway), so two uploads racing
        cannot both squeeze under it. Raises ``QuotaExceeded``.
        """
        if not rows:
            return
        client_id = rows[0].client_id
        now = utcnow()
        expires = now + timedelta(seconds=retention) if retention else None
        with self.db.writing() as session:
            if quota:
                self._lock_client(session, client_id)
                used = self.upload_bytes(session, client_id, now)
                adding = sum(row.size for row in rows)
                if used + adding > quota:
                    raise QuotaExceeded(used, adding, quota)
            for row, created in zip(rows, stamps(now, len(rows)), strict=True):
                row.kind = UPLOAD
                row.created_at = created
                row.expires_at = expires
            session.add_all(rows)

    @staticmethod
    def upload_bytes(session: Session, client_id: str, now: datetime | None = None) -> int:
        """Bytes of the client's live uploads (what its quota counts)."""
        return int(
            session.scalar(
                select(func.coalesce(func.sum(StoredFile.size), 0)).where(
                    StoredFile.client_id == client_id,
                    StoredFile.kind == UPLOAD,
                    _live(now or utcnow()),
                )
            )
            or 0
        )

    @staticmethod
    def _lock_client(session: Session, client_id: str) -> None:
        if on_postgres(session):
            # Released at COMMIT or ROLLBACK; hashtext spreads clients over the lock space.
            session.execute(
                text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"assets:{client_id}"}
            )

    def delete(self, client_id: str, asset_id: str) -> StoredFile | None:
        """Delete the client's asset row; returns it (to unlink its file), or None if not its."""
        if not ASSET_ID_RE.fullmatch(asset_id):
            return None
        with self.db.session() as session:
            row = session.scalar(
                select(StoredFile).where(
                    StoredFile.asset_id == asset_id, StoredFile.client_id == client_id, _live(utcnow())
                )
            )
            if row is not None:
                session.delete(row)
            return row

    def discard(self, names: Sequence[str]) -> None:
        """Delete rows by storage name (uploads made for a request that then failed)."""
        if names:
            with self.db.session() as session:
                session.query(StoredFile).filter(StoredFile.name.in_(list(names))).delete()
