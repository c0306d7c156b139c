"""``make bench-gpu``, section controlnet: ``generate`` with one canny ControlNet on the SD 1.5-shaped
pipeline of section diffusion (``gpu_diffusion.sd15_model``), a ControlNet made from its UNet
(``ControlNetModel.from_unet``: SD 1.5's ControlNet shape, conditioning embedding included), random
weights, 512x512, 20 steps, fp16 on CUDA; the tests' tiny pipeline and ControlNet at 64x64, 4
steps for ``--small``. The control image comes from a real photo (skimage's astronaut).

(a) a ``generate`` job with ``controlnets: [{"type": "canny", ...}]`` through the API and the gpu
    worker: the engine's own pipeline-call time (``result.meta.timing.pipeline_s``: the
    ControlNet pipeline the engine derives from the loaded base with ``from_pipe``), against
(b) ``StableDiffusionControlNetPipeline`` loaded here from the same folders, same dtype,
    scheduler, seed (CPU generator), size, steps, guidance and ControlNet keywords, called with
    the same Canny map the engine makes (``control_images.canny_map``), its image encoded as the
    job's is. The raw side's ``encode_s`` holds its Canny map too: the one piece of work besides
    the pipeline call that the job also does (ratio (b) compares the job's time with it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.gpu_diffusion import generate_case, sd15_model
from bench.gpu_session import Bench, data_uri
from bench.run import say


def controlnet_model(bench: Bench, base_folder: Path) -> tuple[str, Path]:
    """A canny ControlNet for the run's base model, saved and registered in the bench's store."""
    import torch

    from tests.inference.tiny_controlnet import save_tiny_controlnet

    model_id = "bench-controlnet-canny-small" if bench.small else "bench-controlnet-canny"

    def save(folder: Path) -> None:
        if bench.small:
            save_tiny_controlnet(folder)  # fits save_tiny_sd's UNet (seed 0), as sd15_model saves it
            return
        from diffusers import ControlNetModel, UNet2DConditionModel

        dtype = torch.float16 if bench.device == "cuda" else torch.float32
        unet: Any = UNet2DConditionModel.from_pretrained(str(base_folder / "unet"), dtype=dtype)
        controlnet: Any = ControlNetModel.from_unet(unet.to(bench.device))
        controlnet.to(dtype).save_pretrained(str(folder))
        del unet, controlnet
        if bench.device == "cuda":
            torch.cuda.empty_cache()

    described = f"random-weight ControlNet {model_id}"
    return bench.saved_model(model_id, save, "controlnet", described, control_type="canny")


def bench_controlnet(bench: Bench) -> dict[str, Any]:
    import torch
    import transformers
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from diffusers.utils import logging as diffusers_logging
    from PIL import Image
    from skimage import data

    from inference.diffusion.control_images import canny_map

    bench.fresh_start()
    side, steps, cfg = (64, 4, 7.0) if bench.small else (512, 20, 7.0)
    dtype = torch.float16 if bench.device == "cuda" else torch.float32
    base_id, base_folder = sd15_model(bench, "controlnet")
    controlnet_id, controlnet_folder = controlnet_model(bench, base_folder)
    say(
        f"controlnet: {side}x{side}, {steps} steps, one canny ControlNet, {str(dtype).removeprefix('torch.')}"
    )

    photo = Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.LANCZOS)
    prompt = "a photo of an astronaut"
    payload = {
        "prompt": prompt,
        "model": base_id,
        "width": side,
        "height": side,
        "steps": steps,
        "cfg_scale": cfg,
        "controlnets": [{"type": "canny", "image_url": data_uri(photo), "model": controlnet_id}],
    }

    diffusers_logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    raw_controlnet = ControlNetModel.from_pretrained(
        str(controlnet_folder), dtype=dtype, local_files_only=True
    )
    raw_pipe: Any = StableDiffusionControlNetPipeline.from_pretrained(
        str(base_folder), controlnet=raw_controlnet, dtype=dtype, local_files_only=True
    )
    raw_pipe.to(bench.device)
    raw_pipe.set_progress_bar_config(disable=True)

    def raw_call(i: int) -> dict[str, Any]:
        counted = 0

        def count(_p: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            nonlocal counted
            counted += 1
            return kwargs

        t0 = time.perf_counter()
        control = canny_map(photo, (side, side))
        prep_s = time.perf_counter() - t0
        bench.reset_peak()
        t0 = time.perf_counter()
        # The engine's call, keyword for keyword (inference/diffusion: text2img, one sample, one
        # ControlNet at scale 1 over all steps).
        out = raw_pipe(
            prompt=prompt,
            negative_prompt=None,
            num_inference_steps=steps,
            guidance_scale=cfg,
            width=side,
            height=side,
            image=control,
            controlnet_conditioning_scale=1.0,
            control_guidance_start=0.0,
            control_guidance_end=1.0,
            num_images_per_prompt=1,
            generator=[torch.Generator("cpu").manual_seed(100 + i)],
            callback_on_step_end=count,
            output_type="pil",
        )
        seconds = time.perf_counter() - t0  # a PIL image is on the host: the device is done
        peak = bench.peak()
        return {
            "call_s": seconds,
            "encode_s": prep_s + bench.encode(out.images[0]),
            "prep_s": prep_s,
            "steps": counted,
            "it_per_s": counted / seconds,
            "peak_device_bytes": peak,
        }

    def ran_its_controlnet(meta: dict[str, Any]) -> None:
        if [c["model"] for c in meta.get("controlnets", [])] != [controlnet_id]:
            raise RuntimeError(f"the job ran without its ControlNet: {meta}")

    label = f"{side}x{side} {steps} steps, 1 ControlNet"
    jobs, raws, judged = generate_case(bench, "controlnet", label, payload, raw_call, ran_its_controlnet)
    return {
        "model": base_id,
        "controlnet": controlnet_id,
        "shape": "tiny (tests/inference/tiny_*.py)"
        if bench.small
        else "SD 1.5 + its ControlNet (random weights)",
        "width": side,
        "height": side,
        "steps": steps,
        "cfg_scale": cfg,
        "dtype": str(dtype).removeprefix("torch."),
        "engine_timing_source": "result.meta.timing.pipeline_s (ControlNet pipeline call inside the worker)",
        "job_timing_source": "job started_at_ms..finished_at_ms",
        "raw_timing_source": (
            "StableDiffusionControlNetPipeline call here (call_s) + Canny map and encode_image (encode_s)"
        ),
        "engine": jobs,
        "raw": raws,
        **judged,
    }
