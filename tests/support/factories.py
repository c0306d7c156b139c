"""Rows the tests need, built one way: a queued upscale job of client alice unless told otherwise."""

from __future__ import annotations

from models.db import Database, utcnow
from models.jobs import Job
from models.jobstore import new_id


def make_job(db: Database, **overrides: object) -> str:
    """INSERT a job (committed) and return its id; ``overrides`` set any column."""
    now = utcnow()
    values: dict[str, object] = dict(
        id=new_id(),
        client_id="alice",
        task="upscale",
        engine_task="upscale",
        queue="gpu.superres",
        status="queued",
        stage="run",
        progress=0,
        priority=0,
        payload={},
        meta={},
        attempts=0,
        cancel_requested=False,
        created_at=now,
        queued_at=now,
        updated_at=now,
    )
    values.update(overrides)
    with db.session() as session:
        session.add(Job(**values))
    return str(values["id"])
