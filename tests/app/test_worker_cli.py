"""``aiorch worker --gpus``: a GPU list is checked before anything starts, and a GPU that cannot be
used stops a GPU worker's start with the reason instead of letting its jobs run on the CPU. Run
as the operator runs it (the real command, the real probe process) on this machine without GPUs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def aiorch(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith("AIORCH_") and k != "CUDA_VISIBLE_DEVICES"
    }
    environ.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], env=environ, capture_output=True, text=True, timeout=300
    )


def test_a_gpu_that_torch_cannot_use_stops_the_gpu_workers_start_with_the_reason() -> None:
    done = aiorch("worker", "-Q", "gpu.faceswap", "--gpus", "0")
    assert done.returncode == 1, done
    assert "GPU 0: torch" in done.stderr and "sees no CUDA device" in done.stderr, done.stderr
    assert "does not start" in done.stderr
    # The same from the setting, for two GPUs: each is named.
    done = aiorch("worker", "-Q", "gpu.diffusion", AIORCH_GPUS="0,1")
    assert done.returncode == 1 and "GPU 0:" in done.stderr and "GPU 1:" in done.stderr, done.stderr


def test_a_malformed_gpu_list_is_refused_naming_the_option() -> None:
    done = aiorch("worker", "-Q", "gpu.diffusion", "--gpus", "0,0")
    assert done.returncode == 2 and "--gpus" in done.stderr and "twice" in done.stderr, done.stderr
    done = aiorch("worker", "-Q", "gpu.diffusion", AIORCH_GPUS="cuda:1")
    assert done.returncode != 0 and "AIORCH_GPUS" in done.stderr, done.stderr
