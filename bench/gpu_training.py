"""``make bench-gpu``, section training: ``train_lora`` on an SD 1.5-shaped random-weight model (the
diffusion section's, ``sd15_model``), 512x512, rank 16, 100 steps, 4 photos (``skimage.data``
resized to the resolution); the tests' tiny model at 256x256, rank 4, 10 steps for ``--small``.

Each pair is one run on each side, with the same model folder, images, captions, config (the
job's payload defaults included, and the worker's ``AIORCH_TRAIN_CHECKPOINT_EVERY``, so both
sides write the same checkpoints) and device:

- the worker: a ``train_lora`` job through the API and a real training worker on the engine's
  own queue (``gpu.train``, a worker of its own as in ``aiorch up``), started for this section;
  its ``result.meta`` gives ``steps``, ``seconds`` (the whole ``train_lora`` call) and
  ``peak_memory_bytes``, and the job its ``started_at..finished_at``;
- direct: ``inference.training.train_lora`` called in this process, the same diffusers + peft
  loop with nothing around it: the floor. Its ``TrainingOutcome`` gives the same three numbers,
  measured by the same code, and a fresh checkpoint folder per run keeps it from resuming.

Two ratios are judged: (a) seconds per step, worker / direct (``result.meta.seconds`` over
``steps`` against the outcome's), target <= 1.05: what running inside a worker costs the loop
(progress writes, the cancel check, the process itself); (b) the job's ``started_at..finished_at``
/ the direct call's wall time, target <= 1.05: adds claiming, decoding the images, the model
registration, copying and storing the LoRA file, the final write. Steps per second and peak
``max_memory_allocated`` (CUDA only; ``train_lora`` resets the counter when it starts, in both
processes) are reported beside them. "Seconds" is the whole call on both sides: loading the
model, encoding the images once, the steps and saving the LoRA.

Three pairs by default (``--training-repeats``), not the fifteen of the other sections: a
full-size run is expected to take half a minute or more on a GPU (loading, 100 steps, saving; not
measured yet), so fifteen pairs would hold the section for 15 minutes and more, and each run's
seconds per step is already a mean over 100 steps, so a pair's ratio should scatter much less
than a single diffusion call's. Three pairs give no 95 % interval; they are judged on the
smallest..largest per-pair ratio (``judge(few_pairs=True)``, 75 % confidence for the median):
PASS only when every pair met the target (by chance at most 1 in 8 when the median is above it).

One unmeasured warm-up per side first (a short run at the same size: the worker's imports and
CUDA context, kernel choices, the model files in the page cache).
"""

from __future__ import annotations

import shutil
import signal
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.gpu_diffusion import sd15_model
from bench.gpu_judge import JOB_TARGET, Judgement, judge
from bench.gpu_session import GIB, Bench, data_uri, interleave, job_seconds, ratio
from bench.run import say

STEP_TARGET = 1.05  # (a) seconds per step, worker / direct (the target)
TRIGGER = "sks"  # every caption is "a photo of sks", as the engine makes them from a trigger word
WARMUP_STEPS = 2
# Seconds between the job's status reads: every read is an API request and a database query that
# compete with the worker for the CPU while it trains (and not with the direct side), and a
# read's delay changes no number here (the job's own timestamps and meta are measured).
POLL_S = 0.5
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


@dataclass(frozen=True)
class TrainingPlan:
    """What each run trains: the same on both sides."""

    resolution: int
    rank: int
    steps: int
    images: int = len(PHOTOS)
    learning_rate: float = 1e-4  # the payload's default
    seed: int = 0

    @property
    def label(self) -> str:
        return f"{self.resolution}x{self.resolution} rank {self.rank}, {self.steps} steps"

    def payload(self, model_id: str, image_uris: list[str], steps: int | None = None) -> dict[str, Any]:
        return {
            "images": image_uris,
            "trigger_word": TRIGGER,
            "base_model": model_id,
            "rank": self.rank,
            "steps": self.steps if steps is None else steps,
            "learning_rate": self.learning_rate,
            "resolution": self.resolution,
            "seed": self.seed,
        }


FULL = TrainingPlan(resolution=512, rank=16, steps=100)
SMALL = TrainingPlan(resolution=256, rank=4, steps=10)


