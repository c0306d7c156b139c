"""Live status benchmarks (issue 13): a tiny job followed on its SSE stream against the raw Celery
round trip that polls its result, the delay from a move's commit to the stream's reader, and a
thousand open streams on one API process (memory, and ``POST /v1/jobs`` beside them).

The stream reader is a plain socket reading ``http.client``'s chunked decoding line by line, as
the job poller of part 2 uses one kept-alive ``http.client`` connection: a client library's own
cost is the client's, not the platform's.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any

from bench import infra
from bench.stats import LevelResult, closed_loop, percentile, summary_ms

FINAL = {"succeeded", "failed", "cancelled", "expired", "rejected"}


def follow(port: int, key: str, job_id: str, timeout: float = 20.0) -> list[tuple[float, dict[str, Any]]]:
    """Read the job's stream to its end: ``(wall clock ms when read, job object)`` per event."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", f"/v1/jobs/{job_id}/events", headers={"X-API-Key": key})
        return _events(conn.getresponse())
    finally:
        conn.close()


def submit_and_follow(port: int, key: str, payload: dict[str, Any],
                      timeout: float = 20.0) -> list[tuple[float, dict[str, Any]]]:
    """``POST /v1/jobs`` with ``Accept: text/event-stream`` on a connection of its own (its answer
    is the new job's stream, which ends the connection), read to its end as ``follow`` reads."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        body = json.dumps({"task": "upscale", "payload": payload})
        conn.request("POST", "/v1/jobs", body=body, headers={
            "X-API-Key": key, "Content-Type": "application/json", "Accept": "text/event-stream"})
        return _events(conn.getresponse())
    finally:
        conn.close()


def _events(response: http.client.HTTPResponse) -> list[tuple[float, dict[str, Any]]]:
    if response.status != 200:
        raise RuntimeError(f"stream answered {response.status}: {response.read()[:200]!r}")
    events: list[tuple[float, dict[str, Any]]] = []
    while True:
        line = response.readline()
        if not line:
            return events
        if line.startswith(b"data: "):
            job = json.loads(line[6:])
            events.append((time.time() * 1000, job))
            if job["status"] in FINAL:
                return events


def part_stream_latency(http: Any, raw: Any, sup: Any, payload: dict[str, Any], n: int, key: str,
                        port: int) -> dict[str, Any]:
    """``n`` tiny jobs, each submitted and followed on its stream until ``succeeded``, in turn with
    the raw round trip (send, then poll the result backend every ``poll`` s) and with a job
    submitted and followed in one request (``submit_and_follow``)."""
    crashed = lambda: bool(sup.dead())  # noqa: E731

    def one() -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        status, answer = http.call("POST", "/v1/jobs", {"task": "upscale", "payload": payload})
        if status != 202:
            raise RuntimeError(f"submit answered {status}: {str(answer)[:200]}")
        events = follow(port, key, answer["job_id"])
        elapsed = time.perf_counter() - t0
        if not events or events[-1][1]["status"] != "succeeded":
            raise RuntimeError(f"job {answer['job_id']} ended {events[-1][1] if events else 'unseen'}")
        delays = []
        for seen_ms, job in events[1:]:  # the first event is the snapshot sent when it opened
            moved_ms = job["finished_at_ms"] if job["status"] in FINAL else job.get("started_at_ms")
            if job["status"] in ("running", *FINAL) and moved_ms and job["progress"] in (0, 100):
                delays.append(seen_ms - moved_ms)
        return elapsed, delays

    def in_one() -> float:
        t0 = time.perf_counter()
        events = submit_and_follow(port, key, payload)
        elapsed = time.perf_counter() - t0
        if not events or events[-1][1]["status"] != "succeeded":
            raise RuntimeError(f"submitted and followed: ended {events[-1][1] if events else 'unseen'}")
        return elapsed

    for _ in range(3):
        one()
        in_one()
        raw.once(crashed)
    jobs, ones, raws, delays, failures = [], [], [], [], []
    for _ in range(n):
        round_trip = raw.once(crashed)
        if round_trip is not None:
            raws.append(round_trip)
        try:
            elapsed, job_delays = one()
            ones.append(in_one())
        except RuntimeError as exc:
            failures.append(str(exc)[:300])
            continue
        jobs.append(elapsed)
        delays.extend(job_delays)
    job_lat, raw_lat, one_lat = summary_ms(jobs), summary_ms(raws), summary_ms(ones)
    return {
        "job_on_stream": job_lat,
        "raw_round_trip": raw_lat,
        "ratio_p50": round(job_lat["p50_ms"] / raw_lat["p50_ms"], 3) if jobs and raw_lat["p50_ms"] else None,
        # The same job submitted with Accept: text/event-stream: its stream is the submit's answer.
        "submit_and_follow": one_lat,
        "submit_and_follow_ratio_p50": (round(one_lat["p50_ms"] / raw_lat["p50_ms"], 3)
                                        if ones and raw_lat["p50_ms"] else None),
        # The move's own timestamp (started_at/finished_at, taken just before its COMMIT) to the
        # moment the reader parsed the event: commit, NOTIFY, the hub's read, the socket.
        "event_delay_ms": {"p50": percentile(delays, 50), "p99": percentile(delays, 99), "n": len(delays)},
        "failures": failures,
    }


class OpenStream:
    """A stream opened on a raw socket and left open: its headers and first event read."""

    def __init__(self, port: int, key: str, job_id: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(
            f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: bench\r\nX-API-Key: {key}\r\n\r\n".encode()
        )
        head = b""
        while b"data: " not in head:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"stream closed before its first event: {head[:200]!r}")
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"stream answered {head[:100]!r}")

    def close(self) -> None:
        self.sock.close()


def part_many_streams(api_pid: int, port: int, key: str, job_id: str, submit_op: Any, n: int,
                      concurrency: int, warmup: float, duration: float, slices: int = 3) -> dict[str, Any]:
    """``POST /v1/jobs`` throughput with no stream open and with ``n`` streams open on one API
    process (a queued job's, so they stay open), in ``slices`` turns of each, so both see the same
    machine (one slice of each, back to back, read 0.66 to 0.89 on the same code: the machine's
    pace moves within seconds here, and part 1b leaves a backlog that the broker and the database
    are still digesting); and the API's memory before and after opening them."""
    without = LevelResult(concurrency, 0.0, 0, 0)
    with_streams = LevelResult(concurrency, 0.0, 0, 0)
    memory_before = infra.memory(api_pid)
    opened_s: list[float] = []
    rates: dict[str, list[float]] = {"without": [], "with": []}
    memory_open: list[float] = []
    memory_after: list[float] = []
    each = duration / slices
    for turn in range(slices):
        settle = warmup if turn == 0 else min(warmup, 0.3)
        alone = closed_loop(concurrency, submit_op, settle, each)
        without.add(alone)
        rates["without"].append(round(alone.throughput, 1))
        t0 = time.perf_counter()
        streams = [OpenStream(port, key, job_id) for _ in range(n)]
        opened_s.append(time.perf_counter() - t0)
        try:
            memory_open.append(infra.memory(api_pid)["rss_mb"])
            beside = closed_loop(concurrency, submit_op, settle, each)
            with_streams.add(beside)
            rates["with"].append(round(beside.throughput, 1))
            memory_after.append(infra.memory(api_pid)["rss_mb"])
        finally:
            for stream in streams:
                stream.close()
    rate_before, rate_during = without.throughput, with_streams.throughput
    return {
        "streams": n,
        "slices": slices,
        "open_s": round(max(opened_s), 2),
        "rss_mb_before": memory_before["rss_mb"],
        "rss_mb_open": max(memory_open),
        "rss_mb_after_load": max(memory_after),
        "extra_rss_mb": round(max(*memory_open, *memory_after) - memory_before["rss_mb"], 1),
        "post_per_s_without": round(rate_before, 1),
        "post_per_s_with": round(rate_during, 1),
        "post_ratio": round(rate_during / rate_before, 3) if rate_before else None,
        "post_per_s_by_slice": rates,
        "errors": without.errors + with_streams.errors,
        "error_samples": (without.error_samples + with_streams.error_samples)[:3],
    }
