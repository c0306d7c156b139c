"""Small measurement helpers for the benchmark: percentiles and a closed-loop load generator."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def percentile(samples: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not samples:
        return None
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(samples_s: list[float]) -> dict[str, Any]:
    """p50/p90/p99/max/mean in milliseconds of samples given in seconds."""
    ms = [s * 1000.0 for s in samples_s]

    def r(value: float | None) -> float | None:
        return None if value is None else round(value, 2)

    return {
        "n": len(ms),
        "p50_ms": r(percentile(ms, 50)),
        "p90_ms": r(percentile(ms, 90)),
        "p99_ms": r(percentile(ms, 99)),
        "max_ms": r(max(ms) if ms else None),
        "mean_ms": r(sum(ms) / len(ms) if ms else None),
    }


@dataclass
class LevelResult:
    concurrency: int
    duration_s: float
    ok: int
    errors: int
    latencies_s: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    client_cpu_s: float = 0.0
    # Every operation finished by the threads, warm-up and stragglers included: the denominator
    # for CPU seconds measured over the whole level.
    all_ops: int = 0

    def add(self, other: LevelResult) -> None:
        """Fold another slice measured at the same concurrency into this one."""
        self.duration_s += other.duration_s
        self.ok += other.ok
        self.errors += other.errors
        self.latencies_s.extend(other.latencies_s)
        self.error_samples.extend(other.error_samples)
        self.client_cpu_s += other.client_cpu_s
        self.all_ops += other.all_ops

    @property
    def throughput(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "duration_s": round(self.duration_s, 3),
            "ok": self.ok,
            "errors": self.errors,
            "throughput_per_s": round(self.throughput, 2),
            "latency": summary_ms(self.latencies_s),
            "error_samples": self.error_samples[:5],
            "all_ops": self.all_ops,
            "bench_process_cpu_s": round(self.client_cpu_s, 3),
        }


def closed_loop(
    concurrency: int,
    make_op: Callable[[], Callable[[], None]],
    warmup_s: float,
    duration_s: float,
) -> LevelResult:
    """``concurrency`` threads each call their own op back to back (a closed loop).

    ``make_op`` runs once per thread (in that thread) and returns the op; an op raises on failure.
    Only operations that both start and end inside the measurement window are counted, after
    ``warmup_s`` of unmeasured load at the same concurrency.
    """
    barrier = threading.Barrier(concurrency + 1)
    lock = threading.Lock()
    window: dict[str, float] = {}
    result = LevelResult(concurrency, duration_s, 0, 0)

    def worker() -> None:
        try:
            op = make_op()
        except Exception as exc:  # noqa: BLE001 (reported, not hidden)
            with lock:
                result.errors += 1
                result.error_samples.append(f"setup: {type(exc).__name__}: {exc}")
            barrier.wait()
            return
        latencies: list[float] = []
        ok = errors = done = 0
        samples: list[str] = []
        barrier.wait()
        start, stop = window["start"], window["stop"]
        while True:
            t0 = time.perf_counter()
            if t0 >= stop:
                break
            try:
                op()
                failed = None
            except Exception as exc:  # noqa: BLE001
                failed = f"{type(exc).__name__}: {exc}"[:300]
            t1 = time.perf_counter()
            done += 1
            if t0 >= start and t1 <= stop:
                if failed is None:
                    ok += 1
                    latencies.append(t1 - t0)
                else:
                    errors += 1
                    if len(samples) < 3:
                        samples.append(failed)
        with lock:
            result.ok += ok
            result.errors += errors
            result.all_ops += done
            result.latencies_s.extend(latencies)
            result.error_samples.extend(samples)

    threads = [threading.Thread(target=worker, daemon=True, name=f"load-{i}") for i in range(concurrency)]
    for thread in threads:
        thread.start()
    cpu0 = time.process_time()
    now = time.perf_counter()
    window["start"] = now + warmup_s
    window["stop"] = now + warmup_s + duration_s
    barrier.wait()
    for thread in threads:
        thread.join(timeout=warmup_s + duration_s + 60)
    result.client_cpu_s = time.process_time() - cpu0
    return result


def steal_seconds() -> float | None:
    """CPU time the hypervisor gave to others, all CPUs together (``steal`` in /proc/stat)."""
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None
