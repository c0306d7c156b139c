"""``make bench``: throughput and latency of the real platform against floors measured in the same run.

    python -m bench.run                  # a private Postgres database + RabbitMQ vhost (dropped after)
    python -m bench.run --embedded       # SQLite + kombu filesystem transport in a temp var dir
    python -m bench.run --database-url postgresql://... --broker-url amqp://...   # existing ones

1. ``POST /v1/jobs`` throughput and p50/p99 at 1, 8 and 32 concurrent keep-alive clients, the API
   under gunicorn with no workers, against a floor: the same INSERT + COMMIT (SQLAlchemy, a Job
   row like the API's) + ``tasks.celery_app.publish`` of the prepare task, at the same concurrency.
1b. Bulk accept (``bench/bulk.py``): ``POST /v1/jobs/batch`` with batches of 500 against a raw-driver
   floor (one psycopg2 multi-row INSERT + COMMIT, the same messages through kombu with publisher
   confirms), and single ``POST /v1/jobs`` at 1 and 8 clients against its raw-driver floor.
2. submit -> ``succeeded`` of a tiny upscale job (32x32 PNG data: URI, scale 2) through the API and
   real workers, polling every 10 ms, against a raw Celery round trip on the same broker and
   database: a trivial task on ``create_celery(settings)`` run by its own worker process with the
   same pool flags, its result in Celery's database result backend on the same database, polled
   every 10 ms (``bench/raw_celery.py``). The one-way transport (send -> task body, no result)
   is reported beside it.
3. Webhook delay: receive time at a real receiver minus the body's ``finished_at_ms``.
4. API RSS: gunicorn master + workers (VmRSS summed; PSS alongside, which counts shared pages once).
5. ``aiorch batch run`` of 2,000 tiny jobs end to end against a bare script that submits them in
   bulk and follows one multiplexed stream (``bench/batch_run.py``).

Prints a table and writes ``bench-results/bench-<timestamp>.json``. Every ratio compares numbers
measured in this run on this machine.

With ``--broker-url`` the aiorch queues of that broker are purged after part 1 (its messages point
at rows of this benchmark): point it at a broker no other platform is using. With
``--database-url`` the benchmark's rows (client ``bench``) are deleted at the end.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import io
import json
import os
import platform as host_platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, text

from bench import infra
from bench.batch_run import part_batch_run
from bench.batch_run import table_rows as batch_run_rows
from bench.bulk import part_bulk
from bench.bulk import table_rows as bulk_rows
from bench.raw_celery import ECHO, PING, RAW_QUEUE, RESULT_TABLES, build
from bench.stats import LevelResult, closed_loop, percentile, steal_seconds, summary_ms
from bench.streams import part_many_streams, part_stream_latency
from config import QUEUES, Settings
from models.db import Database, utcnow
from models.jobs import Job, StoredFile, WebhookDelivery
from models.jobstore import new_id
from models.migrate import upgrade
from tasks import catalog
from tasks.celery_app import PREPARE, create_celery, publish
from tests.support.platform import FINAL, ROOT, Platform, free_port
from tests.support.servers import WebhookReceiver

CLIENT = "bench"
KEY = "bench-key-" + uuid.uuid4().hex
STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[bench {time.monotonic() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


# -- set-up -----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--embedded", action="store_true",
                        help="SQLite + kombu filesystem transport in a temp var dir (the Settings defaults)")
    # The platform's own variables name the database and broker to measure, as for `aiorch up`.
    parser.add_argument("--database-url", default=os.environ.get("AIORCH_DATABASE_URL") or None,
                        help="an existing database (default: $AIORCH_DATABASE_URL, else a private "
                             "Postgres database)")
    parser.add_argument("--broker-url", default=os.environ.get("AIORCH_BROKER_URL") or None,
                        help="an existing broker (default: $AIORCH_BROKER_URL, else a private RabbitMQ "
                             "vhost); its aiorch queues are purged")
    parser.add_argument("--api-workers", type=int, default=1,
                        help="gunicorn processes of the API (default 1, as `aiorch serve` ships)")
    parser.add_argument("--levels", default="1,8,32", help="client concurrencies of part 1 (default 1,8,32)")
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per level (default 6)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each level")
    parser.add_argument("--jobs", type=int, default=30, help="sequential tiny jobs in part 2 (default 30)")
    parser.add_argument("--webhooks", type=int, default=30,
                        help="sequential webhook jobs in part 3 (default 30)")
    parser.add_argument("--poll", type=float, default=0.01, help="GET /v1/jobs/{id} interval in part 2 (s)")
    parser.add_argument("--bulk-batch", type=int, default=500, help="jobs per POST /v1/jobs/batch in part 1b")
    parser.add_argument("--bulk-levels", default="1,2", help="client concurrencies of part 1b's batches")
    parser.add_argument("--bulk-single-levels", default="1,8",
                        help="client concurrencies of part 1b's single POST /v1/jobs against the raw floor")
    parser.add_argument("--bulk-duration", type=float, default=None,
                        help="measured seconds per level of part 1b (default: --duration)")
    parser.add_argument("--only-bulk", action="store_true", help="run part 1b only (a smoke test of it)")
    parser.add_argument("--streams", type=int, default=1000,
                        help="SSE streams held open in part 1c (default 1000; 0 skips it)")
    parser.add_argument("--stream-jobs", type=int, default=60,
                        help="tiny jobs followed on their SSE stream in part 4 (default 60)")
    parser.add_argument("--batch-jobs", type=int, default=2000,
                        help="tiny jobs of part 5's `aiorch batch run` against a bare script (0 skips it)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results", help="where the JSON goes")
    parser.add_argument("--keep-logs", action="store_true", help="copy the process logs next to the JSON")
    return parser.parse_args(argv)


def bench_settings(var: Path, port: int, database_url: str | None, broker_url: str | None) -> Settings:
    """Settings the way an operator sets them: from ``AIORCH_*`` variables (defaults fill the rest)."""
    env = {
        "AIORCH_VAR_DIR": str(var),
        "AIORCH_PORT": str(port),
        "AIORCH_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "AIORCH_API_KEYS": f"{CLIENT}:{KEY}",
        "AIORCH_ALLOW_PRIVATE_URLS": "1",  # the webhook receiver listens on 127.0.0.1
        "AIORCH_LOG_JSON": "1",
    }
    if database_url:
        env["AIORCH_DATABASE_URL"] = database_url
    if broker_url:
        env["AIORCH_BROKER_URL"] = broker_url
    return Settings.from_env(env)


def tiny_png_uri(side: int = 32) -> str:
    from PIL import Image

    image = Image.new("RGB", (side, side))
    image.putdata([(x * 8 % 256, y * 8 % 256, (x + y) * 4 % 256) for y in range(side) for x in range(side)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}"
    return url


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def start_raw_worker(plat: Platform) -> None:
    """Spawn the floor's worker with the flags ``Platform.start_worker`` gives the platform's."""
    plat._spawn("raw", [sys.executable, "-m", "celery", "-A", "bench.raw_worker:app", "worker",
                        "-Q", RAW_QUEUE, "-c", "1", "-n", "raw@bench", "--pool", "prefork",
                        "--without-mingle", "--without-gossip", "-E", "--loglevel", "INFO"])


def wait_ready(plat: Platform, name: str, offset: int = 0, timeout: float = 60.0) -> None:
    log = plat.logs / f"{name}.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and b" ready." in log.read_bytes()[offset:]:
            return
        if plat.procs[name].poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"worker {name} did not start:\n" + plat.log(name))


class Supervisor:
    """Notices a worker process that exited, records why (the last error in its log) and starts
    it again with the same flags, so one crash costs one job, not the rest of the run."""

    GPU_QUEUES = "gpu.diffusion,gpu.superres,gpu.faceswap,gpu.vision"  # as Platform.start_workers

    def __init__(self, plat: Platform):
        self.plat = plat
        self.crashes: list[dict[str, Any]] = []

    def dead(self) -> list[str]:
        procs = self.plat.procs
        return [n for n in ("cpu", "gpu", "raw") if n in procs and procs[n].poll() is not None]

    def revive(self) -> list[str]:
        names = self.dead()
        for name in names:
            proc = self.plat.procs.pop(name)
            log = self.plat.logs / f"{name}.log"
            text = log.read_text(errors="replace") if log.exists() else ""
            last = next((line for line in reversed(text.splitlines())
                         if '"critical"' in line or '"error"' in line), "")
            try:
                reason = json.loads(last).get("msg", last)[:300] if last else "no error logged"
            except ValueError:
                reason = last[:300]
            self.crashes.append({"worker": name, "returncode": proc.returncode, "reason": reason,
                                 "at_s": round(time.monotonic() - STARTED, 1)})
            say(f"worker {name} exited (rc {proc.returncode}): {reason}; restarting it")
            if name == "raw":
                offset = log.stat().st_size if log.exists() else 0
                start_raw_worker(self.plat)
                wait_ready(self.plat, "raw", offset)
            elif name == "cpu":
                self.plat.start_worker("cpu", "cpu", 2)
            else:
                self.plat.start_worker("gpu", self.GPU_QUEUES, 1)
        return names


# -- part 1: POST /v1/jobs against INSERT + COMMIT + publish -----------------------------------------

SLICES = 3  # turns of floor and API per concurrency level
SLICE_WARMUP = 0.3  # unmeasured seconds at the start of every turn after the first


def part_submit(plat: Platform, settings: Settings, payload: dict[str, Any], levels: list[int],
                warmup: float, duration: float) -> dict[str, Any]:
    body = json.dumps({"task": "upscale", "payload": payload}).encode()
    api_pid = plat.procs["api"].pid
    spec = catalog.resolve("upscale")
    predict = catalog.TASKS["upscale"].predict_seconds
    fingerprint = uuid.uuid4().hex + uuid.uuid4().hex

    floor_db = Database(settings)
    floor_celery = create_celery(settings)

    def api_op() -> Any:
        return post_op(settings.port, body)

    split: dict[str, list[float]] = {"db": [], "publish": []}

    def floor_op() -> Any:
        def op() -> None:
            t0 = time.perf_counter()
            now = utcnow()
            job = Job(
                id=new_id(), client_id=CLIENT, task="upscale", engine_task=spec.name, queue=spec.queue,
                status="queued", stage="prepare", progress=0, priority=0, payload=payload, meta={},
                webhook_url=None, webhook_events=None, idempotency_key=None, request_hash=fingerprint,
                attempts=0, cancel_requested=False, created_at=now, queued_at=now, updated_at=now,
                dispatched_at=now, predict_time=predict,
            )
            with floor_db.session() as session:
                session.add(job)
            t1 = time.perf_counter()
            publish(floor_celery, PREPARE, job.id, "cpu", job.priority)
            split["db"].append(t1 - t0)
            split["publish"].append(time.perf_counter() - t1)

        return op

    # Connections, imports and first-request costs are paid before anything is measured.
    for make in (api_op, floor_op):
        op = make()
        for _ in range(20):
            op()

    levels_out = []
    try:
        for concurrency in levels:
            split["db"].clear()
            split["publish"].clear()
            # Floor and API take turns in short slices, so both see the same machine: on a shared
            # VM the CPU stolen by neighbours swings by tens of percent within a minute.
            slice_s = duration / SLICES
            floor, api = LevelResult(concurrency, 0.0, 0, 0), LevelResult(concurrency, 0.0, 0, 0)
            api_cpu = 0.0
            for turn in range(SLICES):
                settle = warmup if turn == 0 else min(warmup, SLICE_WARMUP)
                floor.add(closed_loop(concurrency, floor_op, settle, slice_s))
                pids = infra.process_tree(api_pid)
                api_cpu0 = infra.cpu_seconds(pids)
                api.add(closed_loop(concurrency, api_op, settle, slice_s))
                api_cpu += infra.cpu_seconds(pids) - api_cpu0
            say(f"floor  c={concurrency:<3} {floor.throughput:8.1f}/s  p50 "
                f"{summary_ms(floor.latencies_s)['p50_ms']} ms  errors {floor.errors}  "
                f"bench CPU {1000 * floor.client_cpu_s / max(1, floor.all_ops):.1f} ms/op")
            say(f"API    c={concurrency:<3} {api.throughput:8.1f}/s  p50 "
                f"{summary_ms(api.latencies_s)['p50_ms']} ms  errors {api.errors}  "
                f"API CPU {1000 * api_cpu / max(1, api.all_ops):.1f} ms/request")
            api_d, floor_d = api.as_dict(), floor.as_dict()
            # CPU seconds of the gunicorn processes (resp. of the benchmark process running the floor)
            # over warm-up + window, per operation finished in that time.
            api_d["api_process_cpu_s"] = round(api_cpu, 3)
            api_d["api_cpu_ms_per_request"] = round(1000 * api_cpu / api.all_ops, 3) if api.all_ops else None
            floor_d["bench_cpu_ms_per_op"] = (round(1000 * floor.client_cpu_s / floor.all_ops, 3)
                                              if floor.all_ops else None)
            floor_d["split"] = {"insert_commit": summary_ms(split["db"]),
                                "publish": summary_ms(split["publish"])}
            levels_out.append({
                "concurrency": concurrency,
                "api": api_d,
                "floor": floor_d,
                "throughput_ratio": round(api.throughput / floor.throughput, 3) if floor.throughput else None,
            })
        depths = infra.queue_depths(floor_celery, list(QUEUES))
    finally:
        floor_db.dispose()
    return {"levels": levels_out, "queue_depths_after": depths, "publisher": floor_celery}


# -- part 2: tiny upscale job against a raw Celery round trip -----------------------------------------

class RawRoundTrip:
    def __init__(self, settings: Settings, poll: float):
        self.settings = settings
        self.app = build(settings)
        self.poll = poll
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def once(self, crashed: Any = lambda: False, timeout: float = 20.0) -> float | None:
        """send -> the result read back from Celery's result backend, polled every ``poll`` s as
        the benchmark polls a job; None when a worker died meanwhile (its message is lost with it)."""
        token = uuid.uuid4().hex
        t0 = time.perf_counter()
        result = publish(self.app, ECHO, token, RAW_QUEUE)
        while not result.ready():
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"raw task {token} did not finish within {timeout}s")
            if crashed():
                return None
            time.sleep(self.poll)
        value = result.get(timeout=timeout)
        elapsed = time.perf_counter() - t0
        if value.get("token") != token:
            raise RuntimeError(f"raw task {token} returned {value!r}")
        result.forget()
        return elapsed

    def one_way(self, crashed: Any = lambda: False, timeout: float = 20.0) -> tuple[float, float] | None:
        """(send -> the benchmark hears the task ran, send -> task body started) in seconds: the
        transport alone, no result, no polling; None when a worker died meanwhile."""
        token = uuid.uuid4().hex
        sent_wall = time.time()
        t0 = time.perf_counter()
        publish(self.app, PING, token, RAW_QUEUE, task_kwargs={"port": self.port})
        deadline = t0 + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"raw task {token} did not run within {timeout}s")
            if crashed():
                return None
            self.sock.settimeout(min(left, 0.2))
            try:
                data, _ = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            message = json.loads(data)
            if message.get("token") == token:
                return time.perf_counter() - t0, message["executed_at"] - sent_wall

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(Exception), self.app.connection_for_write() as conn:
            self.app.amqp.queues[RAW_QUEUE].bind(conn.default_channel).delete()
        with contextlib.suppress(Exception):
            db = Database(self.settings)
            with db.engine.begin() as conn:
                for table in RESULT_TABLES.values():
                    conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
            db.dispose()


class JsonClient:
    """One keep-alive ``http.client`` connection, as in part 1: the client library's own cost
    (``requests`` adds about a millisecond per call on this kind of machine) is the client's, not
    the platform's, and would blur job latencies of a few tens of milliseconds."""

    def __init__(self, port: int, key: str = KEY):
        self.port = port
        self.headers = {"X-API-Key": key, "Content-Type": "application/json"}
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        status, raw = self.raw(method, path, None if body is None else json.dumps(body))
        return status, json.loads(raw) if raw else None

    def raw(self, method: str, path: str, data: str | bytes | None = None) -> tuple[int, bytes]:
        """One request on the kept-alive connection; a broken one is replaced for the next call."""
        try:
            self.conn.request(method, path, body=data, headers=self.headers)
            response = self.conn.getresponse()
            return response.status, response.read()
        except (http.client.HTTPException, OSError):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
            raise

    def close(self) -> None:
        self.conn.close()


