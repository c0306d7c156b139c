"""``make bench-gpu``, section superres: RealESRGAN_x4plus-shaped RRDB x4 on 512x512 and
realesr-general-x4v3-shaped compact x4 on 1024x1024 (random weights, official file layout), fp16 on
CUDA; the tiny test networks at 64 and 96 px for ``--small``.

Each model is a case of its own, started clean (``Bench.fresh_start``):
(a) an ``upscale`` job (scale 4) through the worker: the Upscaler call's own time and peak memory
    (``result.meta.timing``; it tiles at 512 px with 32 px overlap, so the compact case pays for
    the overlap) and the job's ``started_at..finished_at`` (adds decoding the input, the output
    encode, storage and the database);
(b) the spandrel model called on the whole image in this process, PIL in and PIL out, then the
    output encoded as the job's is.

Then batching: 8 small (128x128) RRDB jobs, in process (``upscale_batch`` with max_batch 8 vs 1)
and through the worker (8 jobs queued behind a long one, AIORCH_UPSCALE_MAX_BATCH 8 vs 1; first
start to last finish); target >= 1.5x.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.gpu_session import Bench, data_uri, interleave, job_seconds, judge_case, ratio
from bench.run import KEY, say

BATCH_TARGET = 1.5


def bench_superres(bench: Bench) -> dict[str, Any]:
    import torch

    from tests.inference.tiny_vision import TinyCompactNet, TinyRRDBNet

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
    details: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "models": {}}
    for arch, model_id, net, key, side in cases:
        details["models"][arch] = overhead_case(bench, arch, model_id, net, key, side, dtype)
    details["batching"] = batching(bench, cases[0][1], dtype)
    return details


def overhead_case(
    bench: Bench, arch: str, model_id: str, net: Any, key: str, side: int, dtype: Any
) -> dict[str, Any]:
    """One model: the upscale job against spandrel's model on the whole image, both ratios."""
    import numpy as np
    import torch
    from PIL import Image
    from spandrel import ModelLoader

    from tests.inference.tiny_vision import save_sr_checkpoint, smooth_rgb

    bench.fresh_start()
    path = save_sr_checkpoint(net, bench.models_dir / f"{model_id}.pth", key)
    bench.store.add(path, id=model_id)
    image = Image.fromarray(smooth_rgb(side, side, seed=3))
    payload = {"image_url": data_uri(image), "model": model_id, "scale": 4}
    # The raw library call: spandrel's model on the whole image, PIL in and PIL out. On CUDA with
    # the same channels_last layout and cuDNN autotuning the engine uses, so ratio (a) compares
    # the platform's work around the network, not two kernel choices.
    raw_model = ModelLoader(bench.device).load_from_file(path).to(dtype).eval()
    cuda = str(bench.device).startswith("cuda")
    if cuda:
        raw_model = raw_model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    layout = torch.channels_last if cuda else torch.contiguous_format

    def raw_call(_i: int) -> dict[str, Any]:
        bench.reset_peak()
        t0 = time.perf_counter()
        with torch.inference_mode():
            x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].to(bench.device, dtype) / 255
            x = x.contiguous(memory_format=layout)
            y = raw_model(x).clamp(0, 1).mul(255).round().byte()[0].permute(1, 2, 0).cpu().numpy()
        out = Image.fromarray(y)
        seconds = time.perf_counter() - t0  # .cpu() waited for the device
        peak = bench.peak()
        return {"call_s": seconds, "encode_s": bench.encode(out), "peak_device_bytes": peak}

    def job_call(_i: int) -> dict[str, Any]:
        job = bench.job("upscale", payload)
        meta = job["result"]["meta"]
        return {**meta["timing"], "job_s": job_seconds(job), "tiles": meta["tiles"], "job_id": job["job_id"]}

    t0 = time.monotonic()
    first = bench.job("upscale", payload)  # warm-up: the worker loads the model
    backend = first["result"]["meta"]["backend"]
    say(f"superres {arch}: first job (cold: loads the model) {time.monotonic() - t0:.1f}s, {backend}")
    raw_call(-1)
    label = f"{arch} x4 {side}x{side}"
    jobs, raws = interleave(bench, f"superres {label}", job_call, raw_call)
    judged = judge_case(bench, "superres", label, jobs, raws)
    engine_s = statistics.median(j["engine_s"] for j in jobs)
    raw_s = statistics.median(r["call_s"] for r in raws)
    bench.row(
        "superres",
        f"{label}: images per second, median",
        round(1 / engine_s, 3),
        round(1 / raw_s, 3),
        ratio(raw_s, engine_s),
        unit=" img/s",
    )
    return {
        "model": model_id,
        "side": side,
        "backend": backend,
        "engine_timing_source": "result.meta.timing.engine_s (Upscaler call inside the worker)",
        "raw_timing_source": "spandrel model on the whole image here (call_s) + encode_image (encode_s)",
        "engine": jobs,
        "raw": raws,
        **judged,
    }


def batching(bench: Bench, model_id: str, dtype: Any) -> dict[str, Any]:
    """N small same-model jobs. In process, one batched call against N single calls; through the
    worker, N jobs waiting on the queue with AIORCH_UPSCALE_MAX_BATCH=N against 1."""
    from PIL import Image

    from inference.superres import Upscaler, UpscaleRequest
    from tests.inference.tiny_vision import smooth_rgb

    bench.fresh_start()
    default_max_batch = bench.plat.settings.upscale_max_batch
    count, small_side = 8, 32 if bench.small else 128
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
            bench.sync()
            t0 = time.perf_counter()
            upscaler.upscale_batch(requests, max_batch=size)
            bench.sync()
            times.append(time.perf_counter() - t0)
        in_process[size] = count / statistics.median(times)
    del upscaler
    speedup = ratio(in_process[count], in_process[1])
    bench.row(
        "superres",
        f"batch {count} vs 1, in process ({small_side}px), img/s",
        round(in_process[count], 2),
        round(in_process[1], 2),
        speedup,
        f">= {BATCH_TARGET}",
        None if speedup is None or bench.small else speedup >= BATCH_TARGET,
    )

    small_payload = {"image_url": data_uri(pictures[0]), "model": model_id, "scale": 4, "format": bench.fmt}
    # A job that holds the worker while the small ones are accepted and their inputs fetched.
    blocker_side = 128 if bench.small else 1024
    blocker = {
        **small_payload,
        "image_url": data_uri(Image.fromarray(smooth_rgb(blocker_side, blocker_side))),
    }
    through_worker: dict[int, dict[str, Any]] = {}
    for size in (count, 1):
        bench.restart_gpu_worker(upscale_max_batch=size)
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
        f">= {BATCH_TARGET}",
        None if worker_speedup is None or bench.small else worker_speedup >= BATCH_TARGET,
    )
    bench.restart_gpu_worker(upscale_max_batch=default_max_batch)  # back to the run's setting
    return {
        "jobs": count,
        "side": small_side,
        "model": model_id,
        "in_process_images_per_s": in_process,
        "through_worker": through_worker,
        "note": "through_worker window: first started_at to last finished_at of the N jobs",
    }
