"""``python -m bench.reads``: the read paths against a million jobs of history (issue 13, item 4).

A private Postgres database and RabbitMQ vhost (dropped after), the API as it ships (one gunicorn
process). The same calls are timed twice, one at a time on a kept-alive connection:

1. on a table that holds one page of jobs (60 of the benchmark client's, submitted through
   ``POST /v1/jobs/batch``): the "empty" table;
2. after one ``INSERT ... SELECT generate_series`` has added 1,000,000 older jobs spread over six
   clients, four tasks and every status (the history), and ``VACUUM ANALYZE jobs``.

The history is older than the 60 jobs, so every call answers the same page and the same latest
jobs both times: what differs is only the history under them. Target (issue 13): ``/metrics``,
``/stats``, ``GET /v1/jobs?limit=50`` and ``GET /v1/jobs/{id}`` each p50 <= 20 ms and <= 2x the
same call on the empty table. Other lines (the admin's listing and overview, ``?ids=``, a page deep in
the history, a status filter) are shown beside them against the same target.

Last, what the status counters (the ``jobs`` triggers of migration 0010) and the ``(created_at,
id)`` index cost a submit: ``POST /v1/jobs`` and ``POST /v1/jobs/batch`` (500 jobs) timed in rounds
with the counting triggers enabled, disabled, and disabled with the index dropped.

Prints a table and writes ``bench-results/reads-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench import infra
from bench.run import JsonClient, git_revision, tiny_png_uri
from bench.stats import steal_seconds, summary_ms
from config import Settings
from models.db import Database
from models.migrate import upgrade
from tests.support.platform import ROOT, Platform, free_port

CLIENT = "bench"
KEY = "bench-key-" + uuid.uuid4().hex
ADMIN = "ops"
ADMIN_KEY = "ops-key-" + uuid.uuid4().hex
PAGE_JOBS = 60
STARTED = time.monotonic()
PORT = [0]  # the API's, once chosen
P50_LIMIT_MS = 20.0
RATIO_LIMIT = 2.0
# The jobs triggers that keep job_status_counts (models/migrations/versions/0010_job_status_counts.py).
COUNTING_TRIGGERS = ("jobs_count_inserted", "jobs_count_moved", "jobs_count_deleted")
CREATED_INDEX = "ix_jobs_created"

# The history: 1,000,000 jobs, older than the page, over six clients (a third are the benchmark
# client's), four tasks on their queues, and every status (mostly succeeded, a few live ones).
SEED = """
INSERT INTO jobs (id, client_id, task, engine_task, queue, status, stage, progress, priority,
                  payload, metadata, result, error, attempts, cancel_requested, predict_time,
                  created_at, queued_at, started_at, finished_at, updated_at, event_seq)
SELECT md5('seed' || g), client, task, task, queue, status,
       CASE WHEN status = 'queued' THEN 'run' WHEN status = 'running' THEN 'local' ELSE 'done' END,
       CASE WHEN status = 'succeeded' THEN 100 ELSE 0 END, 0,
       '{"image_url": "https://example.com/in.png", "scale": 2}', '{}',
       CASE WHEN status = 'succeeded' THEN '{"url": "https://example.com/out.png"}' END::json,
       CASE WHEN status IN ('failed', 'rejected', 'cancelled', 'expired')
            THEN json_build_object('code', status, 'message', 'seeded') END,
       1, false, 2.0, created, created,
       CASE WHEN status IN ('succeeded', 'failed', 'running') THEN created + interval '1 second' END,
       CASE WHEN status NOT IN ('queued', 'running') THEN created + interval '3 seconds' END,
       created + interval '3 seconds', 2
  FROM (SELECT g,
               (ARRAY['bench', 'bench', 'c1', 'c2', 'c3', 'c4'])[1 + mod(g, 6)] AS client,
               (ARRAY['upscale', 'generate', 'remove_background', 'faceswap'])[1 + mod(g / 7, 4)] AS task,
               (ARRAY['gpu.superres', 'gpu.diffusion', 'gpu.vision', 'gpu.faceswap'])[1 + mod(g / 7, 4)]
                 AS queue,
               CASE WHEN mod(g, 1000) < 900 THEN 'succeeded' WHEN mod(g, 1000) < 950 THEN 'failed'
                    WHEN mod(g, 1000) < 980 THEN 'cancelled' WHEN mod(g, 1000) < 990 THEN 'expired'
                    WHEN mod(g, 1000) < 995 THEN 'rejected' WHEN mod(g, 1000) < 998 THEN 'queued'
                    ELSE 'running' END AS status,
               now() - interval '1 hour' - g * interval '1 second' AS created
          FROM generate_series(1, {rows}) AS g) AS seeded
