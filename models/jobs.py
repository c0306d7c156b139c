"""Tables: jobs, their event log, the counters their moves keep and their counts by status, API
keys, stored files (outputs and uploads: the assets), webhook events, their deliveries and the
clients' webhook signing secrets."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    desc,
    inspect,
    text,
)
from sqlalchemy.orm import Mapped, configure_mappers, mapped_column

from models.db import Base, UTCDateTime, utcnow
from models.state import JobStatus

# A job holding a slot of its queue: its message sent and not claimed yet, or running on a local
# engine (a remote provider's job holds none).
IN_FLIGHT_SQL = (
    "(status = 'queued' AND dispatched_at IS NOT NULL) OR (status = 'running' AND stage = 'local')"
)
# A job waiting for a slot: the predicate of ``ix_jobs_waiting``, which a query repeats to walk it.
WAITING_SQL = "status = 'queued' AND dispatched_at IS NULL"
# Each class's ORM class manager once its mappers are configured (``Job.transient``).
_MANAGERS: dict[type, Any] = {}


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("client_id", "idempotency_key", name="uq_jobs_client_idempotency"),
        # A client's jobs newest first, ``id`` breaking ties: the listing's exact order, so a
        # client's page never walks every client's newest jobs (ix_jobs_created) looking for its own.
        Index("ix_jobs_client_created", "client_id", "created_at", "id"),
        Index("ix_jobs_status_queued", "status", "queued_at"),
        Index("ix_jobs_client_batch", "client_id", "batch_id"),
        # Every client's jobs newest first (an admin's listing and /stats' latest jobs).
        Index("ix_jobs_created", "created_at", "id"),
        # The fair-share dispatcher's two sets (models/dispatch.py): jobs waiting for a slot on their
        # queue, in each client's order (higher priority first, then the older: a client's head is
        # the start of its range); and jobs holding one (sent, or running on a local engine).
        Index(
            "ix_jobs_waiting",
            "queue",
            "client_id",
            desc("priority"),
            "created_at",
            "id",
            postgresql_where=text(WAITING_SQL),
            sqlite_where=text(WAITING_SQL),
        ),
        Index(
            "ix_jobs_in_flight",
            "queue",
            "client_id",
            postgresql_where=text(IN_FLIGHT_SQL),
            sqlite_where=text(IN_FLIGHT_SQL),
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(64))
    # ``task`` is what the client asked for (a seed alias such as ``ahv_image`` stays visible);
    # ``engine_task`` is the canonical task it was routed to.
    task: Mapped[str] = mapped_column(String(64))
    engine_task: Mapped[str] = mapped_column(String(64))
    queue: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    # Where the job is in its pipeline: a ``models.state.Phase`` (status + phase = its state).
    stage: Mapped[str] = mapped_column(String(16), default="prepare")
    progress: Mapped[int] = mapped_column(Integer, default=0)
    # What a long run reports beside its percentage (a training's step, steps and loss); None else.
    progress_detail: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The batch the job was submitted in (``POST /v1/jobs/batch``); None for a job sent alone.
    batch_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    inputs: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # A fresh token per claim fences off a run whose worker was presumed dead: only the holder
    # of the current token may write the result.
    claim_token: Mapped[str | None] = mapped_column(String(32), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    backend: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # The provider's id of a job handed to a remote backend (``backend`` names the provider). Stored
    # before the first poll, so polling resumes after a worker restart; indexed for webhooks.
    remote_id: Mapped[str | None] = mapped_column(String(512), nullable=True, index=True)
    # When the provider is next due to be asked about a remote job. One poll task looks up every
    # job of its provider that is due (a batch call where the provider has one) and moves this on,
    # so the other jobs' own poll chains know they were just polled.
    next_poll_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    predict_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The sequence number of the job's last event (``JobEvent.seq``): each move counts it up in
    # its own UPDATE, so the event needs no read to find its number.
    event_seq: Mapped[int] = mapped_column(Integer, default=0)

    @classmethod
    def transient(cls, **attributes: Any) -> Job:
        """A job object with its attributes set as given, without the ORM's per-attribute
        bookkeeping: a new job the submit path builds (1,000 for a batch) and INSERTs itself
        (``lifecycle.create``), or a row read detached (``lifecycle.job_from``); never added to a
        session. About 1 µs, not 20."""
        manager = _MANAGERS.get(cls)
        if manager is None:
            mapper = inspect(cls)
            if not mapper.configured:
                configure_mappers()  # what the first Job() would do: attribute access needs it
            manager = _MANAGERS[cls] = mapper.class_manager
        job: Job = manager.new_instance()
        job.__dict__.update(attributes)
        return job


class JobEvent(Base):
    """One move of one job, in order: the job's event log (written by ``models.lifecycle`` only).

    ``data`` is the public job object after the move. ``dispatched_at`` is NULL while a webhook
    waits for the event (the dispatcher's outbox); events nobody waits for are written dispatched.
    Pruned after ``AIORCH_EVENT_RETENTION``."""

    __tablename__ = "job_events"
    __table_args__ = (
        UniqueConstraint("job_id", "seq", name="uq_job_events_job_seq"),
        Index("ix_job_events_created_at", "created_at"),
        # Small: only the events the dispatcher has not taken yet.
        Index(
            "ix_job_events_pending",
            "id",
            postgresql_where=text("dispatched_at IS NULL"),
            sqlite_where=text("dispatched_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class JobCounter(Base):
    """One series of a ``/metrics`` counter (``models.counters``): added to by the move that ends a
    job and by each webhook attempt, in their own transactions; never lowered, so deleting jobs
    (or pruning their events) leaves it as it is, and a scrape reads one row per series."""

    __tablename__ = "job_counters"

    # jobs_finished, job_duration_seconds, job_predict_time_seconds or webhook_attempts
    metric: Mapped[str] = mapped_column(String(32), primary_key=True)
    task: Mapped[str] = mapped_column(String(64), primary_key=True)  # the engine task; "" for none
    # The series' own label: the final status, the histogram bucket's upper bound, or the outcome.
    label: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)  # how many (a bucket's: only its own observations)
    total: Mapped[float] = mapped_column(Float)  # the sum of the observations (histograms)


class JobStatusCount(Base):
    """How many jobs of a client are in one task and status, or rather this shard's part of it:
    the sum over ``shard`` is the count. Kept by triggers on ``jobs`` (migration 0010) in the
    transaction of every INSERT, status change and DELETE of jobs, whoever writes it; ``models.stats``
    reads it, so ``/stats`` and the live gauge of ``/metrics`` cost the same at any history. A shard's
    ``n`` may be negative (a job counted in one shard, moved on in another); the sum never is."""

    __tablename__ = "job_status_counts"

    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    task: Mapped[str] = mapped_column(String(64), primary_key=True)  # as the client asked
    engine_task: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    # The writer's transaction id mod 16 (Postgres; 0 on SQLite): concurrent writers of one
    # client's counts update different rows.
    shard: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)


class ApiKey(Base):
    """A key stored in the database; only its SHA-256 is kept."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    client_id: Mapped[str] = mapped_column(String(64), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Optional seed 001-style JWT auth for this key: ``Authorization: Bearer <JWT HS256>`` whose
    # ``iss`` is the access key, signed with the secret key. The secret key must be readable to
    # verify an HMAC, so it is stored as given (like the webhook secrets below).
    access_key: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    secret_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    # An admin key (``aiorch keys create NAME --admin``) reads, lists, cancels and deletes every
    # client's jobs; a client key (the default) only its own client's.
    admin: Mapped[bool] = mapped_column(Boolean, default=False)


class StoredFile(Base):
    """A file in storage owned by one client, and so one of its assets (``asset_id``): a job's
    output (``kind`` "output", ``job_id`` set, also served at ``/files/<name>``) or an upload
    (``kind`` "upload": multipart, a registered URL, or a large ``data:`` input). The storage
    name carries 128 random bits; the asset id is another 128, unrelated to it."""

    __tablename__ = "stored_files"
    __table_args__ = (Index("ix_stored_files_client_created", "client_id", "created_at"),)

    name: Mapped[str] = mapped_column(String(80), primary_key=True)
    asset_id: Mapped[str | None] = mapped_column(String(32), unique=True, nullable=True)
    kind: Mapped[str] = mapped_column(String(16), default="output")
    job_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("jobs.id", ondelete="CASCADE"), index=True, nullable=True
    )
    client_id: Mapped[str] = mapped_column(String(64))
    filename: Mapped[str | None] = mapped_column(String(255), nullable=True)
    content_type: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    height: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True, index=True)


