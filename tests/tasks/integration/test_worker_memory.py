"""A GPU worker child's memory stays flat while its jobs fail (``tasks.memory``): Celery's
``ExceptionInfo`` of each failed task is cyclic garbage of about 125 KB that, with the engines
imported, Python's collector left for hundreds of jobs (the soak's GPU worker grew 63 MB an hour)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from bench.infra import children
from config import Settings
from tests.conftest import KEYS
from tests.support.platform import ROOT, Platform
from tests.support.platform_fixtures import platform_settings
from tests.support.services import purge_queues

ALICE = {"X-API-Key": KEYS[0][1]}
FAILING = 240


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def platform(
    base_settings: Settings, worker_amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp("memory")
    plat = Platform(platform_settings(base_settings, tmp, broker_url=worker_amqp_url), tmp / "logs")
    purge_queues(plat.settings.broker_url)
    try:
        plat.start_api()
        # One child, which imports the GPU queues' engines (torch and the rest) as in production.
        plat.start_worker("gpu", "gpu.diffusion,gpu.superres", 1)
        plat.start_worker("cpu", "cpu", 1)
        yield plat
    finally:
        plat.stop()


def fail_jobs(platform: Platform, count: int) -> None:
    items = [{"task": "debug_sleep", "payload": {"seconds": 0, "crash": "raise"}} for _ in range(count)]
    answer = requests.post(
        platform.base_url + "/v1/jobs/batch", json={"jobs": items}, headers=ALICE, timeout=60
    )
    assert answer.status_code == 200, answer.text
    batch = answer.json()["batch_id"]
    deadline = time.monotonic() + 120
    while True:
        counts = requests.get(f"{platform.base_url}/v1/batches/{batch}", headers=ALICE, timeout=10).json()[
            "counts"
        ]
        if counts.get("failed", 0) == count:
            return
        assert time.monotonic() < deadline, counts
        time.sleep(0.2)


def test_a_worker_child_does_not_grow_while_its_jobs_fail(platform: Platform) -> None:
    log = platform.logs / "gpu.log"
    deadline = time.monotonic() + 120
    while b"engines imported" not in log.read_bytes():  # the child's imports done, then settled
        assert time.monotonic() < deadline, platform.log("gpu")
        time.sleep(0.2)
    (child,) = children(platform.procs["gpu"].pid)
    fail_jobs(platform, 40)  # the first jobs' one-time allocations (connections, caches)
    before = rss_mb(child)
    fail_jobs(platform, FAILING)
    grown = rss_mb(child) - before
    # Without the collection: about 125 KB a failed task, 30 MB for these.
    assert grown < 6, f"the child grew {grown:.1f} MB over {FAILING} failed jobs"


def test_settle_freezes_what_a_process_holds_so_a_full_collection_skips_it() -> None:
    code = (
        "import gc, torch, tasks.memory as m\n"
        "assert gc.get_freeze_count() == 0\n"
        "m.settle()\n"
        "print(gc.get_freeze_count())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 10_000  # torch's own objects among them