def post_op(port: int, body: bytes) -> Any:
    """A closed-loop op: one ``POST /v1/jobs`` on its own kept-alive connection."""
    client = JsonClient(port)

    def op() -> None:
        status, data = client.raw("POST", "/v1/jobs", body)
        if status != 202:
            raise RuntimeError(f"HTTP {status}: {data[:200]!r}")

    return op


def run_job(http: JsonClient, payload: dict[str, Any], poll: float,
            crashed: Any = lambda: False, timeout: float = 20.0, **extra: Any) -> dict[str, Any]:
    """Submit one job and poll it to a final status; a job not final after ``timeout`` is
    reported with status ``timeout`` (a lost message, a dead consumer), not raised."""
    t0 = time.perf_counter()
    status, answer = http.call("POST", "/v1/jobs", {"task": "upscale", "payload": payload, **extra})
    if status != 202:
        raise RuntimeError(f"submit answered {status}: {str(answer)[:300]}")
    job_id = answer["job_id"]
    submit_s = time.perf_counter() - t0
    polls = 0
    while True:
        job = http.call("GET", f"/v1/jobs/{job_id}")[1]
        polls += 1
        if job["status"] in FINAL:
            observed_wall_ms = time.time() * 1000
            elapsed = time.perf_counter() - t0
            break
        if time.perf_counter() - t0 > timeout:
            return {"job_id": job_id, "status": "timeout",
                    "error": f"still {job['status']} after {timeout:g} s"}
        if crashed():
            return {"job_id": job_id, "status": "lost",
                    "error": f"still {job['status']} when a worker process exited"}
        time.sleep(poll)
    created, started, finished = job.get("created_at_ms"), job.get("started_at_ms"), job.get("finished_at_ms")
    return {
        "job_id": job_id, "status": job["status"], "error": job.get("error"), "elapsed_s": elapsed,
        "submit_s": submit_s, "polls": polls,
        # Server-side split (ms): queued -> claimed by the run task (the run queue's hop),
        # claim -> final write (inputs checked, engine, outputs stored), final write -> the poll
        # that saw it.
        "queued_to_started_ms": started - created if started and created else None,
        "started_to_finished_ms": finished - started if finished and started else None,
        "finished_to_observed_ms": observed_wall_ms - finished if finished else None,
    }