def job_sample(job: dict[str, Any]) -> dict[str, Any]:
    """One finished ``train_lora`` job as a pair's worker side: ``engine_s`` is the engine's
    ``train_lora`` call (``result.meta.seconds``), ``job_s`` the job's started..finished."""
    meta = job["result"]["meta"]
    seconds, steps = float(meta["seconds"]), int(meta["steps"])
    return {
        "engine_s": seconds,
        "job_s": job_seconds(job),
        "steps": steps,
        "s_per_step": seconds / steps,
        "steps_per_s": steps / seconds,
        "peak_device_bytes": meta.get("peak_memory_bytes"),
        "final_loss": meta.get("final_loss"),
        "dtype": meta.get("dtype"),
        "optimizer": meta.get("optimizer"),
        "job_id": job["job_id"],
        "model_id": job["result"].get("model_id"),
    }


def outcome_sample(outcome: Any, wall_s: float) -> dict[str, Any]:
    """One direct ``train_lora`` call (its ``TrainingOutcome`` and wall time) as a pair's direct
    side; ``encode_s`` is 0 (a LoRA is written by the call itself), for ``interleave``'s log line."""
    return {
        "call_s": wall_s,
        "encode_s": 0.0,
        "train_s": outcome.seconds,
        "steps": outcome.steps,
        "s_per_step": outcome.seconds / outcome.steps,
        "steps_per_s": outcome.steps / outcome.seconds,
        "peak_device_bytes": outcome.peak_memory_bytes,
        "final_loss": outcome.final_loss,
        "dtype": outcome.dtype,
        "optimizer": outcome.optimizer,
    }


def judge_training(
    jobs: list[dict[str, Any]], directs: list[dict[str, Any]], smoke: bool
) -> tuple[Judgement, Judgement]:
    """(a) seconds per step, worker / direct; (b) job started..finished / direct wall time."""
    per_step = judge(
        [j["s_per_step"] for j in jobs],
        [d["s_per_step"] for d in directs],
        STEP_TARGET,
        smoke=smoke,
        few_pairs=True,
    )
    whole = judge(
        [j["job_s"] for j in jobs], [d["call_s"] for d in directs], JOB_TARGET, smoke=smoke, few_pairs=True
    )
    return per_step, whole


def loss_gap(jobs: list[dict[str, Any]], directs: list[dict[str, Any]]) -> float | None:
    """The largest relative difference of a pair's final losses: 0 on the CPU, where a run is
    deterministic bit for bit, shows that both sides trained the same thing."""
    gaps = [
        abs(j["final_loss"] - d["final_loss"]) / max(abs(d["final_loss"]), 1e-12)
        for j, d in zip(jobs, directs, strict=True)
        if j.get("final_loss") is not None and d.get("final_loss") is not None
    ]
    return max(gaps) if gaps else None


def photos(side: int) -> list[Any]:
    """The training images: ``skimage.data`` photos, RGB, resized to ``side`` x ``side``. The
    worker gets them as PNG ``data:`` URIs, which decode to these very pixels (PNG is lossless)."""
    from PIL import Image
    from skimage import data

    return [
        Image.fromarray(getattr(data, name)()).convert("RGB").resize((side, side), Image.Resampling.LANCZOS)
        for name in PHOTOS
    ]


def bench_training(bench: Bench) -> dict[str, Any]:
    from inference.engines.training import ENGINE as TRAINING

    plan = SMALL if bench.small else FULL
    bench.fresh_start()
    model_id, folder = sd15_model(bench, "training")
    # A training worker of its own on the engine's queue, as ``aiorch up`` runs one: a clean
    # process, so its peak memory is this section's alone.
    bench.plat.start_worker("train", TRAINING.queue, 1)
    try:
        with tempfile.TemporaryDirectory(prefix="aiorch-bench-train-") as scratch:
            return train_pairs(bench, plan, model_id, folder, Path(scratch))
    finally:
        bench.plat.kill("train", signal.SIGTERM)


