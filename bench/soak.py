"""The soak (issue 18, item 6): the whole platform under a steady mixed load for a long time, and
whether anything grows that should not.

    python -m bench.soak                      # 30 minutes, Postgres + RabbitMQ (private database + vhost)
    python -m bench.soak --minutes 3 --warmup-minutes 1     # a short look

What runs: the API (``aiorch serve`` as it ships), a GPU worker (super-resolution and the debug
queue, 2 processes), a cpu worker (webhooks, sweeps' tasks) and beat (the periodic sweeps: expiry,
re-publish, retention, event pruning), configured as production is: the SSRF guard on and the
webhook receiver, an https server with its own CA, reached through the operator allow-list.

The load, open loop at ``--rate`` arrivals a second: tiny upscales (32 px ``data:`` PNG) and short
``debug_sleep`` jobs with webhooks (one delivery in ten answered 500, so retries run too), jobs whose
engine raises (failed), jobs cancelled right after their submit, refused bodies (422), batches of
five through ``POST /v1/jobs/batch``, and a multiplexed SSE stream over the last few seconds' jobs
opened every five seconds. A poller reads the outstanding jobs with ``GET /v1/jobs?ids=`` and
records submit -> final.

Every ``--sample`` seconds: RSS and open file descriptors of every process of each role (API,
GPU worker, cpu worker, beat; a role's processes summed), the ready messages of every queue, the
jobs not yet final, and the event log's rows. The report fits a least-squares line to each series
after the warm-up and gives its slope per hour and its growth over the measured span; it compares
the p99 latencies of the first and second halves of that span.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text

from bench import infra
from bench.run import tiny_png_uri
from bench.stats import percentile
from config import QUEUES, Settings
from models.db import Database
from models.migrate import upgrade
from tasks.celery_app import create_celery
from tests.support.platform import FINAL, ROOT, Platform, free_port
from tests.support.servers import TlsSite, WebhookReceiver

CLIENT, KEY = "soak", "soak-key-" + uuid.uuid4().hex
ROLES = ("api", "gpu", "cpu", "beat")
RSS_FLAT = 0.05  # growth over the measured span, as a share of the role's mean RSS
FDS_FLAT = 5  # open descriptors gained by a role over the measured span


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the whole soak (default 30)")
    parser.add_argument(
        "--warmup-minutes", type=float, default=5.0, help="not counted in the slopes (default 5)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=3.0,
        help="arrivals per second (default 3: about 4.5 jobs a second with the batches)",
    )
    parser.add_argument("--sample", type=float, default=15.0, help="seconds between samples (default 15)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    return parser.parse_args(argv)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than two points)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def role_sample(pid: int | None) -> dict[str, Any]:
    """RSS (MB), open descriptors and process count of a role's process tree."""
    if pid is None:
        return {"rss_mb": None, "fds": None, "procs": 0}
    tree = infra.process_tree(pid)
    fds = 0
    for each in tree:
        with contextlib.suppress(OSError):
            fds += len(os.listdir(f"/proc/{each}/fd"))
    return {"rss_mb": infra.memory(pid)["rss_mb"], "fds": fds, "procs": len(tree)}


