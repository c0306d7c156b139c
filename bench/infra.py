"""What the benchmark sets up around the platform: a private database and vhost (as the tests do),
workers warmed up before anything is timed, queue depths and purges, and process memory from /proc."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery import Celery

from tests.support.platform import Platform
from tests.support.services import pg_admin
from tests.support.services import private_vhost as private_vhost  # the benchmarks' vhost is the tests'


@contextlib.contextmanager
def private_database(name: str) -> Iterator[str]:
    """``CREATE DATABASE name`` on the machine's Postgres, dropped (forcibly) on exit."""
    pg_admin(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def wait_warm(plat: Platform, name: str, children: int = 1, timeout: float = 120.0) -> None:
    """Wait until the ``children`` pool processes of a GPU worker have imported their engines
    (``tasks.warmup``): each child's background import of torch, onnxruntime and the rest holds a
    core for seconds after the worker says ready, and a latency measured meanwhile is the
    warm-up's, not the platform's (the fairness bench's first probe measured 2.5 job times so)."""
    log = plat.logs / f"{name}.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and log.read_bytes().count(b"engines imported in") >= children:
            return
        if plat.procs[name].poll() is not None:
            raise RuntimeError(f"worker {name} exited while warming up:\n" + plat.log(name))
        time.sleep(0.1)
    raise RuntimeError(f"worker {name} did not finish warming up in {timeout:g} s:\n" + plat.log(name))


def queue_depths(app: Celery, names: list[str]) -> dict[str, int | None]:
    """Messages ready in each queue (None where the broker could not say)."""
    depths: dict[str, int | None] = {}
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for name in names:
            try:
                queue = app.amqp.queues[name].bind(channel)
                depths[name] = int(queue.queue_declare(passive=True).message_count)
            except Exception:  # noqa: BLE001 (a queue nobody declared yet, an odd transport)
                depths[name] = None
    return depths


def purge(app: Celery, names: list[str]) -> dict[str, int | None]:
    """Drop every ready message in the named queues; returns how many each held."""
    purged: dict[str, int | None] = {}
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for name in names:
            try:
                purged[name] = int(app.amqp.queues[name].bind(channel).purge() or 0)
            except Exception:  # noqa: BLE001
                purged[name] = None
    return purged


# -- memory -----------------------------------------------------------------------------------------

def _status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _pss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            kids.extend(int(x) for x in (task / "children").read_text().split())
    return sorted(set(kids))


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children(current))
    return tree


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def memory(pid: int) -> dict[str, Any]:
    """VmRSS (and PSS, which counts pages shared after fork once) of a process and its descendants."""
    procs: list[dict[str, Any]] = []
    rss = pss = 0
    for each in process_tree(pid):
        rss_kb, pss_kb = _status_kb(each, "VmRSS"), _pss_kb(each)
        rss += rss_kb or 0
        pss += pss_kb or 0
        procs.append({"pid": each, "role": "master" if each == pid else "worker", "rss_kb": rss_kb,
                      "hwm_kb": _status_kb(each, "VmHWM"), "pss_kb": pss_kb, "cmd": _cmdline(each)[:120]})
    return {"processes": procs, "rss_mb": round(rss / 1024, 1), "pss_mb": round(pss / 1024, 1)}


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the given processes, in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / tick
