"""GPU faults through a real worker (``debug_sleep`` raises what torch raises): an out-of-memory
error fails its job and the process goes on with an emptied cache; a sticky CUDA error fails its
job and the process is replaced, never leaving the job ``running``; and a pool's processes each
take their own GPU."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import KEYS
from tests.support.platform import Platform

ALICE = KEYS[0][1]
GPU_QUEUES = "gpu.diffusion,gpu.superres,gpu.faceswap,gpu.vision"


def run(platform: Platform, payload: dict) -> dict:
    job_id = platform.submit(ALICE, "debug_sleep", payload).json()["job_id"]
    return platform.wait(ALICE, job_id, timeout=60)


def test_out_of_memory_fails_only_its_job_and_the_process_goes_on(platform: Platform) -> None:
    before = run(platform, {"seconds": 0})
    job = run(platform, {"seconds": 0, "crash": "oom"})
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "out_of_memory"
    assert "ran out of memory" in job["error"]["message"] and "Tried to allocate" in job["error"]["message"]
    after = run(platform, {"seconds": 0})
    assert after["status"] == "succeeded"
    assert after["result"]["pid"] == before["result"]["pid"]  # the same process, not replaced


def test_a_sticky_cuda_error_fails_its_job_once_and_replaces_the_process(platform: Platform) -> None:
    before = run(platform, {"seconds": 0})
    job = run(platform, {"seconds": 0, "crash": "device"})
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "device_error"
    assert "illegal memory access" in job["error"]["message"]
    assert "replaced" in job["error"]["message"]
    after = run(platform, {"seconds": 0})
    assert after["status"] == "succeeded", after
    assert after["result"]["pid"] != before["result"]["pid"]  # a fresh process took the next job
    # The faulted job's message came back when its process ended; its redelivery found the job
    # ended and ran nothing: one attempt, still failed with its own error.
    time.sleep(1)
    again = platform.job(ALICE, job["job_id"])
    assert again["status"] == "failed" and again["attempts"] == 1
    assert again["error"]["code"] == "device_error"
    # The whole log: the later jobs' lines can push the pool's note past a short tail.
    log = platform.log("gpu", tail=None)
    assert "exited with exit code 70" in log or "exitcode 70" in log


def test_each_process_of_a_pool_takes_its_own_gpu(platform: Platform) -> None:
    platform.kill("gpu")
    platform.start_worker("gpu", GPU_QUEUES, 2, env={"AIORCH_GPUS": "7,8"})
    try:
        with ThreadPoolExecutor(6) as pool:
            jobs = list(pool.map(lambda _: run(platform, {"seconds": 0.6}), range(6)))
        assert all(j["status"] == "succeeded" for j in jobs), jobs
        gpu_of = {}
        for j in jobs:
            gpu_of.setdefault(j["result"]["pid"], set()).add(j["result"]["gpu"])
        # Two processes, each always on its one GPU, the two on different GPUs.
        assert len(gpu_of) == 2 and all(len(g) == 1 for g in gpu_of.values()), gpu_of
        assert set().union(*gpu_of.values()) == {"7", "8"}
    finally:
        platform.kill("gpu")
        platform.start_worker("gpu", GPU_QUEUES, 1)
