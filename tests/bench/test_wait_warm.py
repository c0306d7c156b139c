"""The benchmarks time nothing before a GPU worker's pool children have imported their engines
(bench/infra.py ``wait_warm``): each child logs it once, and the wait counts them."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.infra import wait_warm

WARM = '{"logger": "aiorch.warmup", "msg": "engines imported in 2.4 s: inference.diffusion"}\n'


def fake_platform(logs: Path, proc: subprocess.Popen) -> SimpleNamespace:
    def log(name: str) -> str:
        return (logs / f"{name}.log").read_text()

    return SimpleNamespace(logs=logs, procs={"gpu": proc}, log=log)


def test_waits_for_every_child_of_the_pool(tmp_path: Path) -> None:
    log = tmp_path / "gpu.log"
    log.write_text("gpu@test ready.\n" + WARM)  # the first child is warm, the second is not yet
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:

        def second_child() -> None:
            time.sleep(0.5)
            with log.open("a") as out:
                out.write(WARM)

        writer = threading.Thread(target=second_child)
        started = time.monotonic()
        writer.start()
        wait_warm(fake_platform(tmp_path, proc), "gpu", children=2, timeout=10)  # type: ignore[arg-type]
        assert time.monotonic() - started >= 0.5
        writer.join()
    finally:
        proc.kill()
        proc.wait()


def test_a_worker_that_exits_while_warming_up_is_reported(tmp_path: Path) -> None:
    (tmp_path / "gpu.log").write_text("gpu@test ready.\nTraceback: the engine would not import\n")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(RuntimeError, match="exited while warming up"):
        wait_warm(fake_platform(tmp_path, proc), "gpu", children=1, timeout=10)  # type: ignore[arg-type]
