"""What every ``make bench-gpu`` section gets: the running platform, the run's choices, and the one
way a case is measured (interleaved pairs of a job and the raw call, judged by ``bench.gpu_judge``).
"""

from __future__ import annotations

import base64
import gc
import io
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.gpu_judge import ENGINE_TARGET, FEW_REPEATS, JOB_TARGET, Judgement, judge
from bench.run import KEY, say
from inference.model_store import ModelStore
from tasks.storage import encode_image
from tests.support.platform import Platform

GPU_QUEUES = "gpu.diffusion,gpu.superres,gpu.faceswap,gpu.vision"
GIB = 2**30


@dataclass
class Bench:
    """The running platform and the choices of this run, handed to each section."""

    plat: Platform
    store: ModelStore
    device: str  # "cuda" or "cpu"
    small: bool
    repeats: int
    fmt: str = "png"  # the output format every job asks for, and the raw side encodes to
    training_repeats: int = FEW_REPEATS  # pairs of the training section, whose runs take minutes
    rows: list[dict[str, Any]] = field(default_factory=list)
    worker_used: bool = False  # the gpu worker has run a job since it started

    @property
    def models_dir(self) -> Path:
        return self.store.models_dir

    def saved_model(
        self, model_id: str, save: Callable[[Path], object], section: str, described: str, **manifest: Any
    ) -> tuple[str, Path]:
        """The random-weight model ``model_id``, saved into its folder by ``save`` and registered in
        the store (``manifest``: its other fields there) by the first section that asks for it;
        returns its id and folder. ``described`` names it in the line that says how long it took."""
        folder = self.models_dir / model_id
        if model_id in self.store:
            return model_id, folder
        started = time.monotonic()
        save(folder)
        # Added while the workers run: a worker finds it in the manifest on its next job.
        self.store.add(folder, id=model_id, **manifest)
        say(f"{section}: {described} saved and added in {time.monotonic() - started:.1f}s")
        return model_id, folder

    def job(
        self, task: str, payload: dict[str, Any], timeout: float = 900.0, poll: float = 0.05
    ) -> dict[str, Any]:
        """Submit through the API and wait for a final status; raise unless it succeeded.

        ``poll``: seconds between status reads. Each read costs the API and the database some CPU
        while the worker runs; a long job is read less often (its timings are the job's own
        timestamps, so a later read changes no number)."""
        self.worker_used = True
        response = self.plat.submit(KEY, task, {**payload, "format": self.fmt})
        if response.status_code != 202:
            raise RuntimeError(f"{task} job refused: {response.status_code} {response.text[:500]}")
        job = self.plat.wait(KEY, response.json()["job_id"], timeout=timeout, poll=poll)
        if job["status"] != "succeeded":
            raise RuntimeError(f"{task} job ended {job['status']}: {job.get('error')}")
        return job

    def restart_gpu_worker(self, **overrides: Any) -> None:
        """The gpu worker again, with other settings (e.g. ``upscale_max_batch``): a cold process
        with empty model caches and fresh peak-memory counters."""
        self.plat.kill("gpu", signal.SIGTERM)
        self.plat.settings = self.plat.settings.with_overrides(**overrides)
        self.plat.start_worker("gpu", GPU_QUEUES, 1)
        self.worker_used = False

    def fresh_start(self) -> None:
        """A case starts with nothing of an earlier one cached: the gpu worker restarted (when it
        ran anything), and this process's freed tensors returned and its peak counter reset, so
        one case's peak memory never includes another's models."""
        if self.worker_used:
            self.restart_gpu_worker()
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        if self.device != "cuda":
            return None
        import torch

        return int(torch.cuda.max_memory_allocated())

    def encode(self, image: Any) -> float:
        """Seconds to encode ``image`` as the platform encodes the job's output (same function,
        same format): the raw side's share of what the job does after the engine."""
        t0 = time.perf_counter()
        encode_image(image, self.fmt)
        return time.perf_counter() - t0

    def row(
        self,
        section: str,
        metric: str,
        engine: Any,
        raw: Any,
        ratio: Any = None,
        target: str = "",
        ok: bool | None = None,
        unit: str = "",
    ) -> None:
        """An informational row (throughput, memory, batching), or a single-number verdict."""
        self.rows.append(
            {
                "section": section,
                "metric": metric,
                "engine": engine,
                "raw": raw,
                "ratio": ratio,
                "target": target,
                "pass": ok,
                "unit": unit,
            }
        )

    def judged_row(self, section: str, metric: str, judgement: Judgement, sides: tuple[str, str]) -> None:
        self.rows.append(
            {
                "section": section,
                "metric": metric,
                "sides": sides,
                "judgement": judgement,
                "target": f"<= {judgement.target}",
                "pass": judgement.ok,
                "verdict": judgement.verdict,
                "unit": " s",
            }
        )