class WebhookDelivery(Base):
    """One attempt to deliver one event of a job to its webhook URL."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    event_id: Mapped[str] = mapped_column(String(32), index=True)
    event: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(Text)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    duration_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    ok: Mapped[bool] = mapped_column(Boolean, default=False)
    # The exact bytes sent, so a retry or a redelivery repeats the same event.
    request_body: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    next_retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class WebhookEvent(Base):
    """One event of a job, with the exact body every attempt sends: delivery tasks carry ids only,
    so no tenant's body (and its result URLs) travels through the broker or shows in Flower."""

    __tablename__ = "webhook_events"

    event_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(32))
    body: Mapped[str] = mapped_column(Text)
    # Indexed: the sweep looks for recent events that never had an attempt.
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class WebhookSecret(Base):
    """A client's webhook signing secret once it was rotated (before that it is derived from the
    master ``AIORCH_WEBHOOK_SECRET`` and needs no row); the previous one signs too until
    ``rotated_at`` + the grace period."""

    __tablename__ = "webhook_secrets"

    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    secret: Mapped[str] = mapped_column(Text)
    previous_secret: Mapped[str | None] = mapped_column(Text, nullable=True)
    rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ClientLimit(Base):
    """A client's own scheduling limits (``aiorch keys create|update CLIENT --rate-per-minute N
    ...``), kept with the client rather than a key: a client may have several keys, or only static
    ones from ``AIORCH_API_KEYS``. A NULL column means "the environment's default"; for the three
    counts 0 means no limit (``models.client_limits``)."""

    __tablename__ = "client_limits"

    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    rate_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_queued: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_running: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_priority: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class QueueSlot(Base):
    """A worker's slots on one queue (its pool's processes), written when it starts and refreshed
    while it runs (tasks/slots.py); the dispatcher counts the slots of the workers seen lately."""

    __tablename__ = "queue_slots"

    node: Mapped[str] = mapped_column(String(255), primary_key=True)
    queue: Mapped[str] = mapped_column(String(64), primary_key=True)
    slots: Mapped[int] = mapped_column(Integer)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime())


class DispatchTurn(Base):
    """When a client last got a slot of a queue (``models.dispatch``): among clients with as few
    jobs in flight, the one served longest ago goes first."""

    __tablename__ = "dispatch_turns"

    queue: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_at: Mapped[datetime] = mapped_column(UTCDateTime())
