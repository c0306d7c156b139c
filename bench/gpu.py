"""``make bench-gpu``: the GPU engines through the real platform against the same library call made
directly in one process, on random-weight models of production size.

    python -m bench.gpu                      # every section, full size (CUDA, fp16)
    python -m bench.gpu --only diffusion     # one section
    python -m bench.gpu --small              # tiny models at tiny sizes: a CPU smoke run
    python -m bench.gpu --embedded           # SQLite + kombu filesystem transport
    python -m bench.gpu --database-url ... --broker-url ...   # existing ones (as bench.run)

Each section installs its random-weight model into the benchmark's models dir (while the workers
already run: the model store is re-read per job), runs jobs through the API and a real Celery
worker, and alternates them with the bare library call in this process, so drift of the machine
hits both sides alike. Without CUDA the run switches to ``--small`` and says, in the table and
the JSON, that its numbers are CPU smoke numbers and not GPU measurements.

diffusion: an SD 1.5-shaped pipeline (UNet 320/640/1280/1280 with 768-wide cross attention, the
SD 1.5 CLIP ViT-L text encoder and VAE), 512x512, 20 steps, fp16 on CUDA.
  (a) a ``generate`` job through the API and the gpu worker. Two timings: the engine's own
      (``result.meta.timing``: wall time of the diffusers pipeline call(s) inside the worker,
      steps counted by the step callback, peak ``torch.cuda.max_memory_allocated`` of the worker
      process) and the job's ``started_at..finished_at`` (adds claiming, input/payload checks,
      PNG encoding, storage and the final database write).
  (b) ``StableDiffusionPipeline`` from the same folder, same dtype, scheduler, seed (CPU
      generator), size, steps and guidance, called in this process.
  The overhead ratio is (a) engine pipeline seconds / (b) seconds, medians; target <= 1.03.

superres: RealESRGAN_x4plus-shaped RRDB x4 on 512x512 and realesr-general-x4v3-shaped compact x4
on 1024x1024 (random weights, official file layout), fp16 on CUDA.
  (a) an ``upscale`` job (scale 4) through the worker: the Upscaler call's own time and peak
      memory (``result.meta.timing``; it tiles at 512 px with 32 px overlap, so the compact run
      pays for the overlap) and the job's ``started_at..finished_at`` (adds PNG encoding).
  (b) the spandrel model called on the whole image in this process, PIL in and PIL out.
  Then batching: 8 small (128x128) RRDB jobs, in process (``upscale_batch`` with max_batch 8 vs
  1) and through the worker (8 jobs queued behind a long one, AIORCH_UPSCALE_MAX_BATCH 8 vs 1;
  first start to last finish); target >= 1.5x.

Prints a table and writes ``bench-results/bench-gpu-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform as host_platform
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import infra
from bench.run import KEY, bench_settings, fmt, git_revision, redact, say, verdict
from config import Settings
from inference.model_store import ModelStore
from models.db import Database
from models.migrate import upgrade
from tests.support.platform import ROOT, Platform, free_port

OVERHEAD_TARGET = 1.03


# -- what every section gets ------------------------------------------------------------------------


@dataclass
class Bench:
    """The running platform and the choices of this run, handed to each section."""

    plat: Platform
    store: ModelStore
    device: str  # "cuda" or "cpu"
    small: bool
    repeats: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def models_dir(self) -> Path:
        return self.store.models_dir

    def job(self, task: str, payload: dict[str, Any], timeout: float = 900.0) -> dict[str, Any]:
        """Submit through the API and wait for a final status; raise unless it succeeded."""
        response = self.plat.submit(KEY, task, payload)
        if response.status_code != 202:
            raise RuntimeError(f"{task} job refused: {response.status_code} {response.text[:500]}")
        job = self.plat.wait(KEY, response.json()["job_id"], timeout=timeout)
        if job["status"] != "succeeded":
            raise RuntimeError(f"{task} job ended {job['status']}: {job.get('error')}")
        return job

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


def job_seconds(job: dict[str, Any]) -> float:
    """``started_at..finished_at`` of a job object, from its millisecond fields."""
    return (job["finished_at_ms"] - job["started_at_ms"]) / 1000.0


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


# -- diffusion ---------------------------------------------------------------------------------------


def save_sd15_shaped(folder: Path, *, device: str, dtype: Any) -> Path:
    """An SD 1.5-shaped ``StableDiffusionPipeline`` with random weights, saved in diffusers layout.

    The tokenizer is the tests' small closed BPE vocabulary (CLIP's 49k-entry one is not on the
    machine); the text encoder still has CLIP ViT-L's 49408-row embedding, so every module has
    its production size and cost."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.inference.tiny_diffusion import tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(folder.parent / f".{folder.name}-tokenizer")
    # Parameters created on the device directly: initialising ~1.1 B of them on CPU is slow.
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                projection_dim=768,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    # SD 1.5's own scheduler configuration.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet.to(dtype).eval(),
        vae=vae.to(dtype).eval(),
        text_encoder=text_encoder.to(dtype).eval(),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder))
    del pipe, unet, vae, text_encoder
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def bench_diffusion(bench: Bench) -> dict[str, Any]:
    import torch
    import transformers
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from tests.inference.tiny_diffusion import save_tiny_sd

    side, steps, cfg = (64, 4, 7.0) if bench.small else (512, 20, 7.0)
    dtype = torch.float16 if bench.device == "cuda" else torch.float32
    model_id = "bench-sd15-small" if bench.small else "bench-sd15"
    folder = bench.models_dir / model_id
    started = time.monotonic()
    if bench.small:
        save_tiny_sd(folder)
    else:
        save_sd15_shaped(folder, device=bench.device, dtype=dtype)
    # Added while the workers run: the gpu worker finds it in the manifest on the next job.
    bench.store.add(folder, id=model_id)
    say(
        f"diffusion: {'tiny' if bench.small else 'SD 1.5-shaped'} random-weight model {model_id} "
        f"saved and added in {time.monotonic() - started:.1f}s; {side}x{side}, {steps} steps, "
        f"{str(dtype).removeprefix('torch.')} on {bench.device}"
    )

    prompt = "a photo of a cat"
    payload = {
        "prompt": prompt,
        "model": model_id,
        "width": side,
        "height": side,
        "steps": steps,
        "cfg_scale": cfg,
        "format": "png",
    }

    diffusers_logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    raw_pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    raw_pipe.to(bench.device)
    raw_pipe.set_progress_bar_config(disable=True)

    def raw_call(seed: int) -> dict[str, Any]:
        counted = 0

        def count(_p: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            nonlocal counted
            counted += 1
            return kwargs

        if bench.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        # The engine's call, keyword for keyword (inference/diffusion.py, text2img, one sample).
        raw_pipe(
            prompt=prompt,
            negative_prompt=None,
            num_inference_steps=steps,
            guidance_scale=cfg,
            width=side,
            height=side,
            num_images_per_prompt=1,
            generator=[torch.Generator("cpu").manual_seed(seed)],
            callback_on_step_end=count,
            output_type="pil",
        )
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if bench.device == "cuda" else None
        return {
            "pipeline_s": seconds,
            "steps": counted,
            "it_per_s": counted / seconds,
            "peak_device_bytes": peak,
        }

    # Warm-up, not measured: the worker imports torch and loads the model; both sides pick
    # their kernels.
    t0 = time.monotonic()
    first = bench.job("generate", {**payload, "seed": 1})
    say(
        f"diffusion: first job (cold worker: import, load) {time.monotonic() - t0:.1f}s, "
        f"backend {first['result']['meta']['backend']}"
    )
    raw_call(1)

    engine_runs: list[dict[str, Any]] = []
    raw_runs: list[dict[str, Any]] = []
    for i in range(bench.repeats):
        job = bench.job("generate", {**payload, "seed": 100 + i})
        timing = job["result"]["meta"]["timing"]
        engine_runs.append({**timing, "job_s": job_seconds(job), "job_id": job["job_id"]})
        raw_runs.append(raw_call(100 + i))
        say(
            f"diffusion {i + 1}/{bench.repeats}: engine {timing['pipeline_s']:.3f}s "
            f"(job {engine_runs[-1]['job_s']:.3f}s), raw {raw_runs[-1]['pipeline_s']:.3f}s"
        )

    def med(runs: list[dict[str, Any]], key: str) -> float | None:
        return median([r[key] for r in runs if r.get(key) is not None])

    engine_s, raw_s, job_s = (
        med(engine_runs, "pipeline_s"),
        med(raw_runs, "pipeline_s"),
        med(engine_runs, "job_s"),
    )
    engine_ips, raw_ips = med(engine_runs, "it_per_s"), med(raw_runs, "it_per_s")
    engine_peak, raw_peak = med(engine_runs, "peak_device_bytes"), med(raw_runs, "peak_device_bytes")
    overhead = ratio(engine_s, raw_s)
    gib = 2**30
    bench.row(
        "diffusion",
        "pipeline call (engine in worker vs raw), median",
        engine_s,
        raw_s,
        overhead,
        f"<= {OVERHEAD_TARGET}",
        # A smoke run on tiny models measures Python overhead against milliseconds of compute:
        # it proves the benchmark runs, and its ratio is no verdict on the target.
        None if overhead is None or bench.small else overhead <= OVERHEAD_TARGET,
        " s",
    )
    bench.row(
        "diffusion",
        "iterations per second",
        engine_ips,
        raw_ips,
        ratio(engine_ips, raw_ips),
        "",
        None,
        " it/s",
    )
    bench.row(
        "diffusion",
        "job started_at..finished_at vs raw call",
        job_s,
        raw_s,
        ratio(job_s, raw_s),
        "",
        None,
        " s",
    )
    bench.row(
        "diffusion",
        "peak GPU memory (max_memory_allocated)",
        None if engine_peak is None else round(engine_peak / gib, 3),
        None if raw_peak is None else round(raw_peak / gib, 3),
        ratio(engine_peak, raw_peak),
        "",
        None,
        " GiB",
    )
    return {
        "model": model_id,
        "shape": "tiny (tests/inference/tiny_diffusion.py)" if bench.small else "SD 1.5 (random weights)",
        "width": side,
        "height": side,
        "steps": steps,
        "cfg_scale": cfg,
        "dtype": str(dtype).removeprefix("torch."),
        "engine_timing_source": "result.meta.timing (diffusers pipeline call wall time inside the worker)",
        "job_timing_source": "job started_at_ms..finished_at_ms",
        "engine": engine_runs,
        "raw": raw_runs,
        "overhead_ratio": overhead,
    }


# -- super-resolution ---------------------------------------------------------------------------------

GPU_QUEUES = "gpu.diffusion,gpu.superres,gpu.faceswap,gpu.vision"


def data_uri(image: Any) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def restart_gpu_worker(bench: Bench, **overrides: Any) -> None:
    """The gpu worker again, with other settings (e.g. ``upscale_max_batch``): a cold process."""
    bench.plat.kill("gpu", signal.SIGTERM)
    bench.plat.settings = bench.plat.settings.with_overrides(**overrides)
    bench.plat.start_worker("gpu", GPU_QUEUES, 1)


def bench_superres(bench: Bench) -> dict[str, Any]:
    import numpy as np
    import torch
    from PIL import Image
    from spandrel import ModelLoader

    from inference.superres import Upscaler, UpscaleRequest
    from tests.inference.tiny_vision import TinyCompactNet, TinyRRDBNet, save_sr_checkpoint, smooth_rgb

    dtype = torch.float16 if bench.device == "cuda" else torch.float32
    torch.manual_seed(0)
    # The RealESRGAN_x4plus and realesr-general-x4v3 architectures at their real widths and depths
    # (random weights, saved as the official files are), or the tiny test networks for --small.
    cases = [
        (
            "rrdb",
            "bench-rrdb-x4",
            TinyRRDBNet(scale=4)
            if bench.small
            else TinyRRDBNet(4, num_feat=64, num_block=23, num_grow_ch=32),
            "params_ema",
            64 if bench.small else 512,
        ),
        (
            "compact",
            "bench-compact-x4",
            TinyCompactNet(scale=4) if bench.small else TinyCompactNet(4, num_feat=64, num_conv=32),
            "params",
            96 if bench.small else 1024,
        ),
    ]
    gib = 2**30
    details: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "models": {}}

    def sync() -> None:
        if bench.device == "cuda":
            torch.cuda.synchronize()

    for arch, model_id, net, key, side in cases:
        path = save_sr_checkpoint(net, bench.models_dir / f"{model_id}.pth", key)
        bench.store.add(path, id=model_id)
        image = Image.fromarray(smooth_rgb(side, side, seed=3))
        payload = {"image_url": data_uri(image), "model": model_id, "scale": 4, "format": "png"}
        # The raw library call: spandrel's model on the whole image, PIL in and PIL out.
        raw_model = ModelLoader(bench.device).load_from_file(path).to(dtype).eval()

        def raw_call(model: Any = raw_model, picture: Any = image) -> dict[str, Any]:
            sync()
            if bench.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with torch.inference_mode():
                x = torch.from_numpy(np.array(picture)).permute(2, 0, 1)[None].to(bench.device, dtype) / 255
                y = model(x).clamp(0, 1).mul(255).round().byte()[0].permute(1, 2, 0).cpu().numpy()
            Image.fromarray(y)
            seconds = time.perf_counter() - t0
            return {
                "seconds": seconds,
                "peak_device_bytes": torch.cuda.max_memory_allocated() if bench.device == "cuda" else None,
            }

        t0 = time.monotonic()
        first = bench.job("upscale", payload)  # warm-up: the worker loads the model
        backend = first["result"]["meta"]["backend"]
        say(f"superres {arch}: first job (cold: loads the model) {time.monotonic() - t0:.1f}s, {backend}")
        raw_call()
        engine_runs, raw_runs = [], []
        for i in range(bench.repeats):
            job = bench.job("upscale", payload)
            meta = job["result"]["meta"]
            engine_runs.append({**meta["timing"], "job_s": job_seconds(job), "tiles": meta["tiles"]})
            raw_runs.append(raw_call())
            say(
                f"superres {arch} {i + 1}/{bench.repeats}: engine {engine_runs[-1]['engine_s']:.3f}s "
                f"(job {engine_runs[-1]['job_s']:.3f}s, {meta['tiles']} tiles), "
                f"raw {raw_runs[-1]['seconds']:.3f}s"
            )
        engine_s = median([r["engine_s"] for r in engine_runs])
        raw_s = median([r["seconds"] for r in raw_runs])
        job_s = median([r["job_s"] for r in engine_runs])
        overhead = ratio(engine_s, raw_s)
        label = f"{arch} x4 {side}x{side}"
        bench.row(
            "superres",
            f"{label}: engine call vs raw model, median",
            engine_s,
            raw_s,
            overhead,
            f"<= {OVERHEAD_TARGET}",
            None if overhead is None or bench.small else overhead <= OVERHEAD_TARGET,
            " s",
        )
        bench.row(
            "superres",
            f"{label}: images per second",
            None if not engine_s else round(1 / engine_s, 3),
            None if not raw_s else round(1 / raw_s, 3),
            ratio(raw_s, engine_s),
            "",
            None,
            " img/s",
        )
        bench.row(
            "superres",
            f"{label}: job started..finished vs raw",
            job_s,
            raw_s,
            ratio(job_s, raw_s),
            "",
            None,
            " s",
        )
        engine_peak = median(
            [r["peak_device_bytes"] for r in engine_runs if r["peak_device_bytes"] is not None]
        )
        raw_peak = median([r["peak_device_bytes"] for r in raw_runs if r["peak_device_bytes"] is not None])
        bench.row(
            "superres",
            f"{label}: peak GPU memory",
            None if engine_peak is None else round(engine_peak / gib, 3),
            None if raw_peak is None else round(raw_peak / gib, 3),
            ratio(engine_peak, raw_peak),
            "",
            None,
            " GiB",
        )
        details["models"][arch] = {
            "model": model_id,
            "side": side,
            "engine_timing_source": "result.meta.timing.engine_s (Upscaler call inside the worker)",
            "engine": engine_runs,
            "raw": raw_runs,
            "overhead_ratio": overhead,
        }

    # Batching: N small same-model jobs. In process, one batched call against N single calls;
    # through the worker, N jobs waiting on the queue with AIORCH_UPSCALE_MAX_BATCH=N against 1.
    count, small_side = 8, 32 if bench.small else 128
    _arch, model_id, _net, _key, _side = cases[0]
    pictures = [Image.fromarray(smooth_rgb(small_side, small_side, seed=s)) for s in range(count)]
    upscaler = Upscaler(
        bench.models_dir / f"{model_id}.pth", model_id=model_id, device=bench.device, dtype=dtype
    )
    requests = [UpscaleRequest(p, 4) for p in pictures]
    upscaler.upscale_batch(requests, max_batch=count)  # warm-up: kernels for both batch shapes
    upscaler.upscale_batch(requests, max_batch=1)
    in_process: dict[int, float] = {}
    for size in (count, 1):
        times = []
        for _ in range(max(3, bench.repeats)):
            sync()
            t0 = time.perf_counter()
            upscaler.upscale_batch(requests, max_batch=size)
            sync()
            times.append(time.perf_counter() - t0)
        in_process[size] = count / statistics.median(times)
    speedup = ratio(in_process[count], in_process[1])
    bench.row(
        "superres",
        f"batch {count} vs 1, in process ({small_side}px), img/s",
        round(in_process[count], 2),
        round(in_process[1], 2),
        speedup,
        ">= 1.5",
        None if speedup is None or bench.small else speedup >= 1.5,
        "",
    )

    small_payload = {"image_url": data_uri(pictures[0]), "model": model_id, "scale": 4, "format": "png"}
    # A job that holds the worker while the small ones are accepted and their inputs fetched.
    blocker_side = 128 if bench.small else 1024
    blocker = {
        **small_payload,
        "image_url": data_uri(Image.fromarray(smooth_rgb(blocker_side, blocker_side))),
    }
    through_worker: dict[int, dict[str, Any]] = {}
    for size in (count, 1):
        restart_gpu_worker(bench, upscale_max_batch=size)
        bench.job("upscale", small_payload)  # warm-up: the fresh worker loads the model
        held = bench.plat.submit(KEY, "upscale", blocker).json()["job_id"]
        ids = [bench.plat.submit(KEY, "upscale", small_payload).json()["job_id"] for _ in range(count)]
        bench.plat.wait(KEY, held, timeout=900)
        jobs = [bench.plat.wait(KEY, job_id, timeout=900) for job_id in ids]
        if any(j["status"] != "succeeded" for j in jobs):
            raise RuntimeError(f"batch jobs failed: {[j.get('error') for j in jobs]}")
        window = (max(j["finished_at_ms"] for j in jobs) - min(j["started_at_ms"] for j in jobs)) / 1000
        through_worker[size] = {
            "images_per_s": count / window,
            "window_s": window,
            "batch_sizes": [j["result"]["meta"].get("batch_size") for j in jobs],
        }
        sizes = through_worker[size]["batch_sizes"]
        say(f"superres batching max_batch={size}: {count} jobs in {window:.3f}s, batch sizes {sizes}")
    worker_speedup = ratio(through_worker[count]["images_per_s"], through_worker[1]["images_per_s"])
    bench.row(
        "superres",
        f"batch {count} vs 1, {count} queued jobs via worker, img/s",
        round(through_worker[count]["images_per_s"], 2),
        round(through_worker[1]["images_per_s"], 2),
        worker_speedup,
        ">= 1.5",
        None if worker_speedup is None or bench.small else worker_speedup >= 1.5,
        "",
    )
    restart_gpu_worker(bench, upscale_max_batch=Settings().upscale_max_batch)  # back to the default
    details["batching"] = {
        "jobs": count,
        "side": small_side,
        "model": model_id,
        "in_process_images_per_s": in_process,
        "through_worker": through_worker,
        "note": "through_worker window: first started_at to last finished_at of the N jobs",
    }
    return details