def train_pairs(
    bench: Bench, plan: TrainingPlan, model_id: str, folder: Path, scratch: Path
) -> dict[str, Any]:
    from inference.base import NullControl
    from inference.devices import budget_bytes
    from inference.training import LoraTrainingConfig, TrainingExample, train_lora

    images = photos(plan.resolution)
    uris = [data_uri(image) for image in images]
    # The captions the engine makes from the trigger word alone.
    examples = [TrainingExample(image, f"a photo of {TRIGGER}") for image in images]
    checkpoint_every = bench.plat.settings.train_checkpoint_every

    def config(steps: int) -> LoraTrainingConfig:
        # The engine's config from the payload (train_text_encoder and the rest at their defaults).
        return LoraTrainingConfig(
            rank=plan.rank,
            steps=steps,
            learning_rate=plan.learning_rate,
            resolution=plan.resolution,
            seed=plan.seed,
            checkpoint_every=checkpoint_every,
        )

    def direct(i: int, steps: int = plan.steps) -> dict[str, Any]:
        checkpoints = scratch / f"checkpoints-{i}"  # fresh: a run of the same config would resume
        limit = budget_bytes(bench.device, fraction=0.9)  # as the engine computes it, before the call
        bench.reset_peak()
        t0 = time.perf_counter()
        outcome = train_lora(
            folder,
            examples,
            config(steps),
            scratch / f"direct-{i}.safetensors",
            checkpoints,
            bench.device,
            NullControl(),
            memory_limit_bytes=limit,
        )
        wall = time.perf_counter() - t0
        shutil.rmtree(checkpoints, ignore_errors=True)
        if bench.device == "cuda":
            import torch

            # The run's freed blocks back to the device, so the worker's next run sees the free
            # memory this one saw (its engine sizes the memory check on it, as this call did).
            torch.cuda.empty_cache()
        return outcome_sample(outcome, wall)

    def worker(_i: int) -> dict[str, Any]:
        return job_sample(bench.job("train_lora", plan.payload(model_id, uris), poll=POLL_S))

    say(
        f"training: {plan.label}, {len(images)} images, checkpoint every {checkpoint_every}, "
        f"{bench.training_repeats} pairs on {bench.device}"
    )
    t0 = time.monotonic()
    first = job_sample(bench.job("train_lora", plan.payload(model_id, uris, steps=WARMUP_STEPS), poll=POLL_S))
    say(f"training: warm-up job ({WARMUP_STEPS} steps, cold worker) {time.monotonic() - t0:.1f}s")
    direct(-1, WARMUP_STEPS)
    jobs, directs = interleave(bench, f"training {plan.label}", worker, direct, bench.training_repeats)
    per_step, whole = judge_training(jobs, directs, smoke=bench.small)
    bench.judged_row("training", f"{plan.label}: (a) s/step, worker / direct", per_step, ("worker", "direct"))
    bench.judged_row(
        "training", f"{plan.label}: (b) job started..finished / direct call", whole, ("job", "direct")
    )
    worker_rate = statistics.median(j["steps_per_s"] for j in jobs)
    direct_rate = statistics.median(d["steps_per_s"] for d in directs)
    bench.row(
        "training",
        f"{plan.label}: steps per second (whole call), median",
        round(worker_rate, 3),
        round(direct_rate, 3),
        ratio(worker_rate, direct_rate),
        unit=" st/s",
    )
    peaks = [j["peak_device_bytes"] for j in jobs if j["peak_device_bytes"] is not None]
    direct_peaks = [d["peak_device_bytes"] for d in directs if d["peak_device_bytes"] is not None]
    worker_peak = max(peaks) / GIB if peaks else None
    direct_peak = max(direct_peaks) / GIB if direct_peaks else None
    bench.row(
        "training",
        f"{plan.label}: peak GPU memory (max_memory_allocated), max",
        None if worker_peak is None else round(worker_peak, 3),
        None if direct_peak is None else round(direct_peak, 3),
        ratio(worker_peak, direct_peak),
        unit=" GiB",
    )
    gap = loss_gap(jobs, directs)
    say(f"training: largest relative final-loss difference worker/direct {gap}")
    return {
        "model": model_id,
        "shape": "tiny (tests/inference/tiny_diffusion.py)" if bench.small else "SD 1.5 (random weights)",
        "plan": asdict(plan),
        "checkpoint_every": checkpoint_every,
        "pairs": bench.training_repeats,
        "dtype": directs[0]["dtype"],
        "optimizer": directs[0]["optimizer"],
        "warmup_job": first["job_id"],
        "worker_timing_source": "result.meta.seconds / result.meta.steps; job started_at_ms..finished_at_ms",
        "direct_timing_source": "inference.training.train_lora here: TrainingOutcome.seconds / steps; wall",
        "final_loss_max_relative_gap": gap,
        "worker": jobs,
        "direct": directs,
        "seconds_per_step_worker_vs_direct": per_step.as_dict(),
        "job_vs_direct_call": whole.as_dict(),
    }
