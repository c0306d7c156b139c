"""A worker child's memory stays flat while its jobs fail: the cyclic garbage a failed task leaves
is collected, cheaply.

A job that ends ``failed`` ends its Celery task with ``JobFailed`` (so Flower counts it), and Celery
wraps every task exception in billiard's ``ExceptionInfo``, which copies each traceback frame's code
positions (thousands of tuples) into objects that reference each other: about 125 KB of cyclic
garbage per failed task. Only a full collection frees it, and with torch, diffusers and OpenCV
imported a full collection is both slow (about 140 ms here) and rare (Python runs one when the
objects that survived since the last one reach a quarter of all long-lived objects): the soak saw a
GPU worker grow 63 MB an hour, 125 KB for each failed job, which a collection gave back at once.

So: once a child has imported its engines (``tasks.warmup``), ``settle`` collects and freezes what it
holds (``gc.freeze``: the imports' objects live as long as the process and no collection looks at
them again), which makes a full collection scan only what jobs created since (under a millisecond
instead of 120 ms with the GPU queues' engines imported), and lets Python's own thresholds run one
as often as those objects call for; after a failed
task the child also collects at once, at most once every ``FAILED_COLLECT_EVERY`` seconds, so a
flood of failing jobs leaves a bounded heap and costs a bounded share of the CPU.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from celery import states
from celery.signals import task_postrun

FAILED_COLLECT_EVERY = 1.0  # seconds between collections after failed tasks

_last_collect = [0.0]


def settle() -> None:
    """Collect, then freeze everything this process holds now (call once its imports are done)."""
    gc.collect()
    gc.freeze()


@task_postrun.connect
def _after_failure(state: str | None = None, **_: Any) -> None:
    if state != states.FAILURE:
        return
    now = time.monotonic()
    if now - _last_collect[0] >= FAILED_COLLECT_EVERY:
        _last_collect[0] = now
        gc.collect()