def part_latency(plat: Platform, sup: Supervisor, raw: RawRoundTrip, payload: dict[str, Any], n: int,
                 poll: float) -> dict[str, Any]:
    http = JsonClient(plat.settings.port)
    crashed = lambda: bool(sup.dead())  # noqa: E731
    for _ in range(3):  # forked children import the engine and open connections on first use
        raw.once(crashed)
        raw.one_way(crashed)
        run_job(http, payload, poll, crashed)
        sup.revive()
    jobs, raws, one_way, raw_exec, failures = [], [], [], [], []
    raw_lost = streak = 0
    for _ in range(n):
        round_trip, measured = raw.once(crashed), raw.one_way(crashed)
        if round_trip is None or measured is None:
            raw_lost += 1
        else:
            raws.append(round_trip)
            one_way.append(measured[0])
            raw_exec.append(measured[1])
        if sup.revive():
            continue
        job = run_job(http, payload, poll, crashed)
        sup.revive()
        if job["status"] == "succeeded":
            jobs.append(job)
            streak = 0
        else:
            failures.append({"job_id": job["job_id"], "status": job["status"], "error": job["error"]})
            say(f"job {job['job_id']} ended {job['status']}: {job['error']}")
            streak += 1
            if streak >= 3:
                failures.append({"aborted": "three jobs in a row did not succeed; part 2 stopped early"})
                break
    http.close()
    job_lat = summary_ms([j["elapsed_s"] for j in jobs])
    raw_lat = summary_ms(raws)

    def split(key: str) -> dict[str, Any]:
        values = [j[key] for j in jobs if j[key] is not None]
        return {"p50_ms": percentile(values, 50), "p99_ms": percentile(values, 99)}

    return {
        "job": job_lat,
        "raw_round_trip": raw_lat,
        "raw_one_way": summary_ms(one_way),
        "raw_send_to_executed": summary_ms(raw_exec),
        "ratio_p50": round(job_lat["p50_ms"] / raw_lat["p50_ms"], 3) if jobs and raw_lat["p50_ms"] else None,
        "ratio_p99": round(job_lat["p99_ms"] / raw_lat["p99_ms"], 3) if jobs and raw_lat["p99_ms"] else None,
        "submit_request": summary_ms([j["submit_s"] for j in jobs]),
        "split": {k: split(k) for k in
                  ("queued_to_started_ms", "started_to_finished_ms", "finished_to_observed_ms")},
        "polls_per_job_p50": percentile([float(j["polls"]) for j in jobs], 50),
        "failures": failures,
        "raw_lost": raw_lost,
    }