# -- faceswap ----------------------------------------------------------------------------------------


def bench_faceswap(bench: Bench) -> dict[str, Any]:
    """Swaps per second on a 1080p target with 1 and 4 faces: a real ``faceswap`` job (started_at
    to finished_at: decode, engine, PNG encode and store) against the same engine's ``faceswap``
    called in this process on the same images. Whichever engine the worker picks (InsightFace
    when its models are installed, else the landmark engine) is the one called raw."""
    from PIL import Image

    from inference.faceswap import LandmarkFaceSwapper, MeshFaceSwapper
    from tests.inference.face_images import astronaut, group

    side = (540, 960) if bench.small else (1080, 1920)
    k = side[0] / 1080
    targets = {
        1: group([(int(760 * k), int(240 * k), 2.4 * k)], size=side)[0],
        4: group([(int(x * k), int(380 * k), 1.3 * k) for x in (120, 560, 1000, 1440)], size=side)[0],
    }
    source = Image.fromarray(astronaut())
    source_uri = data_uri(source)
    details: dict[str, Any] = {"target": f"{side[1]}x{side[0]}", "faces": {}}
    raw_engine: Any = None
    for faces, rgb in targets.items():
        target = Image.fromarray(rgb)
        payload = {
            "source_url": source_uri,
            "target_url": data_uri(target),
            "upscale": 0,
            "max_side": max(side),
            "format": "png",
        }
        first = bench.job("faceswap", payload)  # warm-up: the worker builds its face engine
        backend = first["result"]["meta"]["backend"]
        if raw_engine is None:
            if backend.startswith("insightface"):
                raise RuntimeError("raw InsightFace comparison needs the store's model paths; not wired")
            mesh = backend.startswith("landmark-mediapipe")
            raw_engine = MeshFaceSwapper() if mesh else LandmarkFaceSwapper()
        raw_engine.faceswap(source, target, max_side=max(side))  # warm-up of the raw engine
        worker_s, raw_s = [], []
        for i in range(bench.repeats):
            worker_s.append(job_seconds(bench.job("faceswap", payload)))
            t0 = time.perf_counter()
            raw_engine.faceswap(source, target, max_side=max(side))
            raw_s.append(time.perf_counter() - t0)
            say(
                f"faceswap {faces} face(s) {i + 1}/{bench.repeats}: "
                f"job {worker_s[-1]:.3f}s raw {raw_s[-1]:.3f}s"
            )
        job_median, raw_median = median(worker_s), median(raw_s)
        overhead = ratio(job_median, raw_median)
        bench.row(
            "faceswap",
            f"{side[1]}x{side[0]}, {faces} face(s): swaps/s, job vs raw engine",
            round(faces / job_median, 2) if job_median else None,
            round(faces / raw_median, 2) if raw_median else None,
            overhead,
            "info (job time includes decode + PNG encode)",
            None,
            "",
        )
        details["faces"][faces] = {
            "backend": backend,
            "job_s": worker_s,
            "raw_s": raw_s,
            "overhead": overhead,
        }
    return details


