"""The process environment that picks a GPU: the one place outside ``config.settings`` that reads or
writes it (``CUDA_VISIBLE_DEVICES``, ``PYTORCH_CUDA_ALLOC_CONF``), and what ``nvidia-smi`` lists.
The policy (which pool process takes which GPU) is ``inference.devices``'."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess

log = logging.getLogger("aiorch.devices")

VISIBLE = "CUDA_VISIBLE_DEVICES"
ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"
# Mixed image sizes fragment torch's caching allocator; expandable segments grow in place instead.
DEFAULT_ALLOC_CONF = "expandable_segments:True"


def parse_gpus(text: str) -> tuple[str, ...]:
    """``"0,1"`` -> ``("0", "1")``: indices or GPU-/MIG- UUIDs, as ``CUDA_VISIBLE_DEVICES`` takes them."""
    gpus = tuple(part.strip() for part in text.split(",") if part.strip())
    for gpu in gpus:
        if not re.fullmatch(r"[0-9]+|(GPU|MIG)-[0-9A-Za-z/.-]+", gpu):
            raise ValueError(f"{gpu!r} is not a GPU id (an index such as 0, or a GPU-/MIG- UUID)")
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"GPU list {text!r} names a GPU twice")
    return gpus


def visible_gpus() -> tuple[str, ...] | None:
    """The GPUs an inherited ``CUDA_VISIBLE_DEVICES`` leaves (empty: all hidden); None when unset."""
    if VISIBLE not in os.environ:
        return None
    try:
        return parse_gpus(os.environ[VISIBLE])
    except ValueError:  # "-1" and other ways of hiding every GPU
        return ()


def listed_gpus() -> tuple[str, ...]:
    """The indices ``nvidia-smi`` lists; none where it is missing or fails (a machine without GPUs)."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return ()
    try:
        listed = subprocess.run(
            [tool, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi could not list the GPUs: %s", exc)
        return ()
    return tuple(line.strip() for line in listed.splitlines() if line.strip().isdigit())


def use_only(gpu: str | None) -> None:
    """Leave this process only ``gpu`` (None: what it inherited) and the default allocator settings
    unless the operator set their own. Before anything initialises CUDA."""
    os.environ.setdefault(ALLOC_CONF, DEFAULT_ALLOC_CONF)
    if gpu is not None:
        os.environ[VISIBLE] = gpu


def environment_with(**values: str) -> dict[str, str]:
    """This process's environment with ``values`` set: for a process started to probe one GPU, or
    a worker exec'd with its ``AIORCH_GPUS``."""
    return {**os.environ, **values}