# -- part 3: webhook delay after finished_at ---------------------------------------------------------

def part_webhooks(plat: Platform, sup: Supervisor, payload: dict[str, Any], n: int) -> dict[str, Any]:
    receiver = WebhookReceiver().start()
    http = JsonClient(plat.settings.port)
    delays, totals, problems = [], [], []
    try:
        for index in range(n + 2):  # the first two warm the cpu worker's webhook path up
            t0 = time.perf_counter()
            status, answer = http.call("POST", "/v1/jobs", {"task": "upscale", "payload": payload,
                                                            "webhook_url": receiver.url})
            if status != 202:
                raise RuntimeError(f"submit answered {status}: {str(answer)[:300]}")
            job_id = answer["job_id"]
            deadline = time.monotonic() + 15
            hit = None
            while hit is None and time.monotonic() < deadline and not sup.dead():
                hit = next((r for r in list(receiver.received) if r.json().get("job_id") == job_id), None)
                if hit is None:
                    time.sleep(0.001)
            if hit is None and sup.revive():
                problems.append(f"job {job_id} lost: a worker process exited")
                continue
            if hit is None:
                problems.append(f"no webhook for {job_id} within 15 s")
                say(problems[-1])
                if len(problems) >= 3 and all(p.startswith("no webhook") for p in problems[-3:]):
                    problems.append("aborted: three jobs in a row without a webhook")
                    break
                continue
            total = time.perf_counter() - t0
            event = hit.json()
            if event.get("status") != "succeeded" or event.get("finished_at_ms") is None:
                problems.append(f"{job_id}: {event.get('status')} {event.get('error')}")
                continue
            if index >= 2:
                delays.append((hit.at * 1000 - event["finished_at_ms"]) / 1000)
                totals.append(total)
    finally:
        http.close()
        receiver.stop()
    return {"delay_after_finished_at": summary_ms(delays), "submit_to_webhook": summary_ms(totals),
            "problems": problems[:10], "deliveries_received": len(receiver.received)}


