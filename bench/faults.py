"""Broker and database restarts under a load of about a thousand jobs (issue 18, items 4 and 5),
measured: jobs lost, jobs ended twice, what the API answered while the service was down, and how
long the platform took to recover.

    python -m bench.faults                       # both faults, 1,000 jobs each, 10 s outages
    python -m bench.faults --only broker --jobs 300 --outage 5

Each fault gets a service of its own that the benchmark starts (a RabbitMQ node or a Postgres
cluster on another port, in a temp dir: never the machine's shared ones) and a platform on it: the
API, a GPU worker with ``--slots`` processes, a cpu worker and beat. ``--jobs`` ``debug_sleep`` jobs go in
through ``POST /v1/jobs/batch``; once a quarter of them have ended the service is stopped for
``--outage`` seconds while a prober keeps submitting single jobs and reading the batch, then started
again. Every job accepted (before or during the outage) is then waited for.

Reported per fault: accepted, lost (not final at the deadline), ended twice (more than one
``job.finished`` event), attempts > 1, the answers during the outage (202 / 503 with
``Retry-After`` / anything else), seconds from the restart to the API's first good answer and to
the first job ending, the time every job took to end after the restart against the work left at
the restart (jobs left x sleep / slots), and whether beat sent its next sweep after the restart (it
reconnected by itself).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
import requests

from bench import infra
from config import Settings
from models.db import Database
from models.migrate import upgrade
from tests.support.outages import finished_events
from tests.support.platform import FINAL, ROOT, Platform, free_port
from tests.support.private_postgres import private_postgres
from tests.support.private_rabbitmq import private_rabbitmq

CLIENT, KEY = "faults", "faults-key-" + uuid.uuid4().hex
HEADERS = {"X-API-Key": KEY}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=("broker", "database"), help="one fault only")
    parser.add_argument(
        "--jobs", type=int, default=1000, help="jobs submitted before the fault (default 1000)"
    )
    parser.add_argument("--outage", type=float, default=10.0, help="seconds the service is down (default 10)")
    parser.add_argument("--slots", type=int, default=4, help="GPU worker processes (default 4)")
    parser.add_argument(
        "--sleep", type=float, default=0.05, help="seconds each job holds a slot (default 0.05)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    return parser.parse_args(argv)


def settings_for(tmp: Path, database_url: str, broker_url: str) -> Settings:
    port = free_port()
    return Settings(
        var_dir=tmp,
        port=port,
        public_url=f"http://127.0.0.1:{port}",
        api_keys=((CLIENT, KEY),),
        debug_tasks=True,
        storage_dir=tmp / "storage",
        database_url=database_url,
        broker_url=broker_url,
    )


@contextlib.contextmanager
def platform_on(settings: Settings, tmp: Path, slots: int) -> Iterator[Platform]:
    db = Database(settings)
    upgrade(db)
    db.dispose()
    plat = Platform(settings, tmp / "logs")
    try:
        plat.start_api()
        plat.start_worker("gpu", "gpu.diffusion", slots)
        plat.start_worker("cpu", "cpu", 1)
        plat.start_beat()
        yield plat
    finally:
        plat.stop()


class Prober:
    """Single submits and batch reads every 0.25 s while the fault lasts: what the API answered."""

    def __init__(self, plat: Platform, batch_ids: list[str], sleep: float):
        self.plat, self.batch_ids, self.sleep = plat, batch_ids, sleep
        self.answers: dict[str, int] = {}
        self.accepted: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def note(self, what: str, response: requests.Response | None) -> None:
        if response is None:
            key = f"{what} no answer"
        elif response.status_code == 503:
            retry = response.headers.get("Retry-After")
            key = f"{what} 503 {'with' if retry else 'without'} Retry-After"
        else:
            key = f"{what} {response.status_code}"
        self.answers[key] = self.answers.get(key, 0) + 1

    def run(self) -> None:
        while not self.stop.wait(0.25):
            response = None
            with contextlib.suppress(requests.RequestException):
                response = requests.post(
                    self.plat.base_url + "/v1/jobs",
                    json={"task": "debug_sleep", "payload": {"seconds": self.sleep}},
                    headers=HEADERS,
                    timeout=10,
                )
            self.note("POST /v1/jobs", response)
            if response is not None and response.status_code == 202:
                self.accepted.append(response.json()["job_id"])
            read = None
            with contextlib.suppress(requests.RequestException):
                read = requests.get(
                    f"{self.plat.base_url}/v1/batches/{self.batch_ids[0]}", headers=HEADERS, timeout=10
                )
            self.note("GET /v1/batches/{id}", read)


SWEEP_EVERY = 30.0  # seconds between beat's sweeps (tasks/celery_app.py)
BEAT_SENT = "Sending due task"


def beat_log(plat: Platform) -> str:
    path = plat.logs / "beat.log"
    return path.read_text(errors="replace") if path.exists() else ""


def beat_sends_after(plat: Platform, mark: int, deadline: float) -> int:
    """How many tasks beat sent since ``mark`` of them, waiting for one until ``deadline``."""
    while True:
        sent = beat_log(plat).count(BEAT_SENT) - mark
        if sent > 0 or time.monotonic() >= deadline:
            return sent
        time.sleep(0.5)


def submit_batches(plat: Platform, jobs: int, sleep: float) -> tuple[list[str], list[str]]:
    ids: list[str] = []
    batches: list[str] = []
    for start in range(0, jobs, 500):
        items: list[Any] = [
            {"task": "debug_sleep", "payload": {"seconds": sleep}} for _ in range(min(500, jobs - start))
        ]
        answer = requests.post(
            plat.base_url + "/v1/jobs/batch", json={"jobs": items}, headers=HEADERS, timeout=60
        )
        answer.raise_for_status()
        body = answer.json()
        batches.append(body["batch_id"])
        ids.extend(item["job_id"] for item in body["jobs"] if item.get("job_id"))
    return ids, batches


def final_count(plat: Platform, batches: list[str]) -> int | None:
    total = 0
    for batch_id in batches:
        try:
            answer = requests.get(f"{plat.base_url}/v1/batches/{batch_id}", headers=HEADERS, timeout=10)
        except requests.RequestException:
            return None
        if answer.status_code != 200:
            return None
        total += sum(n for status, n in answer.json()["counts"].items() if status in FINAL)
    return total


def finals_of(plat: Platform, ids: list[str]) -> dict[str, dict[str, Any]]:
    jobs: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), 50):
        with contextlib.suppress(requests.RequestException):
            answer = requests.get(
                plat.base_url + "/v1/jobs?ids=" + ",".join(ids[start : start + 50]),
                headers=HEADERS,
                timeout=10,
            )
            if answer.status_code == 200:
                jobs.update((job["job_id"], job) for job in answer.json()["jobs"])
    return jobs


def run_fault(plat: Platform, args: argparse.Namespace, stop: Any, start: Any) -> dict[str, Any]:
    ids, batches = submit_batches(plat, args.jobs, args.sleep)
    while (final_count(plat, batches) or 0) < len(ids) // 4:
        time.sleep(0.2)
    prober = Prober(plat, batches, args.sleep)
    left_at_fault = len(ids) - (final_count(plat, batches) or 0)
    stop()
    down_at = time.monotonic()
    prober.thread.start()
    time.sleep(args.outage)
    beat_mark = beat_log(plat).count(BEAT_SENT)
    start()
    back_at = time.monotonic()
    prober.stop.set()
    prober.thread.join(timeout=20)
    first_good = first_end = None
    ended_before = final_count(plat, batches)  # None while the API cannot read yet
    all_ids = ids + prober.accepted
    work_left = left_at_fault * args.sleep / args.slots
    deadline = back_at + 30 + 3 * work_left + 30
    done = 0
    while time.monotonic() < deadline:
        count = final_count(plat, batches)
        now = time.monotonic()
        if count is not None and first_good is None:
            first_good = now - back_at
            ended_before = count if ended_before is None else ended_before
        if count is not None and first_end is None and ended_before is not None and count > ended_before:
            first_end = now - back_at
        if count is not None and count >= len(ids):
            extra = finals_of(plat, prober.accepted)
            if all(job.get("status") in FINAL for job in extra.values()) and len(extra) == len(
                prober.accepted
            ):
                done = len(all_ids)
                break
        time.sleep(0.2)
    all_done_after = time.monotonic() - back_at
    beat_sent = beat_sends_after(plat, beat_mark, back_at + SWEEP_EVERY + 15)
    jobs = finals_of(plat, all_ids)
    events = finished_events(plat.settings.database_url, all_ids)
    statuses: dict[str, int] = {}
    for job in jobs.values():
        statuses[job["status"]] = statuses.get(job["status"], 0) + 1
    return {
        "accepted_before": len(ids),
        "accepted_during": len(prober.accepted),
        "left_at_fault": left_at_fault,
        "outage_s": round(back_at - down_at, 2),
        "answers_during_outage": prober.answers,
        "lost": len([i for i in all_ids if jobs.get(i, {}).get("status") not in FINAL]),
        "ended_twice": len([i for i, n in events.items() if n > 1]),
        "attempts_over_1": len([j for j in jobs.values() if (j.get("attempts") or 0) > 1]),
        "statuses": statuses,
        "api_good_after_restart_s": None if first_good is None else round(first_good, 2),
        "first_job_end_after_restart_s": None if first_end is None else round(first_end, 2),
        "all_final_after_restart_s": round(all_done_after, 2) if done else None,
        "work_left_at_fault_s": round(work_left, 2),
        # Beat's sweep sent after the restart (it runs every SWEEP_EVERY s): beat reconnected by itself.
        "beat_sent_after_restart": beat_sent,
    }


def fault_broker(args: argparse.Namespace, tmp: Path, run_id: str) -> dict[str, Any]:
    with private_rabbitmq() as node, infra.private_database(f"aiorch_faults_{run_id}") as db_url:
        settings = settings_for(tmp / "broker", db_url, node.url)
        with platform_on(settings, tmp / "broker", args.slots) as plat:
            return run_fault(plat, args, node.stop, node.start)


def fault_database(args: argparse.Namespace, tmp: Path, run_id: str) -> dict[str, Any]:
    with private_postgres() as cluster, infra.private_vhost(f"aiorch_faults_{run_id}") as broker:
        conn = psycopg2.connect(cluster.url)
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE aiorch")
        conn.close()
        settings = settings_for(tmp / "database", cluster.url.rsplit("/", 1)[0] + "/aiorch", broker)
        with platform_on(settings, tmp / "database", args.slots) as plat:
            return run_fault(plat, args, cluster.stop, cluster.start)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_id = uuid.uuid4().hex[:10]
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": {**vars(args), "out": str(args.out)},
    }
    with tempfile.TemporaryDirectory(prefix="aiorch-faults-") as folder:
        tmp = Path(folder)
        for name, fault in (("broker", fault_broker), ("database", fault_database)):
            if args.only in (None, name):
                print(f"[faults] {name} restart under {args.jobs} jobs", file=sys.stderr, flush=True)
                results[name] = fault(args, tmp, run_id)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"faults-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(results, indent=2))
    ok = True
    for name in ("broker", "database"):
        if name in results:
            r = results[name]
            ok = ok and r["lost"] == 0 and r["ended_twice"] == 0
            print(f"{name} restart: {json.dumps(r)}")
    print(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