def job_seconds(job: dict[str, Any]) -> float:
    """``started_at..finished_at`` of a job object, from its millisecond fields."""
    return (job["finished_at_ms"] - job["started_at_ms"]) / 1000.0


def data_uri(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def interleave(
    bench: Bench,
    label: str,
    run_job: Callable[[int], dict[str, Any]],
    run_raw: Callable[[int], dict[str, Any]],
    repeats: int | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``repeats`` (default ``bench.repeats``) pairs, the job first in even pairs and the raw call
    first in odd ones.

    ``run_job(i)`` returns at least ``job_s`` and ``engine_s`` (None when the engine reports no
    timing of its own); ``run_raw(i)`` returns ``call_s`` and ``encode_s``."""
    jobs: list[dict[str, Any]] = []
    raws: list[dict[str, Any]] = []
    count = bench.repeats if repeats is None else repeats
    for i in range(count):
        if i % 2 == 0:
            jobs.append(run_job(i))
            raws.append(run_raw(i))
        else:
            raws.append(run_raw(i))
            jobs.append(run_job(i))
        engine_s = jobs[-1]["engine_s"]
        say(
            f"{label} {i + 1}/{count}: job {jobs[-1]['job_s']:.3f}s "
            f"(engine {'-' if engine_s is None else f'{engine_s:.3f}s'}), raw {raws[-1]['call_s']:.3f}s "
            f"+ encode {raws[-1]['encode_s']:.3f}s"
        )
    return jobs, raws


def judge_case(
    bench: Bench, section: str, label: str, jobs: list[dict[str, Any]], raws: list[dict[str, Any]]
) -> dict[str, Any]:
    """Both ratios of one case, added to the table; returns them for the JSON."""
    raw_s = [r["call_s"] for r in raws]
    engine = judge([j["engine_s"] for j in jobs], raw_s, ENGINE_TARGET, smoke=bench.small)
    whole = judge(
        [j["job_s"] for j in jobs],
        [r["call_s"] + r["encode_s"] for r in raws],  # the same encode the job does
        JOB_TARGET,
        smoke=bench.small,
    )
    bench.judged_row(section, f"{label}: (a) engine call / raw call", engine, ("engine", "raw"))
    bench.judged_row(
        section, f"{label}: (b) job started..finished / (raw call + encode)", whole, ("job", "raw+enc")
    )
    peaks = [j["peak_device_bytes"] for j in jobs if j.get("peak_device_bytes") is not None]
    raw_peaks = [r["peak_device_bytes"] for r in raws if r.get("peak_device_bytes") is not None]
    if peaks or raw_peaks:
        engine_peak = max(peaks) / GIB if peaks else None
        raw_peak = max(raw_peaks) / GIB if raw_peaks else None
        bench.row(
            section,
            f"{label}: peak GPU memory (max_memory_allocated), max",
            None if engine_peak is None else round(engine_peak, 3),
            None if raw_peak is None else round(raw_peak, 3),
            ratio(engine_peak, raw_peak),
            unit=" GiB",
        )
    return {"engine_vs_raw": engine.as_dict(), "job_vs_raw_plus_encode": whole.as_dict()}