# -- the report ------------------------------------------------------------------------------------

def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:,.1f}" if abs(value) >= 100 else f"{value:.2f}"
    else:
        text = str(value)
    return f"{text}{unit}"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def table(results: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []

    def row(metric: str, value: Any, floor: Any, ratio: Any, target: str, ok: bool | None,
            unit: str = "") -> None:
        rows.append({"metric": metric, "value": value, "floor": floor, "ratio": ratio, "target": target,
                     "pass": ok, "unit": unit})

    for level in results.get("submit", {}).get("levels", []):
        c, api, floor = level["concurrency"], level["api"], level["floor"]
        ratio = level["throughput_ratio"]
        row(f"POST /v1/jobs c={c} throughput", api["throughput_per_s"], floor["throughput_per_s"], ratio,
            ">= 0.5x floor", None if ratio is None else ratio >= 0.5 and api["errors"] == 0, "/s")
        for q in ("p50", "p99"):
            a, f = api["latency"][f"{q}_ms"], floor["latency"][f"{q}_ms"]
            row(f"POST /v1/jobs c={c} {q}", a, f, round(a / f, 2) if a and f else None, "info", None, " ms")
    bulk_rows(results.get("bulk", {}), row)
    lat = results.get("latency")
    if lat:
        row("tiny upscale submit->succeeded p50", lat["job"]["p50_ms"], lat["raw_round_trip"]["p50_ms"],
            lat["ratio_p50"], "<= 2x raw", None if lat["ratio_p50"] is None else lat["ratio_p50"] <= 2.0,
            " ms")
        row("tiny upscale submit->succeeded p99", lat["job"]["p99_ms"], lat["raw_round_trip"]["p99_ms"],
            lat["ratio_p99"], "info", None, " ms")
        one = lat.get("raw_one_way", {}).get("p50_ms")
        row("tiny upscale p50 vs one-way transport", lat["job"]["p50_ms"], one,
            round(lat["job"]["p50_ms"] / one, 2) if one and lat["job"]["p50_ms"] else None, "info", None,
            " ms")
        lost = len([f for f in lat["failures"] if "job_id" in f])
        row("tiny upscale jobs not succeeded", lost, None, None, "0", lost == 0 and not lat["failures"])
    hooks = results.get("webhooks")
    if hooks:
        d = hooks["delay_after_finished_at"]
        row("webhook delay after finished_at p50", d["p50_ms"], None, None, "info", None, " ms")
        row("webhook delay after finished_at p99", d["p99_ms"], None, None, "<= 100 ms",
            None if d["p99_ms"] is None else d["p99_ms"] <= 100 and not hooks["problems"], " ms")
    many = results.get("many_streams")
    if many:
        row(f"API extra RSS with {many['streams']} SSE streams open", many["extra_rss_mb"], None, None,
            "<= 100 MB", many["extra_rss_mb"] <= 100, " MB")
        row(f"POST /v1/jobs c=8 with {many['streams']} streams open", many["post_per_s_with"],
            many["post_per_s_without"], many["post_ratio"], ">= 0.8x without",
            None if many["post_ratio"] is None else many["post_ratio"] >= 0.8 and not many["errors"], "/s")
    sse = results.get("stream_latency")
    if sse:
        row("tiny upscale submit->succeeded on SSE p50", sse["job_on_stream"]["p50_ms"],
            sse["raw_round_trip"]["p50_ms"], sse["ratio_p50"], "<= 1.0x raw",
            None if sse["ratio_p50"] is None else sse["ratio_p50"] <= 1.0 and not sse["failures"], " ms")
        follow = sse.get("submit_and_follow")
        if follow:
            ratio = sse["submit_and_follow_ratio_p50"]
            row("same, submitted with Accept: text/event-stream p50", follow["p50_ms"],
                sse["raw_round_trip"]["p50_ms"], ratio, "<= 1.0x raw",
                None if ratio is None else ratio <= 1.0 and not sse["failures"], " ms")
        delay = sse["event_delay_ms"]
        row("SSE event delay after the move p99", delay["p99"], None, None, "<= 20 ms",
            None if delay["p99"] is None else delay["p99"] <= 20, " ms")
    if "batch_run" in results:
        batch_run_rows(results["batch_run"], row)
    if "worker_crashes" in results:
        crashes = results["worker_crashes"]
        row("worker crashes during parts 2-3", len(crashes), None, None, "0", not crashes)
    if "processes_exited" in results:
        dead = results["processes_exited"]
        row("platform processes alive at the end", "all" if not dead else
            "exited: " + ", ".join(f"{n} (rc {rc})" for n, rc in dead.items()), None, None, "all", not dead)
    rss = results.get("api_memory")
    if rss:
        # Measured after part 1 (single POSTs), before part 1b's batches raise the high-water mark
        # that the process keeps for the rest of the run.
        worst = rss["after_submit_load"]["rss_mb"] if "after_submit_load" in rss else None
        row("API RSS (gunicorn master + workers), single-job load", worst, None, None, "<= 120 MB",
            None if worst is None else worst <= 120, " MB")
        if "after_bulk" in rss:
            row("API RSS after part 1b's batches of 500", rss["after_bulk"]["rss_mb"], None, None, "info",
                None, " MB")
        if "after_all" in rss:
            row("API RSS after parts 2-4 (the batches' high-water mark kept)", rss["after_all"]["rss_mb"],
                None, None, "info", None, " MB")
        if "after_batch_run" in rss:
            row("API RSS after part 5's 2,000-job batch run", rss["after_batch_run"]["rss_mb"], None, None,
                "info", None, " MB")
        pss = max(m["pss_mb"] for m in rss.values())
        row("API PSS (shared pages counted once)", pss, None, None, "info", None, " MB")

    details = []
    for level in results.get("submit", {}).get("levels", []):
        api, floor = level["api"], level["floor"]
        details.append(
            f"c={level['concurrency']:<3} API CPU {fmt(api.get('api_cpu_ms_per_request'), ' ms')}/request "
            f"(gunicorn processes); floor CPU {fmt(floor.get('bench_cpu_ms_per_op'), ' ms')}/op; floor split "
            f"p50 INSERT+COMMIT {fmt(floor['split']['insert_commit']['p50_ms'], ' ms')}, "
            f"publish {fmt(floor['split']['publish']['p50_ms'], ' ms')}; errors API {api['errors']} "
            f"floor {floor['errors']}")
    if lat:
        sp = lat["split"]
        details.append(
            f"job split p50: queued->started {fmt(sp['queued_to_started_ms']['p50_ms'], ' ms')} "
            f"(the run queue's hop), "
            f"started->finished {fmt(sp['started_to_finished_ms']['p50_ms'], ' ms')}, "
            f"finished->seen by poll {fmt(sp['finished_to_observed_ms']['p50_ms'], ' ms')}; "
            f"POST {fmt(lat['submit_request']['p50_ms'], ' ms')}; raw one-way send->task body "
            f"{fmt(lat['raw_send_to_executed']['p50_ms'], ' ms')}; failed jobs {len(lat['failures'])}")
    for crash in results.get("worker_crashes", []):
        details.append(f"worker crash: {crash['worker']} rc {crash['returncode']} at {crash['at_s']} s: "
                       f"{crash['reason'][:160]} (restarted by the benchmark)")
    if lat and lat.get("raw_lost"):
        details.append(f"raw floor: {lat['raw_lost']} round trips lost to worker crashes "
                       "(not in the floor numbers)")
    if hooks:
        details.append(f"webhooks: submit->received p50 {fmt(hooks['submit_to_webhook']['p50_ms'], ' ms')}, "
                       f"deliveries {hooks['deliveries_received']}, problems {len(hooks['problems'])}")
    if rss:
        for when, mem in rss.items():
            parts = ", ".join(f"{p['role']} {fmt((p['rss_kb'] or 0) / 1024, ' MB')}"
                              for p in mem["processes"])
            details.append(f"API memory {when}: RSS {fmt(mem['rss_mb'], ' MB')} ({parts}), "
                           f"PSS {fmt(mem['pss_mb'], ' MB')}")

    headers = ("metric", "value", "floor", "ratio", "target", "result")
    lines = [[r["metric"], fmt(r["value"], r["unit"]), fmt(r["floor"], r["unit"]), fmt(r["ratio"], "x"),
              r["target"], verdict(r["pass"])] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
           "  ".join("-" * w for w in widths)]
    for line in lines:
        out.append("  ".join(cell.rjust(w) if 0 < i < 4 else cell.ljust(w)
                             for i, (cell, w) in enumerate(zip(line, widths, strict=True))))
    if details:
        out.append("")
        out.extend(details)
    return "\n".join(out), rows


# -- main --------------------------------------------------------------------------------------------

def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    signal.signal(signal.SIGTERM, _terminate)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_id = uuid.uuid4().hex[:10]
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "revision": git_revision(),
        "host": {"cpus": os.cpu_count(), "python": host_platform.python_version(),
                 "loadavg_start": os.getloadavg(), "steal_s_start": steal_seconds()},
        "parameters": {"levels": levels, "duration_s": args.duration, "warmup_s": args.warmup,
                       "jobs": args.jobs, "webhooks": args.webhooks, "poll_s": args.poll},
    }
    payload = {"image_url": tiny_png_uri(), "scale": 2}
    status = 1
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aiorch-bench-")))
        var = tmp / "var"
        database_url, broker_url = (None, None) if args.embedded else (args.database_url, args.broker_url)
        if not database_url and not args.embedded:
            database_url = stack.enter_context(infra.private_database(f"aiorch_bench_{run_id}"))
        if not broker_url and not args.embedded:
            broker_url = stack.enter_context(infra.private_vhost(f"aiorch_bench_{run_id}"))
        port = free_port()
        settings = bench_settings(var, port, database_url, broker_url)
        var.mkdir(parents=True)
        results["database"] = redact(settings.database_url)
        results["broker"] = redact(settings.broker_url)
        results["mode"] = "embedded" if settings.embedded else "server"
        say(f"database {results['database']}  broker {results['broker']}")

        db = Database(settings)
        stack.callback(db.dispose)
        upgrade(db)
        if database_url and database_url == args.database_url:
            stack.callback(_delete_bench_rows, db)
        plat = Platform(settings, tmp / "logs")
        stack.callback(plat.stop)
        if args.keep_logs:
            stack.callback(_keep_logs, plat.logs, args.out / f"bench-{stamp}-logs")
        try:
            plat.start_api(workers=args.api_workers)
            results["api_workers"] = args.api_workers
            say(f"API up on {plat.base_url} (gunicorn, {args.api_workers} workers x 32 threads); "
                "part 1: POST /v1/jobs, no workers")
            if args.only_bulk:
                submit = {"levels": [], "publisher": create_celery(settings)}
            else:
                submit = part_submit(plat, settings, payload, levels, args.warmup, args.duration)
            publisher = submit.pop("publisher")
            results["submit"] = submit
            # Measured before part 1b too: batches of 500 raise the API's high-water mark, and the
            # memory target is about the single-job load that earlier revisions were measured on.
            results["api_memory"] = {"after_submit_load": infra.memory(plat.procs["api"].pid)}
            if settings.embedded:
                say("part 1b skipped: its raw-driver floor needs Postgres and RabbitMQ")
            else:
                say(f"part 1b: POST /v1/jobs/batch ({args.bulk_batch} jobs) and POST /v1/jobs against "
                    "raw-driver floors (psycopg2 + kombu with confirms)")
                results["bulk"] = part_bulk(
                    settings, CLIENT, payload, lambda: JsonClient(settings.port, KEY),
                    batch_size=args.bulk_batch,
                    batch_levels=[int(x) for x in args.bulk_levels.split(",") if x.strip()],
                    single_levels=[int(x) for x in args.bulk_single_levels.split(",") if x.strip()],
                    warmup=args.warmup, duration=args.bulk_duration or args.duration, say=say)
            if "bulk" in results:
                results["api_memory"]["after_bulk"] = infra.memory(plat.procs["api"].pid)
            if args.streams and not args.only_bulk:
                say(f"part 1c: {args.streams} SSE streams open on the API, POST /v1/jobs beside them")
                body = json.dumps({"task": "upscale", "payload": payload}).encode()
                status_code, queued = JsonClient(settings.port).raw("POST", "/v1/jobs", body)
                results["many_streams"] = part_many_streams(
                    plat.procs["api"].pid, settings.port, KEY, json.loads(queued)["job_id"],
                    lambda: post_op(settings.port, body), args.streams, concurrency=8,
                    warmup=args.warmup, duration=args.duration)
            results["purged_after_part1"] = infra.purge(publisher, list(QUEUES))
            # Their rows too: thousands of jobs left queued without a message are not the idle
            # platform part 2 measures (a batching worker would look at them on every job).
            _delete_bench_rows(db)
            say(f"purged {results['purged_after_part1']}; starting workers")
            if args.only_bulk:
                status = 0
                return status

            start_raw_worker(plat)
            plat.start_workers()
            wait_ready(plat, "raw")
            infra.wait_warm(plat, "gpu")
            sup = Supervisor(plat)
            results["worker_crashes"] = sup.crashes
            raw = RawRoundTrip(settings, args.poll)
            stack.callback(raw.close)
            say(f"part 2: {args.jobs} tiny upscale jobs, alternating with raw Celery round trips "
                "(result backend on the same database) and one-way pings")
            results["latency"] = part_latency(plat, sup, raw, payload, args.jobs, args.poll)
            say(f"job p50 {results['latency']['job']['p50_ms']} ms, raw p50 "
                f"{results['latency']['raw_round_trip']['p50_ms']} ms")
            say(f"part 3: {args.webhooks} jobs with a webhook")
            results["webhooks"] = part_webhooks(plat, sup, payload, args.webhooks)
            if args.stream_jobs:
                say(f"part 4: {args.stream_jobs} tiny jobs followed on their SSE stream")
                http = JsonClient(settings.port)
                results["stream_latency"] = part_stream_latency(
                    http, raw, sup, payload, args.stream_jobs, KEY, settings.port)
                http.close()
            results["api_memory"]["after_all"] = infra.memory(plat.procs["api"].pid)
            if args.batch_jobs:
                say(f"part 5: `aiorch batch run` of {args.batch_jobs} tiny jobs against a bare script "
                    "(bulk endpoint + one stream)")
                env = {k: v for k, v in os.environ.items() if not k.startswith("AIORCH_")}
                env["PYTHONPATH"] = str(ROOT)
                results["batch_run"] = part_batch_run(settings.port, KEY, payload, args.batch_jobs, env, say)
                # Thousands of jobs in flight, like part 1b's batches: beside the single-job figure.
                results["api_memory"]["after_batch_run"] = infra.memory(plat.procs["api"].pid)
            status = 0
        except BaseException as exc:
            results["error"] = f"{type(exc).__name__}: {exc}"
            for name in ("api", "cpu", "gpu", "raw"):
                tail = plat.log(name)
                if tail:
                    print(f"--- {name} log (tail) ---\n{tail[-1500:]}", file=sys.stderr)
            if not isinstance(exc, Exception):
                raise
        finally:
            # A worker that died mid-run (its log says why) explains lost jobs and missing webhooks.
            results["processes_exited"] = {name: proc.returncode for name, proc in plat.procs.items()
                                           if proc.poll() is not None}
            trouble = (results["processes_exited"] or results.get("worker_crashes") or "error" in results
                       or results.get("latency", {}).get("failures")
                       or results.get("webhooks", {}).get("problems"))
            if trouble and not args.keep_logs:
                _keep_logs(plat.logs, args.out / f"bench-{stamp}-logs")
                results["logs"] = str(args.out / f"bench-{stamp}-logs")
            results["host"]["loadavg_end"] = os.getloadavg()
            steal0, steal1 = results["host"].pop("steal_s_start"), steal_seconds()
            if steal0 is not None and steal1 is not None:
                # CPU seconds the hypervisor gave to other guests while this ran (all CPUs).
                results["host"]["cpu_stolen_s"] = round(steal1 - steal0, 1)
            results["elapsed_s"] = round(time.monotonic() - STARTED, 1)
            text, rows = table(results)
            results["table"] = rows
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / f"bench-{stamp}.json"
            path.write_text(json.dumps(results, indent=2, default=str) + "\n")
            print()
            print(f"aiorch bench  {results['mode']}  db={results['database']}  broker={results['broker']}  "
                  f"rev={results['revision']}  cpus={os.cpu_count()}  "
                  f"load {results['host']['loadavg_start'][0]:.2f}->{results['host']['loadavg_end'][0]:.2f}  "
                  f"CPU stolen {results['host'].get('cpu_stolen_s', '?')} s of "
                  f"{(os.cpu_count() or 1) * (time.monotonic() - STARTED):.0f}")
            print(text)
            if "error" in results:
                print(f"\nERROR: {results['error']}")
            if "logs" in results:
                print(f"process logs kept in {results['logs']}")
            print(f"\nwrote {path}")
    say("cleaned up")
    return status


def _delete_bench_rows(db: Database) -> None:
    with db.session() as session:
        ids = select(Job.id).where(Job.client_id == CLIENT).scalar_subquery()
        session.execute(delete(WebhookDelivery).where(WebhookDelivery.job_id.in_(ids)))
        session.execute(delete(StoredFile).where(StoredFile.job_id.in_(ids)))
        session.execute(delete(Job).where(Job.client_id == CLIENT))
    if db.is_postgres:
        # Tens of thousands of rows deleted at once leave their index entries behind until
        # autovacuum runs; the claim's neighbours check walks the queued-status index, so without
        # this part 2 would measure part 1b's debris, which no steady platform carries.
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            for table in ("jobs", "job_events", "stored_files"):
                connection.exec_driver_sql(f"VACUUM ANALYZE {table}")


def _keep_logs(source: Path, target: Path) -> None:
    if source.exists():
        shutil.copytree(source, target, dirs_exist_ok=True)


if __name__ == "__main__":
    sys.exit(main())
