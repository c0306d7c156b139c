"""``make bench-gpu``, section diffusion: an SD 1.5-shaped pipeline (UNet 320/640/1280/1280 with
768-wide cross attention, the SD 1.5 CLIP ViT-L text encoder and VAE, random weights), 512x512,
20 steps, fp16 on CUDA; a tiny pipeline at 64x64, 4 steps for ``--small``.

(a) a ``generate`` job through the API and the gpu worker: the engine's own pipeline-call time
    (``result.meta.timing.pipeline_s``, steps counted by the step callback, the worker's peak
    ``max_memory_allocated``) and the job's ``started_at..finished_at`` (adds claiming, payload
    checks, finding or building the task's pipeline, the output encode, storage and the final
    database write).
(b) ``StableDiffusionPipeline`` from the same folder, same dtype, scheduler, seed (CPU generator),
    size, steps and guidance, called in this process, then its image encoded as the job's is.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from bench.gpu_session import Bench, interleave, job_seconds, judge_case, ratio
from bench.run import say


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
        # Any: diffusers' ModelMixin and DiffusionPipeline methods are invisible to mypy.
        unet: Any = UNet2DConditionModel(
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
        vae: Any = AutoencoderKL(
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
    pipe: Any = StableDiffusionPipeline(
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


def sd15_model(bench: Bench, section: str) -> tuple[str, Path]:
    """The run's random-weight SD model, saved and registered in the bench's model store by the
    first section that asks for it (diffusion, training): SD 1.5-shaped in ``save_sd15_shaped``'s
    dtype (fp16 on CUDA), or the tests' tiny one for ``--small``. Returns its id and folder."""
    import torch

    from tests.inference.tiny_diffusion import save_tiny_sd

    model_id = "bench-sd15-small" if bench.small else "bench-sd15"
    dtype = torch.float16 if bench.device == "cuda" else torch.float32

    def save(folder: Path) -> None:
        if bench.small:
            save_tiny_sd(folder)
        else:
            save_sd15_shaped(folder, device=bench.device, dtype=dtype)

    shape = "tiny" if bench.small else "SD 1.5-shaped"
    described = f"{shape} random-weight model {model_id} ({str(dtype).removeprefix('torch.')})"
    return bench.saved_model(model_id, save, section, described)


def bench_diffusion(bench: Bench) -> dict[str, Any]:
    import torch
    import transformers
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    bench.fresh_start()
    side, steps, cfg = (64, 4, 7.0) if bench.small else (512, 20, 7.0)
    dtype = torch.float16 if bench.device == "cuda" else torch.float32
    model_id, folder = sd15_model(bench, "diffusion")
    say(f"diffusion: {side}x{side}, {steps} steps, {str(dtype).removeprefix('torch.')} on {bench.device}")

    prompt = "a photo of a cat"
    payload = {
        "prompt": prompt,
        "model": model_id,
        "width": side,
        "height": side,
        "steps": steps,
        "cfg_scale": cfg,
    }

    diffusers_logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    raw_pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    raw_pipe.to(bench.device)
    raw_pipe.set_progress_bar_config(disable=True)

    def raw_call(i: int) -> dict[str, Any]:
        counted = 0

        def count(_p: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            nonlocal counted
            counted += 1
            return kwargs

        bench.reset_peak()
        t0 = time.perf_counter()
        # The engine's call, keyword for keyword (inference/diffusion, text2img, one sample).
        out = raw_pipe(
            prompt=prompt,
            negative_prompt=None,
            num_inference_steps=steps,
            guidance_scale=cfg,
            width=side,
            height=side,
            num_images_per_prompt=1,
            generator=[torch.Generator("cpu").manual_seed(100 + i)],
            callback_on_step_end=count,
            output_type="pil",
        )
        seconds = time.perf_counter() - t0  # a PIL image is on the host: the device is done
        peak = bench.peak()
        return {
            "call_s": seconds,
            "encode_s": bench.encode(out.images[0]),
            "steps": counted,
            "it_per_s": counted / seconds,
            "peak_device_bytes": peak,
        }

    label = f"{side}x{side} {steps} steps"
    jobs, raws, judged = generate_case(bench, "diffusion", label, payload, raw_call)
    return {
        "model": model_id,
        "shape": "tiny (tests/inference/tiny_diffusion.py)" if bench.small else "SD 1.5 (random weights)",
        "width": side,
        "height": side,
        "steps": steps,
        "cfg_scale": cfg,
        "dtype": str(dtype).removeprefix("torch."),
        "engine_timing_source": "result.meta.timing.pipeline_s (diffusers pipeline call inside the worker)",
        "job_timing_source": "job started_at_ms..finished_at_ms",
        "raw_timing_source": "StableDiffusionPipeline call here (call_s) + encode_image (encode_s)",
        "engine": jobs,
        "raw": raws,
        **judged,
    }


def generate_case(
    bench: Bench,
    section: str,
    label: str,
    payload: dict[str, Any],
    raw_call: Any,
    check: Any = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """One ``generate`` case of a section: a warm-up of each side (not measured: the worker imports
    torch and loads its models, both sides pick their kernels), then the jobs (seeds 100+i) and
    ``raw_call`` interleaved, judged, and their iterations per second in a row. ``check(meta)``
    raises when a job did not run what the case measures."""

    def job_call(i: int) -> dict[str, Any]:
        job = bench.job("generate", {**payload, "seed": 100 + i})
        meta = job["result"]["meta"]
        if check is not None:
            check(meta)
        timing = meta["timing"]
        return {
            **timing,
            "engine_s": timing["pipeline_s"],
            "job_s": job_seconds(job),
            "job_id": job["job_id"],
        }

    t0 = time.monotonic()
    first = bench.job("generate", {**payload, "seed": 1})["result"]["meta"]
    cold = time.monotonic() - t0
    say(f"{section}: first job (cold worker: import, load) {cold:.1f}s, backend {first['backend']}")
    raw_call(-99)
    jobs, raws = interleave(bench, f"{section} {label}", job_call, raw_call)
    judged = judge_case(bench, section, label, jobs, raws)
    engine_ips = [j["it_per_s"] for j in jobs if j.get("it_per_s")]
    median_engine_ips = statistics.median(engine_ips) if engine_ips else None
    median_raw_ips = statistics.median(r["it_per_s"] for r in raws)
    bench.row(
        section,
        f"{label}: iterations per second, median",
        None if median_engine_ips is None else round(median_engine_ips, 2),
        round(median_raw_ips, 2),
        ratio(median_engine_ips, median_raw_ips),
        unit=" it/s",
    )
    return jobs, raws, judged
