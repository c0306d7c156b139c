"""Checkpoints of a training run: written atomically, found again by fingerprint, pruned.

A checkpoint is a folder ``step-00000100-<fingerprint[:12]>`` inside the run's checkpoint folder
holding ``state.pt`` (LoRA parameters, optimizer and grad-scaler state, the noise generator's
state and the losses so far) and ``meta.json`` (format, step, fingerprint). Both are written
into a hidden temporary folder that is renamed into place only when complete, so a crash
mid-write leaves a ``.tmp-*`` folder that is never read, never a half checkpoint.

The fingerprint is a sha256 over everything that decides the numbers a run computes: the
config fields that shape the trajectory, the resolved dtype and device type, the optimizer,
the base model (its index, and the names, sizes, heads and tails of its files) and the
prepared examples. ``steps``, ``checkpoint_every`` and ``gradient_checkpointing`` are left out:
they do not change step ``k`` of a run, so a job re-run with more steps continues from where
it stopped. A checkpoint whose fingerprint differs is another run's and is never resumed (nor
deleted: it is not this run's to remove).

``state.pt`` is read with ``torch.load(weights_only=True)``: tensors and plain containers only,
so a planted file cannot run code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inference.training.params import LoraTrainingConfig, Precision

log = logging.getLogger("aiorch.training")

CHECKPOINT_FORMAT = 1
KEEP_CHECKPOINTS = 2
STATE_FILE = "state.pt"
META_FILE = "meta.json"
TMP_PREFIX = ".tmp-"
# Config fields that do not change what step k computes (see the module docstring).
UNFINGERPRINTED = frozenset({"steps", "checkpoint_every", "gradient_checkpointing", "mixed_precision"})
# The model's files are fingerprinted by name, size and these many bytes from each end: enough to
# tell two fine-tunes of one architecture apart without reading gigabytes per run.
EDGE_BYTES = 2**20
MODEL_PARTS = ("unet", "text_encoder", "vae", "tokenizer", "scheduler")


@dataclass
class Checkpoint:
    """The state of a run after ``step`` steps."""

    step: int
    losses: list[float]
    lora: dict[str, torch.Tensor]  # "unet.<param>" / "text_encoder.<param>" -> fp32 value (CPU)
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: torch.Tensor  # the noise generator's state


def run_fingerprint(
    config: LoraTrainingConfig,
    precision: Precision,
    optimizer: str,
    model_dir: Path,
    examples_digest: str,
) -> str:
    """The identity of a run, as a hex sha256 (see the module docstring for what it covers)."""
    facts = {
        "format": CHECKPOINT_FORMAT,
        # mixed_precision is covered by the dtype it resolved to ("auto" may mean either).
        "config": {k: v for k, v in sorted(config.as_dict().items()) if k not in UNFINGERPRINTED},
        "dtype": precision.dtype_name,
        "device_type": precision.device.type,
        "optimizer": optimizer,
        "model": model_digest(model_dir),
        "examples": examples_digest,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def model_digest(model_dir: Path) -> str:
    digest = hashlib.sha256()
    index = model_dir / "model_index.json"
    digest.update(index.read_bytes() if index.is_file() else b"")
    for part in MODEL_PARTS:
        folder = model_dir / part
        if not folder.is_dir():
            continue
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            size = file.stat().st_size
            digest.update(f"{file.relative_to(model_dir)}:{size}:".encode())
            with open(file, "rb") as fh:
                digest.update(fh.read(EDGE_BYTES))
                if size > 2 * EDGE_BYTES:
                    fh.seek(size - EDGE_BYTES)
                    digest.update(fh.read(EDGE_BYTES))
                elif size > EDGE_BYTES:
                    digest.update(fh.read())
    return digest.hexdigest()


def checkpoint_name(step: int, fingerprint: str) -> str:
    return f"step-{step:08d}-{fingerprint[:12]}"


def save_checkpoint(
    folder: Path, checkpoint: Checkpoint, fingerprint: str, *, keep: int = KEEP_CHECKPOINTS
) -> Path:
    """Write ``checkpoint`` atomically into ``folder`` (created if missing) and prune this run's
    checkpoints to the newest ``keep``. Returns the checkpoint's folder."""
    folder.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(checkpoint.step, fingerprint)
    _remove_stale_temporaries(folder, fingerprint)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=folder))
    try:
        state = {
            "step": checkpoint.step,
            "losses": list(checkpoint.losses),
            "lora": checkpoint.lora,
            "optimizer": checkpoint.optimizer,
            "scaler": checkpoint.scaler,
            "rng": checkpoint.rng,
        }
        with open(tmp / STATE_FILE, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        meta = {"format": CHECKPOINT_FORMAT, "step": checkpoint.step, "fingerprint": fingerprint}
        with open(tmp / META_FILE, "w", encoding="utf-8") as fh:
            json.dump(meta, fh)
            fh.flush()
            os.fsync(fh.fileno())
        final = folder / name
        if final.exists():
            # The same step of the same run, written again after a resume from an older one.
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(folder)
    for old in _own_checkpoints(folder, fingerprint)[keep:]:
        shutil.rmtree(old[1], ignore_errors=True)
    return final


def load_latest_checkpoint(folder: Path | None, fingerprint: str, *, max_step: int) -> Checkpoint | None:
    """The newest readable checkpoint of the run ``fingerprint`` in ``folder`` at or before
    ``max_step``, or None. Unreadable ones are logged and skipped for the next older one."""
    if folder is None or not folder.is_dir():
        return None
    for step, path in _own_checkpoints(folder, fingerprint):
        if step > max_step:
            continue
        try:
            state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
            checkpoint = Checkpoint(
                step=int(state["step"]),
                losses=[float(x) for x in state["losses"]],
                lora=dict(state["lora"]),
                optimizer=dict(state["optimizer"]),
                scaler=state["scaler"],
                rng=state["rng"],
            )
        except Exception as exc:
            # A truncated or corrupt pickle fails with almost any exception type (IndexError from
            # the unpickler's stack, UnpicklingError, EOFError...): each means "unreadable".
            log.warning("skipping unreadable training checkpoint %s: %s", path, exc)
            continue
        if checkpoint.step != step or len(checkpoint.losses) != step:
            log.warning("skipping inconsistent training checkpoint %s", path)
            continue
        return checkpoint
    return None


def _own_checkpoints(folder: Path, fingerprint: str) -> list[tuple[int, Path]]:
    """This run's complete checkpoints in ``folder``, newest first."""
    found: list[tuple[int, Path]] = []
    for path in folder.iterdir():
        if path.name.startswith(".") or not path.is_dir():
            continue
        try:
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
            continue
        step = meta.get("step")
        if meta.get("fingerprint") != fingerprint or not isinstance(step, int) or step < 1:
            continue
        found.append((step, path))
    found.sort(reverse=True)
    return found


def _remove_stale_temporaries(folder: Path, fingerprint: str) -> None:
    # Left by a crash of this same run mid-write. Another run's are left alone.
    for path in folder.glob(f"{TMP_PREFIX}step-*-{fingerprint[:12]}-*"):
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