class Client:
    """One keep-alive connection (a thread's own)."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body)
        headers = {"X-API-Key": KEY, "Content-Type": "application/json"}
        try:
            self.conn.request(method, path, body=data, headers=headers)
            response = self.conn.getresponse()
            raw = response.read()
        except (http.client.HTTPException, OSError):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            raise
        return response.status, json.loads(raw) if raw else None


class Load:
    """The open-loop arrivals, the poller and the periodic stream; what each job did."""

    def __init__(self, port: int, rate: float, webhook_url: str):
        self.port, self.rate, self.webhook_url = port, rate, webhook_url
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.outstanding: dict[str, float] = {}  # job id -> submit time (monotonic)
        self.recent: list[tuple[float, str]] = []  # (submit time, id) for the streams
        self.done: list[tuple[float, float, str]] = []  # (time seen final, submit -> final s, status)
        self.counts: dict[str, int] = {}
        self.errors: list[str] = []
        self.image = tiny_png_uri()
        self.rng = random.Random(7)

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + n

    def _accepted(self, job_id: str, t0: float) -> None:
        with self.lock:
            self.outstanding[job_id] = t0
            self.recent.append((t0, job_id))

    def _arrival(self, client: Client) -> None:
        kind = self.rng.random()
        hook = {"webhook_url": self.webhook_url}
        t0 = time.monotonic()
        if kind < 0.50:
            status, body = client.call(
                "POST",
                "/v1/jobs",
                {"task": "upscale", "payload": {"image_url": self.image, "scale": 2}, **hook},
            )
        elif kind < 0.72:
            status, body = client.call(
                "POST", "/v1/jobs", {"task": "debug_sleep", "payload": {"seconds": 0.2}, **hook}
            )
        elif kind < 0.77:
            status, body = client.call(
                "POST",
                "/v1/jobs",
                {"task": "debug_sleep", "payload": {"seconds": 0.05, "crash": "raise"}, **hook},
            )
        elif kind < 0.82:
            status, body = client.call(
                "POST", "/v1/jobs", {"task": "debug_sleep", "payload": {"seconds": 2.0}}
            )
            if status == 202:
                client.call("POST", f"/v1/jobs/{body['job_id']}/cancel")
        elif kind < 0.87:
            status, body = client.call("POST", "/v1/jobs", {"task": "upscale", "payload": {"scale": 2}})
            self.count("refused_422" if status == 422 else f"refused_unexpected_{status}")
            return
        else:
            items = [{"task": "debug_sleep", "payload": {"seconds": 0.05}} for _ in range(5)]
            status, body = client.call("POST", "/v1/jobs/batch", {"jobs": items})
            if status == 200:
                for item in body["jobs"]:
                    if item.get("job_id"):
                        self._accepted(item["job_id"], t0)
                self.count("batches")
            else:
                self.count(f"batch_{status}")
            return
        if status == 202:
            self._accepted(body["job_id"], t0)
            self.count("accepted")
        else:
            self.count(f"submit_{status}")
            self.errors.append(f"submit answered {status}: {str(body)[:200]}")

    def submitter(self) -> None:
        client = Client(self.port)
        next_at = time.monotonic()
        while not self.stop.is_set():
            next_at += self.rng.expovariate(self.rate)
            with contextlib.suppress(Exception):
                self._arrival(client)
            time.sleep(max(0.0, next_at - time.monotonic()))

    def poller(self) -> None:
        client = Client(self.port)
        while not self.stop.wait(0.2):
            with self.lock:
                ids = list(self.outstanding)[:50]  # the most one ``?ids=`` takes
            if not ids:
                continue
            try:
                status, body = client.call("GET", "/v1/jobs?ids=" + ",".join(ids))
            except Exception as exc:  # noqa: BLE001 (counted; the next round tries again)
                self.errors.append(f"poll: {exc}")
                continue
            if status != 200:
                self.errors.append(f"poll answered {status}: {str(body)[:200]}")
                continue
            now = time.monotonic()
            for job in body.get("jobs", []):
                if job["status"] in FINAL:
                    with self.lock:
                        t0 = self.outstanding.pop(job["job_id"], None)
                        if t0 is not None:
                            self.done.append((now, now - t0, job["status"]))

    def streamer(self) -> None:
        """Every 5 s, one ``GET /v1/events?ids=`` over the jobs of the last 5 s, read to its end."""
        while not self.stop.wait(5.0):
            cutoff = time.monotonic() - 5.0
            with self.lock:
                self.recent = [(t, j) for t, j in self.recent if t >= cutoff - 30]
                ids = [j for t, j in self.recent if t >= cutoff][:200]
            if not ids:
                continue
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            try:
                conn.request("GET", "/v1/events?ids=" + ",".join(ids), headers={"X-API-Key": KEY})
                response = conn.getresponse()
                events = sum(1 for line in iter(response.readline, b"") if line.startswith(b"data: "))
                self.count("stream_events", events)
                self.count("streams")
            except Exception as exc:  # noqa: BLE001
                self.errors.append(f"stream: {exc}")
            finally:
                conn.close()


def fitted(samples: list[dict[str, Any]], start: float, key: Any) -> dict[str, Any]:
    """Slope per hour, growth over the measured span and mean of one series after ``start``."""
    points = [(s["t"], key(s)) for s in samples if s["t"] >= start and key(s) is not None]
    if len(points) < 2:
        return {"n": len(points)}
    xs, ys = [p[0] for p in points], [float(p[1]) for p in points]
    per_s = slope(xs, ys)
    span = xs[-1] - xs[0]
    return {
        "n": len(points),
        "mean": round(sum(ys) / len(ys), 2),
        "slope_per_hour": round(per_s * 3600, 2),
        "growth_over_span": round(per_s * span, 2),
        "first": ys[0],
        "last": ys[-1],
    }


def p99_halves(done: list[tuple[float, float, str]], start: float, end: float) -> dict[str, Any]:
    middle = (start + end) / 2
    first = [d[1] * 1000 for d in done if start <= d[0] < middle]
    second = [d[1] * 1000 for d in done if middle <= d[0] <= end]
    return {
        "first_half_ms": percentile(first, 99),
        "second_half_ms": percentile(second, 99),
        "n": [len(first), len(second)],
    }


def webhook_delays(receiver: WebhookReceiver, start_wall: float) -> list[tuple[float, float]]:
    """(receive wall time, ms after the body's finished_at_ms) of each delivery after start."""
    out = []
    for hit in list(receiver.received):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            finished = json.loads(hit.body)["finished_at_ms"]
            if hit.at >= start_wall and finished:
                out.append((hit.at, hit.at * 1000 - finished))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_id = uuid.uuid4().hex[:10]
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": {**vars(args), "out": str(args.out)},
    }
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aiorch-soak-")))
        site = TlsSite("localhost")
        receiver = WebhookReceiver(tls=site, host="localhost", plan=lambda n: 500 if n % 10 == 0 else 200)
        receiver.start()
        stack.callback(receiver.stop)
        port = free_port()
        settings = Settings(
            var_dir=tmp,
            port=port,
            public_url=f"http://127.0.0.1:{port}",
            api_keys=((CLIENT, KEY),),
            debug_tasks=True,
            storage_dir=tmp / "storage",
            allow_private_urls=False,
            allow_private_networks=("127.0.0.0/8", "::1/128"),
            ca_bundle=site.ca_file(tmp),
            webhook_retry_base=1.0,
            database_url=stack.enter_context(infra.private_database(f"aiorch_soak_{run_id}")),
            broker_url=stack.enter_context(infra.private_vhost(f"aiorch_soak_{run_id}")),
        )
        db = Database(settings)
        upgrade(db)
        stack.callback(db.dispose)
        plat = Platform(settings, tmp / "logs")
        stack.callback(plat.stop)
        plat.start_api()
        plat.start_worker("gpu", "gpu.superres,gpu.diffusion", 2)
        plat.start_worker("cpu", "cpu", 2)
        plat.start_beat()
        celery = create_celery(settings)
        load = Load(port, args.rate, receiver.url)
        threads = [
            threading.Thread(target=t, daemon=True) for t in (load.submitter, load.poller, load.streamer)
        ]
        for thread in threads:
            thread.start()
        began, began_wall = time.monotonic(), time.time()
        end = began + args.minutes * 60
        warm = args.warmup_minutes * 60
        samples: list[dict[str, Any]] = []
        while time.monotonic() < end:
            time.sleep(min(args.sample, max(0.0, end - time.monotonic())))
            sample: dict[str, Any] = {"t": round(time.monotonic() - began, 1)}
            for role in ROLES:
                proc = plat.procs.get(role)
                sample[role] = role_sample(None if proc is None or proc.poll() is not None else proc.pid)
            sample["queues"] = infra.queue_depths(celery, list(QUEUES))
            with db.engine.connect() as conn:
                sample["not_final"] = conn.execute(
                    text(
                        "SELECT count(*) FROM jobs WHERE status NOT IN "
                        "('succeeded','failed','cancelled','expired','rejected')"
                    )
                ).scalar()
                sample["event_rows"] = conn.execute(text("SELECT count(*) FROM job_events")).scalar()
            with load.lock:
                sample["finished"] = len(load.done)
            samples.append(sample)
            print(
                f"[soak {sample['t']:7.1f}s] finished {sample['finished']}, not final {sample['not_final']}, "
                + ", ".join(f"{r} {sample[r]['rss_mb']} MB/{sample[r]['fds']} fds" for r in ROLES),
                file=sys.stderr,
                flush=True,
            )
        load.stop.set()
        for thread in threads:
            thread.join(timeout=70)
        start, stop = warm, time.monotonic() - began
        series: dict[str, Any] = {}
        for role in ROLES:
            series[f"{role}_rss_mb"] = fitted(samples, start, lambda s, r=role: s[r]["rss_mb"])
            series[f"{role}_fds"] = fitted(samples, start, lambda s, r=role: s[r]["fds"])
        series["ready_messages"] = fitted(samples, start, lambda s: sum(v or 0 for v in s["queues"].values()))
        series["jobs_not_final"] = fitted(samples, start, lambda s: s["not_final"])
        series["event_rows"] = fitted(samples, start, lambda s: s["event_rows"])
        hooks = webhook_delays(receiver, began_wall + warm)
        middle_wall = began_wall + (warm + stop) / 2
        results.update(
            samples=samples,
            series=series,
            counts=load.counts,
            errors=load.errors[:50],
            finished=len(load.done),
            statuses=_statuses(load.done),
            latency_p99=p99_halves(load.done, began + start, began + stop),
            webhook_p99_ms={
                "first_half": percentile([d for t, d in hooks if t < middle_wall], 99),
                "second_half": percentile([d for t, d in hooks if t >= middle_wall], 99),
            },
            still_outstanding=len(load.outstanding),
        )
    verdicts = judge(results)
    results["verdicts"] = verdicts
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"soak-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(report(results))
    print(f"\nwrote {path}")
    return 0 if all(v["ok"] for v in verdicts) else 1


