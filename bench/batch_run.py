"""Part 5 of ``make bench``: ``aiorch batch run`` end to end against a bare script.

The same ``n`` tiny jobs (one JSONL line each) go through the platform twice, on its real workers:

- the floor, a bare script: ``POST /v1/jobs/batch`` in bodies of ``BULK`` jobs under one
  ``batch_id``, then one multiplexed stream (``GET /v1/events?batch_id=``) read until every job
  is final: no uploads, no downloads, no journal;
- ``aiorch batch run FILE --out DIR`` as a user runs it (its own process, its default
  concurrency): reads the file, submits through the bulk endpoint with idempotency keys, follows
  the jobs, downloads every output into DIR and writes ``report.jsonl``.

Wall time of each, and their ratio: what the CLI's resumability, downloads and report cost over
the least a script could do with the same endpoints.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

BULK = 500  # jobs per POST /v1/jobs/batch of the floor
FINAL = frozenset({"succeeded", "failed", "rejected", "cancelled", "expired"})


def write_lines(path: Path, payload: dict[str, Any], n: int) -> None:
    """``n`` job bodies, one a line; each line differs (its metadata), as a real batch's would."""
    with path.open("w", encoding="utf-8") as handle:
        for index in range(n):
            body = {"task": "upscale", "payload": payload, "metadata": {"line": index}}
            handle.write(json.dumps(body) + "\n")


def floor_script(port: int, key: str, path: Path, timeout: float) -> tuple[float, dict[str, int]]:
    """Submit the file's jobs in bulk under one batch id and read one stream until all are final;
    returns (seconds, count by final status)."""
    headers = {"X-API-Key": key, "Content-Type": "application/json"}
    bodies = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    batch_id = "bench-" + uuid.uuid4().hex[:12]
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    ids: set[str] = set()
    for start in range(0, len(bodies), BULK):
        body = json.dumps({"jobs": bodies[start : start + BULK], "batch_id": batch_id})
        conn.request("POST", "/v1/jobs/batch", body=body, headers=headers)
        response = conn.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"bulk submit answered {response.status}: {str(answer)[:300]}")
        for item in answer["jobs"]:
            if "job_id" not in item:
                raise RuntimeError(f"bulk submit refused an item: {str(item)[:300]}")
            ids.add(item["job_id"])
    conn.close()
    final: dict[str, str] = {}
    stream = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        stream.request("GET", f"/v1/events?batch_id={batch_id}", headers={"X-API-Key": key})
        response = stream.getresponse()
        if response.status != 200:
            raise RuntimeError(f"stream answered {response.status}: {response.read()[:200]!r}")
        while len(final) < len(ids):
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"{len(ids) - len(final)} jobs not final after {timeout:g} s")
            line = response.readline()
            if not line:
                raise RuntimeError(f"stream ended with {len(ids) - len(final)} jobs not final")
            if line.startswith(b"data: "):
                job = json.loads(line[6:])
                if job.get("status") in FINAL and job.get("job_id") in ids:
                    final[job["job_id"]] = job["status"]
    finally:
        stream.close()
    elapsed = time.perf_counter() - t0
    counts: dict[str, int] = {}
    for status in final.values():
        counts[status] = counts.get(status, 0) + 1
    return elapsed, counts


def cli_run(
    port: int, key: str, path: Path, out: Path, env: dict[str, str], timeout: float
) -> tuple[float, dict[str, int]]:
    """``aiorch batch run`` in its own process; returns (seconds, count by status in its report)."""
    argv = [sys.executable, "-m", "app.cli", "batch", "run", str(path), "--out", str(out),
            "--url", f"http://127.0.0.1:{port}", "--key", key]
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, timeout=timeout, check=False)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"aiorch batch run exited {done.returncode}: {done.stderr.decode()[-1500:]}")
    counts: dict[str, int] = {}
    for line in (out / "report.jsonl").read_text(encoding="utf-8").splitlines():
        status = json.loads(line)["status"]
        counts[status] = counts.get(status, 0) + 1
    return elapsed, counts


def part_batch_run(port: int, key: str, payload: dict[str, Any], n: int, env: dict[str, str],
                   say: Callable[[str], None], timeout: float = 600.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="aiorch-bench-batch-") as tmp:
        path = Path(tmp) / "jobs.jsonl"
        write_lines(path, payload, n)
        floor_s, floor_counts = floor_script(port, key, path, timeout)
        say(f"floor: {n} jobs in {floor_s:.1f} s (bulk + one stream): {floor_counts}")
        out = Path(tmp) / "out"
        cli_s, cli_counts = cli_run(port, key, path, out, env, timeout)
        files = sum(1 for entry in os.scandir(out) if entry.is_file() and entry.name != "report.jsonl")
        say(f"aiorch batch run: {n} jobs in {cli_s:.1f} s: {cli_counts}, {files} outputs on disk")
    return {
        "jobs": n,
        "floor_s": round(floor_s, 2),
        "floor_statuses": floor_counts,
        "cli_s": round(cli_s, 2),
        "cli_statuses": cli_counts,
        "cli_outputs": files,
        "ratio": round(cli_s / floor_s, 3) if floor_s else None,
        "floor_jobs_per_s": round(n / floor_s, 1) if floor_s else None,
        "cli_jobs_per_s": round(n / cli_s, 1) if cli_s else None,
    }


def table_rows(result: dict[str, Any], row: Callable[..., Any]) -> None:
    """The part's rows in the bench table (``row`` as ``bench.run.table`` builds them)."""
    n = result["jobs"]
    ok = result["cli_statuses"].get("succeeded", 0) == n and result["cli_outputs"] == n
    row(f"aiorch batch run, {n} tiny jobs, wall", f"{result['cli_s']:.1f} s", f"{result['floor_s']:.1f} s",
        result["ratio"], "info (floor: bulk + one stream)", None)
    row(f"aiorch batch run, {n} jobs succeeded with outputs", result["cli_outputs"], "-", None, str(n), ok)
