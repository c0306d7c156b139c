"""Scheduling benchmark (issue 14): fair share, priority and ETA honesty on a queue with N slots.

    python -m bench.fairness [--embedded] [--slots 2] [--job-seconds 0.2]

A private Postgres database and RabbitMQ vhost (or the embedded default), the real API and one GPU
worker on ``gpu.diffusion`` with ``--slots`` pool processes, ``debug_sleep`` jobs of
``--job-seconds``. Four parts, each from an idle queue:

1. Fairness, one against a backlog: client A submits ``--backlog`` jobs, then client B one; how
   long after its submit B's job starts, in job times (target: within 2).
2. Fairness, three backlogs: A, B and C submit ``--each`` jobs one after the other; the largest
   spread of their finished counts, sampled while all three have jobs left, relative to the mean
   (target: within 10 %).
3. Priority: with ``--waiting`` jobs of A waiting, A submits one of priority 9; how many of the
   waiting jobs start before it (target: 0).
4. ETA honesty: ``--probes`` jobs submitted into a backlog of ``--waiting``; for each, the start
   its ``eta_utc`` predicts (eta − predict_time) against the real start, over the wait
   (target: median ≤ 0.25).

Numbers are written to bench-results/fairness-*.json and printed as a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import func, select

from bench import infra
from config import Settings
from models.db import Database
from models.jobs import Job
from models.migrate import upgrade
from tests.support.platform import ROOT, Platform, free_port

KEYS = {"a": "bench-a-key-0123456789", "b": "bench-b-key-0123456789", "c": "bench-c-key-0123456789"}
FINAL = {"succeeded", "failed", "cancelled", "expired", "rejected"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--embedded", action="store_true", help="SQLite + the filesystem transport")
    parser.add_argument("--slots", type=int, default=2, help="worker pool processes on the queue (2)")
    parser.add_argument("--job-seconds", type=float, default=0.2, help="each job's run time (0.2)")
    parser.add_argument("--backlog", type=int, default=500, help="part 1: client A's backlog (500)")
    parser.add_argument("--each", type=int, default=300, help="part 2: each client's backlog (300)")
    parser.add_argument("--waiting", type=int, default=200, help="parts 3-4: the backlog waiting (200)")
    parser.add_argument("--probes", type=int, default=20, help="part 4: jobs whose ETA is checked (20)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    return parser.parse_args(argv)


class Bench:
    def __init__(self, plat: Platform, job_seconds: float):
        self.plat = plat
        self.job_seconds = job_seconds
        self.http = requests.Session()

    def headers(self, who: str) -> dict[str, str]:
        return {"X-API-Key": KEYS[who]}

    def submit(self, who: str, n: int, priority: int = 0) -> list[str]:
        ids: list[str] = []
        for start in range(0, n, 1000):
            body = {
                "jobs": [
                    {"task": "debug_sleep", "payload": {"seconds": self.job_seconds}, "priority": priority}
                    for _ in range(min(1000, n - start))
                ]
            }
            response = self.http.post(
                f"{self.plat.base_url}/v1/jobs/batch", headers=self.headers(who), json=body, timeout=60
            )
            response.raise_for_status()
            ids += [entry["job_id"] for entry in response.json()["jobs"]]
        return ids

    def job(self, who: str, job_id: str) -> dict[str, Any]:
        response = self.http.get(
            f"{self.plat.base_url}/v1/jobs/{job_id}", headers=self.headers(who), timeout=10
        )
        response.raise_for_status()
        return dict(response.json())

    def wait_started(self, who: str, job_id: str, timeout: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(who, job_id)
            if job["started_at_ms"] is not None or job["status"] in FINAL:
                return job
            time.sleep(0.02)
        raise TimeoutError(f"{job_id} never started")

    def cancel_all(self, who: str, ids: list[str]) -> None:
        for start in range(0, len(ids), 1000):
            self.http.post(
                f"{self.plat.base_url}/v1/jobs/cancel",
                headers=self.headers(who),
                json={"ids": ids[start : start + 1000]},
                timeout=60,
            ).raise_for_status()

    def drain(self, timeout: float = 60) -> None:
        """Until no job of any client is running (cancelled backlogs end their current runs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = 0
            for who in KEYS:
                for status in ("running", "queued"):
                    url = f"{self.plat.base_url}/v1/jobs?status={status}&limit=1"
                    live += len(self.http.get(url, headers=self.headers(who), timeout=10).json()["jobs"])
            if not live:
                return
            time.sleep(0.1)


def part_one_against_backlog(bench: Bench, backlog: int, trials: int = 5) -> dict[str, Any]:
    """A's backlog, then B's single job ``trials`` times in a row (each at another moment of the
    slots' cycle: a pause of a varying fraction of a job time between them): how long after its
    submit each of B's jobs starts, in job times. The verdict is on the worst of them."""
    a_ids = bench.submit("a", backlog)
    time.sleep(bench.job_seconds * 2)  # A's first jobs hold the slots
    delays_ms = []
    for trial in range(trials):
        submitted = time.time() * 1000
        [b_id] = bench.submit("b", 1)
        started = bench.wait_started("b", b_id)["started_at_ms"]
        delays_ms.append(started - submitted)
        time.sleep(bench.job_seconds * (0.5 + trial / trials))
    bench.cancel_all("a", a_ids)
    bench.drain()
    in_jobs = [ms / 1000 / bench.job_seconds for ms in delays_ms]
    return {
        "backlog": backlog,
        "b_start_after_ms": [round(ms, 1) for ms in delays_ms],
        "b_start_after_jobs_median": round(statistics.median(in_jobs), 2),
        "b_start_after_jobs": round(max(in_jobs), 2),  # the worst: what the target holds
    }


def finished_counts(bench: Bench) -> dict[str, int]:
    counts = {}
    for who in KEYS:
        stats = bench.http.get(f"{bench.plat.base_url}/stats", headers=bench.headers(who), timeout=10).json()
        counts[who] = stats["counts"]["by_status"].get("succeeded", 0)
    return counts


def part_three_backlogs(bench: Bench, each: int) -> dict[str, Any]:
    """The spread of the three clients' finished counts (max - min, over the mean), sampled while
    every client has jobs left, from the point each has had about 10 % of its backlog done (before
    it, one job more or less is a large fraction of a tiny count)."""
    before = finished_counts(bench)
    ids = {who: bench.submit(who, each) for who in ("a", "b", "c")}
    spreads: list[float] = []
    gaps: list[int] = []
    deadline = time.monotonic() + each * 3 * bench.job_seconds * 3 + 60
    while time.monotonic() < deadline:
        now = finished_counts(bench)
        counts = {who: now[who] - before[who] for who in ids}
        if max(counts.values()) >= each:
            break
        mean = sum(counts.values()) / 3
        if mean >= each / 10:
            spreads.append((max(counts.values()) - min(counts.values())) / mean)
            gaps.append(max(counts.values()) - min(counts.values()))
        time.sleep(0.5)
    for who, mine in ids.items():
        bench.cancel_all(who, mine)
    bench.drain()
    return {
        "each": each,
        "samples": len(spreads),
        "max_spread": round(max(spreads, default=0.0), 3),
        "max_gap_jobs": max(gaps, default=0),
    }


def part_priority(bench: Bench, waiting: int, db: Database) -> dict[str, Any]:
    """A's priority-9 job behind ``waiting`` of A's jobs. Jobs already sent when it was submitted
    (a slot each and the one sent ahead) start first by right: the broker has them. What the target
    counts is a waiting job the dispatcher sent *before* the urgent one although the urgent one
    existed, that is after its submit was answered (committed, visible to every dispatcher); a job
    sent in the same fill (two slots freed at once) is not picked before it. A fill that ran while
    the submit's own transaction was still open could not see it (its row is stamped ``created_at``
    before the INSERT): such jobs are reported apart, as jobs sent before it existed. Read from the
    database (``dispatched_at`` against those moments and the urgent job's own ``dispatched_at``),
    not assumed."""
    backlog = bench.submit("a", waiting)
    time.sleep(bench.job_seconds)
    [urgent] = bench.submit("a", 1, priority=9)
    answered = datetime.now(UTC)
    started = bench.wait_started("a", urgent)["started_at_ms"]
    before = 0
    for job_id in backlog:
        job = bench.job("a", job_id)
        if job["started_at_ms"] is not None and job["started_at_ms"] < started:
            before += 1
        if job["started_at_ms"] is None:
            break  # the backlog starts in order: nothing after this one started before it
    with db.session() as session:
        mark = session.execute(select(Job.created_at, Job.dispatched_at).where(Job.id == urgent)).one()
        sent = Job.dispatched_at
        later = (Job.id.in_(backlog), sent > answered)
        overtook = session.scalar(select(func.count()).where(*later, sent < mark.dispatched_at))
        alongside = session.scalar(select(func.count()).where(*later, sent == mark.dispatched_at))
        unseen = (Job.id.in_(backlog), sent > mark.created_at, sent <= answered, sent < mark.dispatched_at)
        during_submit = session.scalar(select(func.count()).where(*unseen))
    bench.cancel_all("a", backlog)
    bench.drain()
    return {
        "waiting": waiting,
        "started_before": before,
        "sent_in_its_fill": int(alongside or 0),
        "sent_while_its_submit_was_open": int(during_submit or 0),
        "waiting_started_before": int(overtook or 0),
    }


def part_eta(bench: Bench, waiting: int, probes: int) -> dict[str, Any]:
    backlog = bench.submit("a", waiting)
    time.sleep(bench.job_seconds)
    ids = bench.submit("a", probes)
    predicted = {}
    asked = time.time() * 1000
    for job_id in ids:
        job = bench.job("a", job_id)
        eta = datetime.fromisoformat(job["eta_utc"]).timestamp() * 1000
        predicted[job_id] = (eta - job["predict_time"] * 1000, time.time() * 1000)
    errors = []
    for job_id in ids:
        start = bench.wait_started("a", job_id, timeout=waiting * bench.job_seconds * 4 + 120)[
            "started_at_ms"
        ]
        guess, when = predicted[job_id]
        wait = start - when
        if wait > 0:
            errors.append(abs(start - guess) / wait)
    bench.cancel_all("a", backlog + ids)
    bench.drain()
    return {
        "waiting": waiting,
        "probes": len(errors),
        "median_error_over_wait": round(statistics.median(errors), 3) if errors else None,
        "read_after_ms": round(time.time() * 1000 - asked, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_id = uuid.uuid4().hex[:10]
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": vars(args),
    }
    results["args"] = {**vars(args), "out": str(args.out)}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aiorch-fair-")))
        port = free_port()
        overrides: dict[str, Any] = {}
        if not args.embedded:
            overrides["database_url"] = stack.enter_context(infra.private_database(f"aiorch_fair_{run_id}"))
            overrides["broker_url"] = stack.enter_context(infra.private_vhost(f"aiorch_fair_{run_id}"))
        settings = Settings(
            var_dir=tmp,
            port=port,
            public_url=f"http://127.0.0.1:{port}",
            api_keys=tuple(KEYS.items()),
            debug_tasks=True,
            storage_dir=tmp / "storage",
            **overrides,
        )
        db = Database(settings)
        upgrade(db)
        stack.callback(db.dispose)
        plat = Platform(settings, tmp / "logs")
        stack.callback(plat.stop)
        plat.start_api()
        plat.start_worker("gpu", "gpu.diffusion", args.slots)
        plat.start_worker("cpu", "cpu", 1)
        infra.wait_warm(plat, "gpu", children=args.slots)
        bench = Bench(plat, args.job_seconds)
        results["one_against_backlog"] = part_one_against_backlog(bench, args.backlog)
        results["three_backlogs"] = part_three_backlogs(bench, args.each)
        results["priority"] = part_priority(bench, args.waiting, db)
        results["eta"] = part_eta(bench, args.waiting, args.probes)
    rows = [
        (
            f"B's single job starts after A's backlog of {args.backlog}, worst of 5 "
            f"(median {results['one_against_backlog']['b_start_after_jobs_median']})",
            results["one_against_backlog"]["b_start_after_jobs"],
            "job times",
            "<= 2",
            results["one_against_backlog"]["b_start_after_jobs"] <= 2,
        ),
        (
            f"3 clients x {args.each}: largest spread of finished counts",
            results["three_backlogs"]["max_spread"],
            "of the mean",
            "<= 0.10",
            results["three_backlogs"]["max_spread"] <= 0.10,
        ),
        (
            f"priority 9 behind {args.waiting} waiting: waiting jobs started first",
            results["priority"]["waiting_started_before"],
            "jobs",
            "0",
            results["priority"]["waiting_started_before"] == 0,
        ),
        (
            f"ETA into a backlog of {args.waiting}: median |start - predicted| / wait",
            results["eta"]["median_error_over_wait"],
            "",
            "<= 0.25",
            (results["eta"]["median_error_over_wait"] or 9) <= 0.25,
        ),
    ]
    mode = "embedded" if args.embedded else "postgres+rabbitmq"
    print(f"aiorch fairness bench  {mode}  slots={args.slots}  job={args.job_seconds}s")
    for name, value, unit, target, ok in rows:
        print(f"{name:<72} {value!s:>8} {unit:<12} target {target:<8} {'PASS' if ok else 'FAIL'}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fairness-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