def _statuses(done: list[tuple[float, float, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, _, status in done:
        counts[status] = counts.get(status, 0) + 1
    return counts


def judge(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat means: a role's RSS grew by at most ``RSS_FLAT`` of its mean over the measured span,
    its descriptors by at most ``FDS_FLAT``, and the backlog (ready messages, jobs not final) by
    less than a second's arrivals."""
    series, out = results["series"], []
    rate = results["args"]["rate"]
    for role in ROLES:
        rss, fds = series[f"{role}_rss_mb"], series[f"{role}_fds"]
        if "mean" in rss:
            out.append(
                {
                    "what": f"{role} RSS growth",
                    "value": rss["growth_over_span"],
                    "limit": round(RSS_FLAT * rss["mean"], 1),
                    "ok": rss["growth_over_span"] <= RSS_FLAT * rss["mean"],
                }
            )
        if "mean" in fds:
            out.append(
                {
                    "what": f"{role} open fds growth",
                    "value": fds["growth_over_span"],
                    "limit": FDS_FLAT,
                    "ok": fds["growth_over_span"] <= FDS_FLAT,
                }
            )
    for name in ("ready_messages", "jobs_not_final"):
        if "mean" in series[name]:
            out.append(
                {
                    "what": f"{name} growth",
                    "value": series[name]["growth_over_span"],
                    "limit": rate,
                    "ok": series[name]["growth_over_span"] <= rate,
                }
            )
    return out


def report(results: dict[str, Any]) -> str:
    lines = [
        f"aiorch soak  {results['args']['minutes']} min at {results['args']['rate']}/s  "
        f"finished {results['finished']} {results['statuses']}  outstanding at the end "
        f"{results['still_outstanding']}",
        "",
    ]
    lines.append(f"{'series (after warm-up)':32} {'mean':>10} {'slope/h':>10} {'growth':>10}")
    for name, fit in results["series"].items():
        if "mean" in fit:
            lines.append(
                f"{name:32} {fit['mean']:>10} {fit['slope_per_hour']:>10} {fit['growth_over_span']:>10}"
            )
    lat, hooks = results["latency_p99"], results["webhook_p99_ms"]
    lines += [
        "",
        f"submit -> final p99: first half {lat['first_half_ms']} ms, second half {lat['second_half_ms']} ms",
        f"webhook after finished_at p99: first half {hooks['first_half']} ms, "
        f"second half {hooks['second_half']} ms",
        f"counts {results['counts']}",
        "",
    ]
    for verdict in results["verdicts"]:
        lines.append(
            f"{verdict['what']:32} {verdict['value']:>10} <= {verdict['limit']:<8} "
            f"{'PASS' if verdict['ok'] else 'FAIL'}"
        )
    if results["errors"]:
        lines.append(f"errors (first): {results['errors'][:3]}")
    return "\n".join(lines)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
