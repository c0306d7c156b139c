"""``debug_sleep``, the diagnostic task (only with AIORCH_DEBUG_TASKS): sleeps in small slices,
reporting progress, and can kill its own worker process, which is how the fault tests exercise
redelivery, or raise what a GPU raises when it runs out of memory or faults."""

from __future__ import annotations

import os
import signal
import time

from config.devices import visible_gpus
from inference.base import EngineResult, check_stop
from inference.registry import Engine, EngineCall, LocalTask


def run_debug_sleep(call: EngineCall) -> EngineResult:
    """Sleep in small slices so cancellation and progress behave like a real engine's steps."""
    crash = call.payload.get("crash", "never")
    seconds = call.payload.get("seconds", 1.0)
    end = time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0:
            break
        check_stop(call.control)
        call.control.progress(100 * (1 - left / max(seconds, 1e-6)))
        time.sleep(min(0.05, left))
    if crash == "always" or (crash == "first" and call.attempt == 1):
        # A hard crash, as a segfaulting CUDA kernel would do: no exception, no cleanup.
        os.kill(os.getpid(), signal.SIGKILL)
    if crash == "raise":
        # An engine bug: an unexpected exception whose text holds an object's repr, which no job
        # error may show (the worker goes on with its next job).
        raise RuntimeError(f"debug engine crashed on purpose in {call!r}")
    if crash == "oom":
        import torch  # the real class an engine's allocation raises

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (debug_sleep)")
    if crash == "device":
        # A sticky CUDA error, as torch raises it: the process's context is broken from now on.
        raise RuntimeError("CUDA error: an illegal memory access was encountered (debug_sleep)")
    return EngineResult(
        backend="debug_sleep",
        data={
            "slept": seconds,
            "attempt": call.attempt,
            # Which process and GPU ran it: how the fault tests see a process replaced, and the
            # pool's processes spread over their GPUs.
            "pid": os.getpid(),
            "gpu": ",".join(visible_gpus() or ()) or None,
        },
    )


ENGINE = Engine(
    name="debug",
    queue="gpu.diffusion",
    tasks=(
        LocalTask(
            "debug_sleep",
            "Diagnostics: sleep with progress, optionally kill the worker or raise",
            soft_time_limit=620,
            time_limit=650,
            debug_only=True,
        ),
    ),
    run=run_debug_sleep,
)