SECTIONS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "diffusion": bench_diffusion,
    "superres": bench_superres,
    "faceswap": bench_faceswap,
}


# -- running -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        choices=sorted(SECTIONS),
        action="append",
        help="run only this section (repeatable; default: all)",
    )
    parser.add_argument(
        "--small",
        action="store_true",
        help="tiny models at tiny sizes (automatic without CUDA): a smoke run, not a measurement",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="measured runs per side and section (default 5)",
    )
    parser.add_argument("--embedded", action="store_true", help="SQLite + kombu filesystem transport")
    parser.add_argument("--database-url", help="an existing database (default: a private Postgres database)")
    parser.add_argument("--broker-url", help="an existing broker (default: a private RabbitMQ vhost)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results", help="where the JSON goes")
    return parser.parse_args(argv)


def table(rows: list[dict[str, Any]]) -> str:
    header = f"{'section':<10} {'metric':<50} {'engine':>12} {'raw':>12} {'ratio':>7} {'target':>8}  pass"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['section']:<10} {r['metric']:<50} {fmt(r['engine'], r['unit']):>12} "
            f"{fmt(r['raw'], r['unit']):>12} {fmt(r['ratio']):>7} {r['target']:>8}  {verdict(r['pass'])}"
        )
    return "\n".join(lines)


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = args.small or device == "cpu"
    smoke_note = None
    if device == "cpu":
        smoke_note = (
            "NO CUDA: tiny models on the CPU (--small). These are CPU smoke numbers that show "
            "the benchmark runs end to end; they are NOT GPU measurements."
        )
    elif small:
        smoke_note = "--small: tiny models at tiny sizes; a smoke run, not a measurement."
    if smoke_note:
        say(smoke_note)
    names = args.only or list(SECTIONS)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_id = uuid.uuid4().hex[:10]
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "revision": git_revision(),
        "device": device,
        "device_name": torch.cuda.get_device_name(0)
        if device == "cuda"
        else host_platform.processor() or "cpu",
        "small": small,
        "smoke_only": smoke_note is not None,
        "note": smoke_note,
        "host": {
            "cpus": os.cpu_count(),
            "python": host_platform.python_version(),
            "torch": torch.__version__,
            "loadavg_start": os.getloadavg(),
        },
        "sections": {},
    }
    status = 1
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aiorch-bench-gpu-")))
        var = tmp / "var"
        database_url, broker_url = args.database_url, args.broker_url
        if not args.embedded:
            try:
                if not database_url:
                    database_url = stack.enter_context(infra.private_database(f"aiorch_bench_gpu_{run_id}"))
                if not broker_url:
                    broker_url = stack.enter_context(infra.private_vhost(f"aiorch_bench_gpu_{run_id}"))
            except Exception as exc:  # noqa: BLE001 (no Postgres/RabbitMQ here: the embedded default runs)
                say(f"no private Postgres/RabbitMQ ({type(exc).__name__}): using the embedded default")
                database_url = broker_url = None
        port = free_port()
        settings = bench_settings(var, port, database_url, broker_url).with_overrides(
            models_dir=tmp / "models"
        )
        var.mkdir(parents=True)
        settings.models_dir.mkdir(parents=True)
        results["database"], results["broker"] = redact(settings.database_url), redact(settings.broker_url)
        db = Database(settings)
        stack.callback(db.dispose)
        upgrade(db)
        plat = Platform(settings, tmp / "logs")
        stack.callback(plat.stop)
        bench = Bench(plat, ModelStore(settings.models_dir), device, small, args.repeats or 5)
        try:
            plat.start_api()
            plat.start_workers()
            say(f"API on {plat.base_url}, cpu and gpu workers ready; sections: {', '.join(names)}")
            failed = []
            for name in names:
                try:
                    results["sections"][name] = SECTIONS[name](bench)
                except Exception as exc:  # noqa: BLE001 (one broken section must not cost the others)
                    failed.append(name)
                    results["sections"][name] = {"error": f"{type(exc).__name__}: {exc}"}
                    say(f"section {name} failed: {type(exc).__name__}: {exc}")
                    print(f"--- gpu worker log (tail) ---\n{plat.log('gpu')[-1500:]}", file=sys.stderr)
                finally:
                    # What a section loaded in this process must not count in the next one's memory.
                    gc.collect()
                    if device == "cuda":
                        torch.cuda.empty_cache()
            if failed:
                results["error"] = f"sections failed: {', '.join(failed)}"
            status = 1 if failed else 0
        except BaseException as exc:
            results["error"] = f"{type(exc).__name__}: {exc}"
            for name in ("api", "cpu", "gpu"):
                tail = plat.log(name)
                if tail:
                    print(f"--- {name} log (tail) ---\n{tail[-1500:]}", file=sys.stderr)
            if not isinstance(exc, Exception):
                raise
        finally:
            results["host"]["loadavg_end"] = os.getloadavg()
            results["table"] = bench.rows
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / f"bench-gpu-{stamp}.json"
            path.write_text(json.dumps(results, indent=2, default=str) + "\n")
            print()
            print(
                f"aiorch bench-gpu  device={results['device_name']} ({device})  db={results['database']}  "
                f"broker={results['broker']}  rev={results['revision']}"
            )
            if smoke_note:
                print(f"*** {smoke_note} ***")
            print(table(bench.rows))
            if "error" in results:
                print(f"\nERROR: {results['error']}")
            print(f"\nwrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