"""


def say(message: str) -> None:
    print(f"[reads {time.monotonic() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.reads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="jobs of history (default 1,000,000)")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per endpoint (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls before them (default 20)")
    parser.add_argument("--post-rounds", type=int, default=3,
                        help="rounds of the submit cost comparison (default 3; 0 skips it)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results", help="where the JSON goes")
    return parser.parse_args(argv)


def reads_settings(var: Path, port: int, database_url: str, broker_url: str) -> Settings:
    return Settings.from_env(
        {
            "AIORCH_VAR_DIR": str(var),
            "AIORCH_PORT": str(port),
            "AIORCH_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "AIORCH_API_KEYS": f"{CLIENT}:{KEY}",
            "AIORCH_ADMIN_KEYS": f"{ADMIN}:{ADMIN_KEY}",
            "AIORCH_LOG_JSON": "1",
            "AIORCH_DATABASE_URL": database_url,
            "AIORCH_BROKER_URL": broker_url,
        }
    )


def timed(key: str, path: str, calls: int, warmup: int) -> dict[str, Any]:
    """``calls`` sequential GETs of ``path`` after ``warmup`` untimed ones on a fresh kept-alive
    connection (the server closes idle ones); every answer must be 200."""
    client = JsonClient(PORT[0], key)
    samples = []
    for i in range(warmup + calls):
        began = time.perf_counter()
        status, body = client.raw("GET", path)
        elapsed = time.perf_counter() - began
        if status != 200:
            raise RuntimeError(f"GET {path}: HTTP {status}: {body[:300]!r}")
        if i >= warmup:
            samples.append(elapsed)
    client.close()
    return summary_ms(samples)


def endpoints(job_id: str, ids: list[str], deep: str | None) -> dict[str, tuple[str, str]]:
    """What is timed: name -> (key, path)."""
    mine, admin = KEY, ADMIN_KEY
    calls = {
        "/metrics (admin)": (admin, "/metrics"),
        "/stats": (mine, "/stats"),
        "/stats (admin)": (admin, "/stats"),
        "GET /v1/jobs?limit=50": (mine, "/v1/jobs?limit=50"),
        "GET /v1/jobs?limit=50 (admin)": (admin, "/v1/jobs?limit=50"),
        "GET /v1/jobs?ids= (10)": (mine, "/v1/jobs?limit=50&ids=" + ",".join(ids[:10])),
        "GET /v1/jobs/{id}": (mine, f"/v1/jobs/{job_id}"),
        "GET /v1/jobs?status=queued&limit=50": (mine, "/v1/jobs?status=queued&limit=50"),
    }
    if deep is not None:
        calls["GET /v1/jobs?before=<mid-history>"] = (mine, f"/v1/jobs?limit=50&before={deep}")
    return calls


# The four; the others are reported against the same target but do not decide the verdict.
TARGETED = ("/metrics (admin)", "/stats", "GET /v1/jobs?limit=50", "GET /v1/jobs/{id}")


def measure(job_id: str, ids: list[str], deep: str | None, calls: int, warmup: int
            ) -> dict[str, dict[str, Any]]:
    measured = {}
    for name, (key, path) in endpoints(job_id, ids, deep).items():
        measured[name] = timed(key, path, calls, warmup)
        say(f"  {name}: p50 {measured[name]['p50_ms']} ms, p99 {measured[name]['p99_ms']} ms")
    return measured


def seed(db: Database, rows: int) -> float:
    """The history in one statement; returns its seconds (VACUUM ANALYZE not included)."""
    began = time.perf_counter()
    with db.engine.begin() as connection:
        connection.exec_driver_sql(SEED.replace("{rows}", str(int(rows))))
    seconds = time.perf_counter() - began
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("VACUUM ANALYZE jobs")
    return seconds


def sql(db: Database, statement: str) -> None:
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql(statement)


def has_counting_triggers(db: Database) -> bool:
    with db.engine.connect() as connection:
        found = connection.exec_driver_sql(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'jobs'::regclass AND tgname = ANY(%(names)s)",
            {"names": list(COUNTING_TRIGGERS)},
        ).scalar()
    return found == len(COUNTING_TRIGGERS)


def post_cost(db: Database, port: int, rounds: int) -> dict[str, Any]:
    """POST /v1/jobs (100 one at a time) and POST /v1/jobs/batch (5 x 500) per configuration, in
    interleaved rounds: counting triggers on; off; off and the (created_at, id) index dropped."""
    client = JsonClient(port, KEY)
    payload = {"image_url": tiny_png_uri(), "scale": 2}
    single = json.dumps({"task": "upscale", "payload": payload})
    batch = json.dumps({"jobs": [{"task": "upscale", "payload": payload}] * 500})

    def one_round() -> tuple[list[float], list[float]]:
        singles, batches = [], []
        for _ in range(100):
            began = time.perf_counter()
            status, body = client.raw("POST", "/v1/jobs", single)
            singles.append(time.perf_counter() - began)
            if status != 202:
                raise RuntimeError(f"POST /v1/jobs: HTTP {status}: {body[:300]!r}")
        for _ in range(5):
            began = time.perf_counter()
            status, body = client.raw("POST", "/v1/jobs/batch", batch)
            batches.append(time.perf_counter() - began)
            if status != 200:
                raise RuntimeError(f"POST /v1/jobs/batch: HTTP {status}: {body[:300]!r}")
        return singles, batches

    def counting(on: bool) -> None:
        for name in COUNTING_TRIGGERS:
            sql(db, f"ALTER TABLE jobs {'ENABLE' if on else 'DISABLE'} TRIGGER {name}")

    configs: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
        "counting on": (lambda: counting(True), lambda: None),
        "counting off": (lambda: counting(False), lambda: counting(True)),
        "counting off, no (created_at, id) index": (
            lambda: (counting(False), sql(db, f"DROP INDEX {CREATED_INDEX}")),
            lambda: (sql(db, f"CREATE INDEX {CREATED_INDEX} ON jobs (created_at, id)"), counting(True)),
        ),
    }
    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in configs}
    one_round()  # warm-up
    for r in range(rounds):
        for name, (enter, leave) in configs.items():
            enter()
            singles, batches = one_round()
            leave()
            samples[name][0].extend(singles)
            samples[name][1].extend(batches)
        say(f"  submit cost: round {r + 1}/{rounds} done")
    client.close()
    return {name: {"post_single": summary_ms(s), "post_batch_500": summary_ms(b)}
            for name, (s, b) in samples.items()}


def fmt(value: float | None, unit: str = "ms") -> str:
    return "-" if value is None else f"{value:.2f} {unit}" if unit else f"{value:.2f}"


def table(results: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    rows = []
    for name, empty in results.get("empty", {}).items():
        full = results.get("history", {}).get(name)
        if full is None:
            continue
        ratio = full["p50_ms"] / empty["p50_ms"] if empty["p50_ms"] else None
        ok = full["p50_ms"] <= P50_LIMIT_MS and ratio is not None and ratio <= RATIO_LIMIT
        rows.append({"call": name, "p50_ms": full["p50_ms"], "p99_ms": full["p99_ms"],
                     "empty_p50_ms": empty["p50_ms"], "empty_p99_ms": empty["p99_ms"],
                     "ratio": None if ratio is None else round(ratio, 2), "pass": ok,
                     "targeted": name in TARGETED})
    rows.extend(results.get("deep", []))
    headers = ("call", "p50", "p99", "empty p50", "empty p99", "ratio", "p50<=20ms & <=2x")
    lines = [[r["call"] + ("" if r["targeted"] else " *"), fmt(r["p50_ms"]), fmt(r["p99_ms"]),
              fmt(r["empty_p50_ms"]), fmt(r["empty_p99_ms"]), fmt(r["ratio"], "x"),
              "-" if r["pass"] is None else "PASS" if r["pass"] else "FAIL"] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
           "  ".join("-" * w for w in widths)]
    out.extend("  ".join(cell.ljust(w) if i in (0, 6) else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(line, widths, strict=True))) for line in lines)
    out.append("* beside the issue's four calls; held to the same target, not part of the verdict")
    cost = results.get("post_cost")
    if cost:
        out.append("")
        out.append(f"submit cost at {results['rows']:,} rows (p50 / p99, ms; interleaved rounds):")
        for name, figures in cost.items():
            single, batch = figures["post_single"], figures["post_batch_500"]
            out.append(f"  {name:42s} POST /v1/jobs {single['p50_ms']:.2f} / {single['p99_ms']:.2f}   "
                       f"POST /v1/jobs/batch (500) {batch['p50_ms']:.1f} / {batch['p99_ms']:.1f}")
    return "\n".join(out), rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_id = uuid.uuid4().hex[:10]
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "revision": git_revision(),
        "host": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
        "rows": args.rows, "calls": args.calls, "warmup": args.warmup,
        "target": f"p50 <= {P50_LIMIT_MS:g} ms and <= {RATIO_LIMIT:g}x the empty table",
    }
    steal0 = steal_seconds()
    status = 1
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aiorch-reads-")))
        database_url = stack.enter_context(infra.private_database(f"aiorch_reads_{run_id}"))
        broker_url = stack.enter_context(infra.private_vhost(f"aiorch_reads_{run_id}"))
        port = PORT[0] = free_port()
        settings = reads_settings(tmp / "var", port, database_url, broker_url)
        (tmp / "var").mkdir()
        db = Database(settings)
        stack.callback(db.dispose)
        upgrade(db)
        plat = Platform(settings, tmp / "logs")
        stack.callback(plat.stop)
        try:
            plat.start_api()
            client = JsonClient(port, KEY)
            stack.callback(client.close)
            page = {"jobs": [{"task": "upscale", "payload": {"image_url": tiny_png_uri(), "scale": 2}}]
                    * PAGE_JOBS}
            code, answer = client.call("POST", "/v1/jobs/batch", page)
            if code != 200:
                raise RuntimeError(f"POST /v1/jobs/batch: HTTP {code}: {answer}")
            ids = [job["job_id"] for job in answer["jobs"]]
            say(f"API up on port {port}; {PAGE_JOBS} jobs submitted; timing {args.calls} calls each "
                "on the empty table")
            results["empty"] = measure(ids[0], ids, None, args.calls, args.warmup)
            say(f"seeding {args.rows:,} jobs of history with one INSERT ... SELECT generate_series")
            results["seed_s"] = round(seed(db, args.rows), 1)
            say(f"seeded in {results['seed_s']} s (then VACUUM ANALYZE jobs); timing again")
            # A page half-way down the history (its cursor: a created_at there).
            middle = datetime.now(UTC) - timedelta(hours=1, seconds=args.rows // 2)
            deep = middle.replace(microsecond=0, tzinfo=None).isoformat()  # read as UTC
            results["history"] = measure(ids[0], ids, deep, args.calls, args.warmup)
            deep_name = "GET /v1/jobs?before=<mid-history>"
            figures = results["history"].pop(deep_name)
            results["deep"] = [{"call": deep_name, "p50_ms": figures["p50_ms"], "p99_ms": figures["p99_ms"],
                                "empty_p50_ms": None, "empty_p99_ms": None, "ratio": None,
                                "pass": figures["p50_ms"] <= P50_LIMIT_MS, "targeted": False}]
            if args.post_rounds and has_counting_triggers(db):
                say(f"submit cost: {args.post_rounds} rounds x 3 configurations")
                results["post_cost"] = post_cost(db, port, args.post_rounds)
            status = 0
        except BaseException as exc:
            results["error"] = f"{type(exc).__name__}: {exc}"
            print(f"--- api log (tail) ---\n{plat.log('api')[-2000:]}", file=sys.stderr)
            if not isinstance(exc, Exception):
                raise
        finally:
            results["host"]["loadavg_end"] = os.getloadavg()
            steal1 = steal_seconds()
            if steal0 is not None and steal1 is not None:
                results["host"]["cpu_stolen_s"] = round(steal1 - steal0, 1)
            results["elapsed_s"] = round(time.monotonic() - STARTED, 1)
            text, rows = table(results)
            targeted = [row for row in rows if row["targeted"]]
            results["table"] = rows
            results["pass"] = bool(targeted) and all(row["pass"] for row in targeted)
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / f"reads-{stamp}.json"
            path.write_text(json.dumps(results, indent=2, default=str) + "\n")
            print()
            print(f"aiorch bench.reads  {args.rows:,} jobs  rev={results['revision']}  "
                  f"cpus={os.cpu_count()}  "
                  f"load {results['host']['loadavg_start'][0]:.2f}->{results['host']['loadavg_end'][0]:.2f}  "
                  f"CPU stolen {results['host'].get('cpu_stolen_s', '?')} s  "
                  f"seed {results.get('seed_s', '?')} s  elapsed {results['elapsed_s']} s")
            print(text)
            print(f"\nverdict: {'PASS' if results['pass'] else 'FAIL'}")
            if "error" in results:
                print(f"\nERROR: {results['error']}")
            print(f"\nwrote {path}")
    return status



if __name__ == "__main__":
    sys.exit(main())
