"""``make bench`` part 1b: bulk accept, and the single submit, against a raw-driver floor.

- ``POST /v1/jobs/batch`` with batches of ``batch_size`` (500) tiny upscale jobs, against a floor
  that does the same work with the raw drivers and nothing else: one multi-row ``INSERT`` of the
  same job rows + ``COMMIT`` (psycopg2), then the same messages (Celery's task protocol v2, built
  by hand) published through kombu on one channel in confirm mode, waiting for every ack. No ORM,
  no Celery, no HTTP. Reported in jobs/s and as a ratio (goal: >= 5,000 jobs/s and >= 0.8x).
- ``POST /v1/jobs`` at 1 and 8 clients against the raw single floor: psycopg2 ``INSERT`` +
  ``COMMIT`` + a kombu publish confirmed on its own, in one loop (goal: >= 0.5x).

Floor and API take turns in short slices at each level, as in part 1, so both see the same
machine. Every job lands in the platform's own tables and queues (client ``bench``); the caller
purges the queues and deletes the rows afterwards.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extras
from kombu import Connection, Exchange, Producer, Queue

from bench.stats import LevelResult, closed_loop, summary_ms
from config import Settings
from models.db import utcnow
from models.jobs import Job
from tasks import catalog
from tasks.celery_app import MAX_PRIORITY
from tasks.next_step import next_step

SLICES = 3
SLICE_WARMUP = 0.3
# The job row the API writes for a tiny upscale job, column by column (the floor writes the same).
COLUMNS = (
    "id", "client_id", "task", "engine_task", "queue", "status", "stage", "progress", "priority",
    "payload", "metadata", "webhook_url", "batch_id", "webhook_events", "idempotency_key",
    "request_hash", "attempts", "cancel_requested", "created_at", "queued_at", "updated_at",
    "dispatched_at", "predict_time", "event_seq",
)  # fmt: skip
INSERT = f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES %s"
ORIGIN = f"gen{os.getpid()}@{socket.gethostname()}"


class RawFloor:
    """The floor's connections: one psycopg2 connection and one kombu connection (no Celery),
    per thread. ``confirm_each``: kombu's per-message confirms (the single floor); otherwise the
    channel is put in confirm mode and a batch waits once for all its acks."""

    def __init__(self, settings: Settings, client: str, payload: dict[str, Any], confirm_each: bool):
        sample = Job(
            id="0" * 32, task="upscale", engine_task="upscale", queue=catalog.TASKS["upscale"].queue,
            stage="prepare", payload=payload, priority=0,
        )  # fmt: skip
        # Where the API sends such a job (computed once, outside the measured loop).
        self.step = next_step(settings, sample)
        self.client = client
        self.payload = payload
        self.predict = catalog.TASKS["upscale"].predict_seconds
        self.fingerprint = uuid.uuid4().hex + uuid.uuid4().hex
        self.db = psycopg2.connect(settings.database_url.replace("postgresql+psycopg2://", "postgresql://"))
        options = {"confirm_publish": True} if confirm_each else {}
        self.broker = Connection(settings.broker_url, transport_options=options)
        self.channel = self.broker.channel()
        self.outstanding: set[int] = set()  # delivery tags not confirmed yet
        self.tag = 0
        if not confirm_each:
            self.channel.events["basic_ack"].add(self._on_ack)
            self.channel.confirm_select()
        exchange = Exchange("aiorch", type="direct", durable=True)
        queue = Queue(
            self.step.queue,
            exchange,
            routing_key=self.step.queue,
            durable=True,
            queue_arguments={"x-max-priority": MAX_PRIORITY},
        )
        queue.bind(self.channel).declare()
        self.producer = Producer(self.channel, exchange=exchange, auto_declare=False)
        self.timelimit = [self.step.time_limit, self.step.soft_time_limit]

    def _on_ack(self, tag: int, multiple: bool) -> None:
        if multiple:
            self.outstanding = {t for t in self.outstanding if t > tag}
        else:
            self.outstanding.discard(tag)

    def row(self, now: Any) -> tuple[Any, ...]:
        # Serialized per row, as a script writing rows of different jobs would.
        return (
            uuid.uuid4().hex, self.client, "upscale", "upscale", self.step.queue, "queued", "prepare", 0, 0,
            json.dumps(self.payload), "{}", None, None, None, None, self.fingerprint, 0, False,
            now, now, now, now, self.predict, 1,
        )  # fmt: skip

    def publish(self, job_id: str) -> None:
        task_id = str(uuid.uuid4())
        args, kwargs = [job_id], self.step.kwargs
        self.producer.publish(
            (args, kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}),
            exchange="aiorch",
            routing_key=self.step.queue,
            serializer="json",
            delivery_mode=2,
            priority=0,
            headers={
                "lang": "py",
                "task": self.step.task,
                "id": task_id,
                "shadow": None,
                "eta": None,
                "expires": None,
                "group": None,
                "group_index": None,
                "retries": 0,
                "timelimit": self.timelimit,
                "root_id": task_id,
                "parent_id": None,
                "argsrepr": repr(args),
                "kwargsrepr": repr(kwargs),
                "origin": ORIGIN,
                "ignore_result": False,
                "replaced_task_nesting": 0,
                "stamped_headers": None,
                "stamps": {},
            },  # fmt: skip
            correlation_id=task_id,
            reply_to="",
        )

    def batch(self, size: int) -> None:
        """One multi-row INSERT + COMMIT, then ``size`` messages confirmed as one batch."""
        now = utcnow()
        rows = [self.row(now) for _ in range(size)]
        with self.db.cursor() as cursor:
            psycopg2.extras.execute_values(cursor, INSERT, rows, page_size=size)
        self.db.commit()
        for row in rows:
            self.publish(row[0])
            self.tag += 1
            self.outstanding.add(self.tag)
        deadline = time.monotonic() + 10
        while self.outstanding:
            if time.monotonic() > deadline:
                raise TimeoutError("the broker did not confirm the floor's batch")
            self.broker.drain_events(timeout=10)

    def single(self) -> None:
        """One row: INSERT + COMMIT, one publish confirmed on its own."""
        row = self.row(utcnow())
        with self.db.cursor() as cursor:
            cursor.execute(INSERT, (row,))
        self.db.commit()
        self.publish(row[0])

    def close(self) -> None:
        self.db.close()
        self.broker.release()


def _turns(
    concurrency: int,
    floor_op: Callable[[], Callable[[], None]],
    api_op: Callable[[], Callable[[], None]],
    warmup: float,
    duration: float,
) -> tuple[LevelResult, LevelResult]:
    floor, api = LevelResult(concurrency, 0.0, 0, 0), LevelResult(concurrency, 0.0, 0, 0)
    for turn in range(SLICES):
        settle = warmup if turn == 0 else min(warmup, SLICE_WARMUP)
        floor.add(closed_loop(concurrency, floor_op, settle, duration / SLICES))
        api.add(closed_loop(concurrency, api_op, settle, duration / SLICES))
    return floor, api


def _level(concurrency: int, floor: LevelResult, api: LevelResult, per_op: int) -> dict[str, Any]:
    floor_rate, api_rate = floor.throughput * per_op, api.throughput * per_op
    return {
        "concurrency": concurrency,
        "api": {**api.as_dict(), "jobs_per_s": round(api_rate, 1)},
        "floor": {**floor.as_dict(), "jobs_per_s": round(floor_rate, 1)},
        "ratio": round(api_rate / floor_rate, 3) if floor_rate else None,
    }


def part_bulk(
    settings: Settings,
    client: str,
    payload: dict[str, Any],
    make_http: Callable[[], Any],
    *,
    batch_size: int,
    batch_levels: list[int],
    single_levels: list[int],
    warmup: float,
    duration: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Bulk accept and the single submit, each against its raw-driver floor (see the module)."""
    item = {"task": "upscale", "payload": payload}
    batch_body = json.dumps({"jobs": [item] * batch_size}).encode()
    single_body = json.dumps(item).encode()

    def floor_op(confirm_each: bool, size: int | None) -> Callable[[], Callable[[], None]]:
        def make() -> Callable[[], None]:
            floor = RawFloor(settings, client, payload, confirm_each)
            return floor.single if size is None else lambda: floor.batch(size)

        return make

    def api_op(path: str, body: bytes, expect: int, jobs: int) -> Callable[[], Callable[[], None]]:
        def make() -> Callable[[], None]:
            http = make_http()

            def op() -> None:
                status, data = http.raw("POST", path, body)
                if status != expect or data.count(b'"job_id"') != jobs:
                    raise RuntimeError(f"HTTP {status}: {data[:200]!r}")

            return op

        return make

    out: dict[str, Any] = {"batch_size": batch_size, "batch": [], "single": []}
    for make in (floor_op(False, batch_size), api_op("/v1/jobs/batch", batch_body, 200, batch_size)):
        op = make()
        for _ in range(3):  # connections, imports and first-request costs, before anything counts
            op()
    for concurrency in batch_levels:
        floor, api = _turns(
            concurrency,
            floor_op(False, batch_size),
            api_op("/v1/jobs/batch", batch_body, 200, batch_size),
            warmup,
            duration,
        )
        level = _level(concurrency, floor, api, batch_size)
        level["api"]["batch_latency"] = summary_ms(api.latencies_s)
        out["batch"].append(level)
        say(
            f"bulk   c={concurrency:<3} API {level['api']['jobs_per_s']:8.1f} jobs/s  floor "
            f"{level['floor']['jobs_per_s']:8.1f} jobs/s  ratio {level['ratio']}  errors API {api.errors} "
            f"floor {floor.errors}"
        )
    for concurrency in single_levels:
        floor, api = _turns(
            concurrency, floor_op(True, None), api_op("/v1/jobs", single_body, 202, 1), warmup, duration
        )
        level = _level(concurrency, floor, api, 1)
        out["single"].append(level)
        say(
            f"single c={concurrency:<3} API {level['api']['jobs_per_s']:8.1f} jobs/s  raw floor "
            f"{level['floor']['jobs_per_s']:8.1f} jobs/s  ratio {level['ratio']}"
        )
    return out


def table_rows(bulk: dict[str, Any], row: Callable[..., None]) -> None:
    """The bulk part's rows of the report table (``run.table``'s ``row``)."""
    size = bulk.get("batch_size")
    for level in bulk.get("batch", []):
        api, floor, ratio = level["api"], level["floor"], level["ratio"]
        ok = None if ratio is None else (api["jobs_per_s"] >= 5000 and ratio >= 0.8 and api["errors"] == 0)
        row(
            f"POST /v1/jobs/batch ({size}) c={level['concurrency']} accept",
            api["jobs_per_s"],
            floor["jobs_per_s"],
            ratio,
            ">= 5000/s, >= 0.8x raw",
            ok,
            "/s",
        )
    for level in bulk.get("single", []):
        api, floor, ratio = level["api"], level["floor"], level["ratio"]
        row(
            f"POST /v1/jobs c={level['concurrency']} vs raw drivers",
            api["jobs_per_s"],
            floor["jobs_per_s"],
            ratio,
            ">= 0.5x raw",
            None if ratio is None else ratio >= 0.5 and api["errors"] == 0,
            "/s",
        )
