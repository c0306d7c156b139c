"""Diffusion engines: ``generate`` (txt2img, img2img), ``inpaint``, ``remove_object``, ``outpaint``.

All four run on diffusers pipelines loaded from a local folder listed in the model store (SD 1.5,
SD 2.x and SDXL layouts). One base pipeline is loaded per model and kept in the ``ModelCache``;
each run derives the task's pipeline from it with ``AutoPipelineFor*.from_pipe``, which shares
the loaded modules, so switching between tasks never reloads weights.

Every engine validates all of its inputs before the model is loaded or the GPU touched, and
raises ``InvalidInput`` naming the field. Pixels the caller did not ask to change are copied
back from the input after generation (inpaint, remove_object, outpaint), so they stay identical
to the input byte for byte, whatever the VAE round trip did to them.

Samples use seed, seed+1, ... each from its own generator, so output ``i`` of a run is the
same image as a one-sample run with ``seed + i``: a caller can reproduce any single output.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageChops, ImageFilter

from config import limits
from inference.base import (
    Cancelled,
    ContentRejected,
    EngineError,
    EngineResult,
    InvalidInput,
    NullControl,
    OutputImage,
    RunControl,
    check_stop,
)
from inference.model_cache import ModelCache, estimate_checkpoint_bytes
from inference.model_store import ModelEntry, ModelNotFound, ModelStore

ENGINE = "diffusers"
# The API's payload schemas check the same numbers (config/limits.py), so what the API accepts
# the engine runs.
MAX_PROMPT_CHARS = limits.DIFFUSION_MAX_PROMPT_CHARS
MAX_SAMPLES = limits.DIFFUSION_MAX_SAMPLES
MAX_STEPS = limits.DIFFUSION_MAX_STEPS
MAX_LORAS = limits.DIFFUSION_MAX_LORAS
MAX_SEED = limits.DIFFUSION_MAX_SEED
MIN_SIDE = limits.DIFFUSION_MIN_SIDE
MAX_INPUT_SIDE = 6000  # the seeds' largest accepted input and output side
MASK_MODES = ("white", "black")

# The scheduler names callers may pass, mapped to diffusers classes and their options. Each run
# builds a fresh scheduler from the model's own scheduler config, so a model's betas and
# prediction type carry over and the shared base pipeline's scheduler is never mutated.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

# Where the original image sits on the outpaint canvas, as fractions of the free space to its
# left and above it. The aliases take the SenseTime seed's spellings too.
ALIGNS: dict[str, tuple[float, float]] = {
    "topleft": (0.0, 0.0),
    "top": (0.5, 0.0),
    "topright": (1.0, 0.0),
    "left": (0.0, 0.5),
    "middle": (0.5, 0.5),
    "right": (1.0, 0.5),
    "bottomleft": (0.0, 1.0),
    "bottom": (0.5, 1.0),
    "bottomright": (1.0, 1.0),
}
assert tuple(ALIGNS) == limits.OUTPAINT_ALIGNS
_ALIGN_ALIASES = limits.OUTPAINT_ALIGN_ALIASES

REMOVE_PROMPT = "clean empty background, seamless, natural continuation of the surroundings"
REMOVE_NEGATIVE = "object, person, animal, text, watermark, logo, frame, artifacts, blurry"


# -- the shared model layer ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What the engines need to know about a diffusers folder before loading it."""

    base_model_type: str
    native_side: int  # the side the model was trained at (512 for SD 1.5, 1024 for SDXL)
    in_channels: int  # 9 for inpainting UNets
    variant: str | None

    @property
    def max_side(self) -> int:
        # Three times the training size: beyond that SD models tile their subject and the
        # memory of one step grows past what a worker budgets for. Never above the API's limit.
        return min(self.native_side * 3, limits.DIFFUSION_MAX_SIDE)

    @property
    def work_side(self) -> int:
        # Inpaint/outpaint run at up to 1.5x the training size and are scaled back up after.
        return _round8(self.native_side * 3 // 2)


@dataclass
class LoadedPipeline:
    """A loaded base pipeline with what runs on it must share: a lock (LoRA adapters and VAE
    tiling are switched on the shared modules, so runs on one pipeline go one at a time) and
    the LoRA adapters already loaded into it."""

    model_id: str
    pipe: Any
    info: ModelInfo
    lock: threading.Lock = field(default_factory=threading.Lock)
    adapters: dict[str, str] = field(default_factory=dict)  # lora model id -> adapter name


@dataclass(frozen=True)
class _Lora:
    entry: ModelEntry
    file: Path
    weight: float


class DiffusionModels:
    """Resolves models in the store, loads them into the cache and runs a pipeline call.

    One instance per worker process, shared by the four engines. ``device`` defaults to CUDA when
    there is one; ``dtype`` to float16 on CUDA (half the memory, the speed of tensor cores) and
    float32 on CPU (where half precision is slow and some kernels are missing).
    """

    def __init__(
        self,
        store: ModelStore,
        cache: ModelCache,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        default_model: str | None = None,
        max_batch: int = 4,
        attention_slicing: bool = False,
        vae_tiling_pixels: int = 1536 * 1536,
        max_loaded_loras: int = 8,
    ):
        self.store = store
        self.cache = cache
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.default_model = default_model
        self.max_batch = max_batch
        # PyTorch's fused attention is already memory-lean and slicing slows it down, so slicing
        # is only for cards too small for the model otherwise.
        self.attention_slicing = attention_slicing
        # Above this many output pixels the VAE decodes tile by tile on CUDA: the full-frame
        # decode of a large image is the peak of a whole run.
        self.vae_tiling_pixels = vae_tiling_pixels
        self.max_loaded_loras = max_loaded_loras
        self._timing = threading.local()

    def timing(self) -> dict[str, Any]:
        """The last ``run`` of this thread: pipeline seconds, steps, it/s, peak device memory."""
        return dict(getattr(self._timing, "value", None) or {})

    # -- resolving (no weights touched) ------------------------------------------------------

    def resolve(self, model: str | None, task: str) -> tuple[ModelEntry, ModelInfo]:
        if model is None:
            model = self.default_model
        if model is None:
            candidates = self.store.list(type="diffusers", task=task)
            if not candidates:
                raise InvalidInput(f"no diffusers model for {task!r} is installed", field="model")
            # With no model named, a dedicated inpainting model (9-channel UNet) is the better
            # painter for the mask tasks, and a text-to-image model is the only one for generate.
            dedicated = task != "generate"
            candidates.sort(key=lambda e: (e.extra.get("unet_in_channels") != 9 if dedicated else 0, e.id))
            entry = candidates[0]
        else:
            if not isinstance(model, str):
                raise InvalidInput("model must be a model id string", field="model")
            try:
                entry = self.store.get(model)
            except ModelNotFound:
                raise InvalidInput(f"unknown model {model!r}", field="model") from None
        if entry.type != "diffusers":
            raise InvalidInput(
                f"model {entry.id!r} is a {entry.type} model, not a diffusion pipeline", field="model"
            )
        if task not in entry.tasks:
            raise InvalidInput(
                f"model {entry.id!r} does not serve {task!r} (it serves "
                f"{', '.join(entry.tasks) or 'nothing'})",
                field="model",
            )
        return entry, _model_info(str(self.store.resolve_path(entry)))

    def resolve_loras(self, loras: Any, base_model_type: str) -> list[_Lora]:
        if loras is None:
            return []
        if not isinstance(loras, (list, tuple)):
            raise InvalidInput("loras must be a list of {model, weight}", field="loras")
        if len(loras) > MAX_LORAS:
            raise InvalidInput(f"at most {MAX_LORAS} loras, got {len(loras)}", field="loras")
        resolved: list[_Lora] = []
        for i, item in enumerate(loras):
            where = f"loras[{i}]"
            if not isinstance(item, dict) or not isinstance(item.get("model"), str):
                raise InvalidInput(f"{where} must be an object with a 'model' id", field=where)
            weight = _number(
                f"{where}.weight",
                item.get("weight", 1.0),
                0.0,
                limits.DIFFUSION_MAX_LORA_WEIGHT,
                low_open=True,
            )
            try:
                entry = self.store.get(item["model"])
            except ModelNotFound:
                raise InvalidInput(f"unknown lora {item['model']!r}", field=f"{where}.model") from None
            if entry.type != "lora":
                raise InvalidInput(f"{entry.id!r} is not a lora", field=f"{where}.model")
            if entry.base_model_type and entry.base_model_type != base_model_type:
                raise InvalidInput(
                    f"lora {entry.id!r} is for {entry.base_model_type}, the model is {base_model_type}",
                    field=f"{where}.model",
                )
            if any(r.entry.id == entry.id for r in resolved):
                raise InvalidInput(f"lora {entry.id!r} is listed twice", field=f"{where}.model")
            resolved.append(_Lora(entry, _lora_file(self.store.resolve_path(entry)), weight))
        return resolved

    # -- loading -----------------------------------------------------------------------------

    def cache_key(self, entry: ModelEntry) -> str:
        return f"{ENGINE}:{entry.id}:{self.device}:{str(self.dtype).removeprefix('torch.')}"

    @contextlib.contextmanager
    def hold(self, entry: ModelEntry, info: ModelInfo) -> Iterator[LoadedPipeline]:
        """The loaded base pipeline for ``entry``, held in the cache (not evictable) while used."""
        path = self.store.resolve_path(entry)
        itemsize = torch.finfo(self.dtype).bits // 8
        estimate = estimate_checkpoint_bytes(path, itemsize=itemsize, variant=info.variant)
        with self.cache.hold(
            self.cache_key(entry), lambda: self._load(entry, info, path), estimate, device=str(self.device)
        ) as loaded:
            yield loaded

    def _load(self, entry: ModelEntry, info: ModelInfo, path: Path) -> LoadedPipeline:
        import transformers
        from diffusers import AutoPipelineForInpainting, AutoPipelineForText2Image
        from diffusers.utils import logging as diffusers_logging

        # Loading bars would land in the worker's log on every load, as noise between job lines.
        diffusers_logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

        # An inpainting UNet (9 input channels) cannot be wrapped in a text-to-image pipeline.
        cls = AutoPipelineForInpainting if info.in_channels == 9 else AutoPipelineForText2Image
        pipe = cls.from_pretrained(str(path), dtype=self.dtype, local_files_only=True, variant=info.variant)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        if self.device.type == "cuda" and self.attention_slicing:
            pipe.enable_attention_slicing()
        return LoadedPipeline(model_id=entry.id, pipe=pipe, info=info)

    # -- running -----------------------------------------------------------------------------

    def run(
        self,
        entry: ModelEntry,
        info: ModelInfo,
        kind: str,
        call: dict[str, Any],
        *,
        pixels: int,
        seeds: list[int],
        scheduler: str | None,
        loras: list[_Lora],
        control: RunControl,
    ) -> list[Image.Image]:
        """Run ``kind`` ("text2img", "img2img" or "inpaint") once per seed, in batches.

        ``timing()`` then tells, for this thread, how long the pipeline calls took, how many
        denoising steps ran and the device's peak memory: the engine's own numbers, which the
        GPU benchmark compares with a bare diffusers call."""
        check_stop(control)
        self._timing.value = {}
        try:
            with self.hold(entry, info) as loaded, loaded.lock:
                control.progress(5)
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                pipe = self._task_pipeline(loaded, kind, scheduler)
                self._apply_loras(loaded, loras)
                self._set_vae_tiling(loaded, pixels)
                return self._denoise(pipe, call, seeds, control)
        except torch.OutOfMemoryError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else "out of memory"
        # Only an out-of-memory error gets here. Memory is freed outside the except block: until
        # it ends, the traceback pins the frames whose tensors filled the card. The job fails
        # with its own code and the worker, its cache emptied, takes the next job.
        self.cache.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        raise EngineError(f"the device ran out of memory: {reason}", code="out_of_memory")

    def _task_pipeline(self, loaded: LoadedPipeline, kind: str, scheduler: str | None) -> Any:
        import diffusers
        from diffusers import (
            AutoPipelineForImage2Image,
            AutoPipelineForInpainting,
            AutoPipelineForText2Image,
        )

        base = loaded.pipe
        if scheduler is None:
            sched = type(base.scheduler).from_config(base.scheduler.config)
        else:
            cls_name, options = SCHEDULERS[scheduler]
            sched = getattr(diffusers, cls_name).from_config(base.scheduler.config, **options)
        auto = {
            "text2img": AutoPipelineForText2Image,
            "img2img": AutoPipelineForImage2Image,
            "inpaint": AutoPipelineForInpainting,
        }[kind]
        # from_pipe shares every module of the base pipeline (no copy, no reload); only the
        # scheduler, which keeps per-run state, is new.
        pipe = auto.from_pipe(base, scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _apply_loras(self, loaded: LoadedPipeline, loras: list[_Lora]) -> None:
        base = loaded.pipe
        for lora in loras:
            if lora.entry.id in loaded.adapters:
                continue
            self._forget_unused_adapters(loaded, keep={x.entry.id for x in loras})
            adapter = "lora_" + re.sub(r"\W", "_", lora.entry.id)
            try:
                base.load_lora_weights(
                    str(lora.file.parent),
                    weight_name=lora.file.name,
                    adapter_name=adapter,
                    local_files_only=True,
                )
            except (ValueError, RuntimeError, KeyError) as exc:
                raise InvalidInput(
                    f"lora {lora.entry.id!r} does not fit model {loaded.model_id!r}: {exc}", field="loras"
                ) from exc
            loaded.adapters[lora.entry.id] = adapter
        if loras:
            base.enable_lora()
            base.set_adapters(
                [loaded.adapters[x.entry.id] for x in loras], adapter_weights=[x.weight for x in loras]
            )
        elif loaded.adapters:
            # Adapters stay loaded for the next job that names them, but must not touch this one.
            base.disable_lora()

    def _forget_unused_adapters(self, loaded: LoadedPipeline, keep: set[str]) -> None:
        while len(loaded.adapters) >= self.max_loaded_loras:
            victim = next((k for k in loaded.adapters if k not in keep), None)
            if victim is None:
                return
            loaded.pipe.delete_adapters(loaded.adapters.pop(victim))

    def _set_vae_tiling(self, loaded: LoadedPipeline, pixels: int) -> None:
        vae = loaded.pipe.vae
        if self.device.type == "cuda" and pixels > self.vae_tiling_pixels:
            vae.enable_tiling()
        else:
            vae.disable_tiling()

    def _denoise(
        self, pipe: Any, call: dict[str, Any], seeds: list[int], control: RunControl
    ) -> list[Image.Image]:
        images: list[Image.Image] = []
        batches = [seeds[i : i + self.max_batch] for i in range(0, len(seeds), self.max_batch)]
        steps_done = 0
        pipeline_s = 0.0
        for b, batch in enumerate(batches):
            check_stop(control)

            def on_step_end(p: Any, step: int, timestep: Any, kwargs: dict[str, Any], b: int = b) -> dict:
                nonlocal steps_done
                steps_done += 1
                done = (b + (step + 1) / max(p.num_timesteps, 1)) / len(batches)
                control.progress(5 + 90 * done)
                if control.should_stop():
                    # Raising here skips the remaining steps and the VAE decode: the job is
                    # cancelled within one step. _interrupt is reset by the pipeline's next call.
                    p._interrupt = True
                    raise Cancelled()
                return kwargs

            # CPU generators: the same seed gives the same noise on any device, so a result
            # made on one GPU can be reproduced on another or on CPU.
            generators = [torch.Generator("cpu").manual_seed(s) for s in batch]
            started = time.perf_counter()
            out = pipe(
                **call,
                num_images_per_prompt=len(batch),
                generator=generators,
                callback_on_step_end=on_step_end,
                output_type="pil",
            )
            # The PIL output is on the host, so the device has finished: no extra synchronize.
            pipeline_s += time.perf_counter() - started
            flagged = getattr(out, "nsfw_content_detected", None)
            if flagged and any(flagged):
                raise ContentRejected(
                    "the output safety checker refused a generated image", code="output_safety_checker"
                )
            images.extend(out.images)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        self._timing.value = {
            "pipeline_s": round(pipeline_s, 4),
            "steps": steps_done,
            "it_per_s": round(steps_done / pipeline_s, 3) if pipeline_s > 0 else None,
            "peak_device_bytes": peak,
        }
        return images


# -- the engines -----------------------------------------------------------------------------------


class _DiffusionEngine:
    task = ""
    # Each engine's __call__ takes its own task's keywords; declared here (an annotation only)
    # so that code holding any engine of ENGINES may call it.
    __call__: Callable[..., EngineResult]

    def __init__(self, models: DiffusionModels):
        self.models = models

    def _result(
        self, entry: ModelEntry, images: Sequence[Image.Image], seeds: Sequence[int], **meta: Any
    ) -> EngineResult:
        timing = self.models.timing()
        if timing:
            meta = {**meta, "timing": timing}
        outputs = [
            OutputImage(
                image,
                {
                    "seed": seed,
                    "width": image.width,
                    "height": image.height,
                    "model": entry.id,
                    "index": i,
                    **meta,
                },
            )
            for i, (image, seed) in enumerate(zip(images, seeds, strict=True))
        ]
        return EngineResult(backend=f"{ENGINE}:{entry.id}", images=outputs)


class ImageGenerator(_DiffusionEngine):
    """``generate``: text to image, or image to image when ``image`` is given."""

    task = "generate"

    def __call__(
        self,
        prompt: str,
        *,
        model: str | None = None,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int = 30,
        cfg_scale: float = 7.0,
        seed: int | None = None,
        samples: int = 1,
        scheduler: str | None = None,
        loras: list[dict[str, Any]] | None = None,
        image: Image.Image | None = None,
        image_strength: float = 0.6,
        control: RunControl | None = None,
    ) -> EngineResult:
        control = control or NullControl()
        prompt = _prompt("prompt", prompt, required=True)
        common = _common(negative_prompt, steps, cfg_scale, samples, scheduler)
        entry, info = self.models.resolve(model, self.task)
        if image is not None:
            image = _input_image("image", image)
            width, height = _img2img_size(image, width, height, info)
            strength = _number("image_strength", image_strength, 0.0, 1.0, low_open=True)
            _check_effective_steps("image_strength", strength, common["num_inference_steps"])
        else:
            width = _side("width", info.native_side if width is None else width, info)
            height = _side("height", info.native_side if height is None else height, info)
        seeds = _seeds(seed, samples)
        lora_list = self.models.resolve_loras(loras, entry.base_model_type or info.base_model_type)
        call: dict[str, Any] = {"prompt": prompt, **common}
        if image is not None:
            # The img2img pipelines take their size from the image, not from width/height.
            kind = "img2img"
            call["image"] = image.resize((width, height), Image.Resampling.LANCZOS)
            call["strength"] = strength
        else:
            kind = "text2img"
            call.update(width=width, height=height)
        images = self.models.run(
            entry,
            info,
            kind,
            call,
            pixels=width * height,
            seeds=seeds,
            scheduler=scheduler,
            loras=lora_list,
            control=control,
        )
        control.progress(100)
        meta: dict[str, Any] = {"mode": kind, "steps": steps, "cfg_scale": float(cfg_scale)}
        if lora_list:
            meta["loras"] = [{"model": x.entry.id, "weight": x.weight} for x in lora_list]
        return self._result(entry, images, seeds, **meta)


class Inpainter(_DiffusionEngine):
    """``inpaint``: repaint the masked region of ``image`` following ``prompt``.

    ``mask_mode`` "white" (the default, diffusers' convention) repaints where the mask is white;
    "black" (the SenseTime seed's convention) repaints where it is black.
    """

    task = "inpaint"

    def __call__(
        self,
        image: Image.Image,
        mask: Image.Image,
        prompt: str = "",
        *,
        mask_mode: str = "white",
        strength: float = 1.0,
        model: str | None = None,
        negative_prompt: str | None = None,
        steps: int = 30,
        cfg_scale: float = 7.0,
        seed: int | None = None,
        samples: int = 1,
        scheduler: str | None = None,
        loras: list[dict[str, Any]] | None = None,
        feather: int | None = None,
        control: RunControl | None = None,
    ) -> EngineResult:
        control = control or NullControl()
        prompt = _prompt("prompt", prompt)
        common = _common(negative_prompt, steps, cfg_scale, samples, scheduler)
        strength = _number("strength", strength, 0.0, 1.0, low_open=True)
        _check_effective_steps("strength", strength, common["num_inference_steps"])
        image, region = _image_and_mask(image, mask, mask_mode)
        feather = _feather(feather, image)
        entry, info = self.models.resolve(model, self.task)
        seeds = _seeds(seed, samples)
        lora_list = self.models.resolve_loras(loras, entry.base_model_type or info.base_model_type)
        images = _masked_repaint(
            self.models,
            entry,
            info,
            image,
            region,
            feather,
            seeds,
            control,
            {"prompt": prompt, "strength": strength, **common},
            scheduler=scheduler,
            loras=lora_list,
        )
        control.progress(100)
        return self._result(entry, images, seeds, mask_mode=mask_mode, strength=strength)


class ObjectRemover(_DiffusionEngine):
    """``remove_object``: fill the masked region from its surroundings; no prompt needed.

    The fill blends into the image through a mask feathered *inward*: pixels outside the mask
    are the input's own, unchanged, and the fill fades in over ``feather`` pixels inside it.
    """

    task = "remove_object"

    def __call__(
        self,
        image: Image.Image,
        mask: Image.Image,
        *,
        mask_mode: str = "white",
        model: str | None = None,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        steps: int = 30,
        cfg_scale: float = 5.0,
        seed: int | None = None,
        scheduler: str | None = None,
        feather: int | None = None,
        control: RunControl | None = None,
    ) -> EngineResult:
        control = control or NullControl()
        prompt = REMOVE_PROMPT if prompt is None else _prompt("prompt", prompt)
        negative = REMOVE_NEGATIVE if negative_prompt is None else negative_prompt
        common = _common(negative, steps, cfg_scale, 1, scheduler)
        image, region = _image_and_mask(image, mask, mask_mode)
        feather = _feather(feather, image)
        entry, info = self.models.resolve(model, self.task)
        seeds = _seeds(seed, 1)
        images = _masked_repaint(
            self.models,
            entry,
            info,
            image,
            region,
            feather,
            seeds,
            control,
            {"prompt": prompt, "strength": 1.0, **common},
            scheduler=scheduler,
            loras=[],
        )
        control.progress(100)
        return self._result(entry, images, seeds, mask_mode=mask_mode)


class Outpainter(_DiffusionEngine):
    """``outpaint``: extend the canvas around ``image`` and paint the new area.

    The canvas is ``ratio`` times the image (default 1.5, in (1, 5]) or ``width``/``height``;
    ``align`` places the original on it (default ``middle``), and the original's pixels are
    pasted back unchanged at that position.
    """

    task = "outpaint"

    def __call__(
        self,
        image: Image.Image,
        *,
        ratio: float | None = None,
        width: int | None = None,
        height: int | None = None,
        align: str = "middle",
        prompt: str = "",
        model: str | None = None,
        negative_prompt: str | None = None,
        steps: int = 30,
        cfg_scale: float = 7.0,
        seed: int | None = None,
        samples: int = 1,
        scheduler: str | None = None,
        loras: list[dict[str, Any]] | None = None,
        control: RunControl | None = None,
    ) -> EngineResult:
        control = control or NullControl()
        prompt = _prompt("prompt", prompt)
        common = _common(negative_prompt, steps, cfg_scale, samples, scheduler)
        image = _input_image("image", image)
        canvas_w, canvas_h = _outpaint_size(image, ratio, width, height)
        if not isinstance(align, str) or _ALIGN_ALIASES.get(align, align) not in ALIGNS:
            raise InvalidInput(f"align must be one of {', '.join(ALIGNS)}, got {align!r}", field="align")
        align = _ALIGN_ALIASES.get(align, align)
        fx, fy = ALIGNS[align]
        x, y = round((canvas_w - image.width) * fx), round((canvas_h - image.height) * fy)
        entry, info = self.models.resolve(model, self.task)
        seeds = _seeds(seed, samples)
        lora_list = self.models.resolve_loras(loras, entry.base_model_type or info.base_model_type)

        # The new area starts as the original's edge pixels stretched outward: a strength below
        # 1 then continues the image instead of denoising from flat grey.
        arr = np.asarray(image)
        pad = ((y, canvas_h - image.height - y), (x, canvas_w - image.width - x), (0, 0))
        canvas = Image.fromarray(np.pad(arr, pad, mode="edge"))
        region = Image.new("L", (canvas_w, canvas_h), 255)
        region.paste(0, (x, y, x + image.width, y + image.height))
        work_w, work_h = _work_size(canvas_w, canvas_h, info)
        call = {
            "prompt": prompt,
            "image": canvas.resize((work_w, work_h), Image.Resampling.LANCZOS),
            # Any working pixel touched by the new area is repainted (the original is pasted back
            # at full resolution afterwards, so nothing of it is lost).
            "mask_image": _resize_mask_covering(region, (work_w, work_h)),
            "strength": 1.0,
            **common,
        }
        results = self.models.run(
            entry,
            info,
            "inpaint",
            _with_size(call, work_w, work_h),
            pixels=work_w * work_h,
            seeds=seeds,
            scheduler=scheduler,
            loras=lora_list,
            control=control,
        )
        images = []
        for result in results:
            out = result.convert("RGB").resize((canvas_w, canvas_h), Image.Resampling.LANCZOS)
            out.paste(image, (x, y))
            images.append(out)
        control.progress(100)
        return self._result(
            entry, images, seeds, align=align, offset=[x, y], source_size=[image.width, image.height]
        )


ENGINES: dict[str, type[_DiffusionEngine]] = {
    "generate": ImageGenerator,
    "inpaint": Inpainter,
    "remove_object": ObjectRemover,
    "outpaint": Outpainter,
}


# -- shared steps ----------------------------------------------------------------------------------


def _masked_repaint(
    models: DiffusionModels,
    entry: ModelEntry,
    info: ModelInfo,
    image: Image.Image,
    region: Image.Image,
    feather: int,
    seeds: list[int],
    control: RunControl,
    call: dict[str, Any],
    *,
    scheduler: str | None,
    loras: list[_Lora],
) -> list[Image.Image]:
    """Inpaint ``region`` (L, 255 = repaint) of ``image`` and composite the result back so that
    pixels outside the region keep the input's exact values."""
    work_w, work_h = _work_size(image.width, image.height, info)
    # The model repaints a band around the region too (``feather`` px), so it does not see the
    # object's fringe as context to continue; the composite below keeps only the region itself.
    grown = region.filter(ImageFilter.MaxFilter(2 * feather + 1)) if feather else region
    call = {
        **call,
        "image": image.resize((work_w, work_h), Image.Resampling.LANCZOS),
        "mask_image": _resize_mask_covering(grown, (work_w, work_h)),
    }
    results = models.run(
        entry,
        info,
        "inpaint",
        _with_size(call, work_w, work_h),
        pixels=work_w * work_h,
        seeds=seeds,
        scheduler=scheduler,
        loras=loras,
        control=control,
    )
    alpha = _inner_feather(region, feather)
    return [
        _composite(image, r.convert("RGB").resize(image.size, Image.Resampling.LANCZOS), alpha)
        for r in results
    ]


def _inner_feather(region: Image.Image, feather: int) -> np.ndarray:
    """Blend weights: 0 outside the region, rising to 1 within ``feather`` px inside it."""
    mask = np.asarray(region, dtype=np.float32) / 255.0
    if feather <= 0:
        return mask
    blurred = np.asarray(region.filter(ImageFilter.GaussianBlur(feather / 2)), dtype=np.float32) / 255.0
    # The blur is about 0.5 on the region's edge and 1 deep inside, so 2 * blur - 1 ramps from 0
    # at the edge to 1 about ``feather`` px in; multiplying by the hard mask keeps the weight at
    # exactly 0 outside, whatever the blur leaked there.
    return np.clip(blurred * 2.0 - 1.0, 0.0, 1.0) * mask


def _composite(original: Image.Image, generated: Image.Image, alpha: np.ndarray) -> Image.Image:
    src = np.asarray(original, dtype=np.float32)
    gen = np.asarray(generated, dtype=np.float32)
    a = alpha[..., None]
    blended = np.rint(src * (1.0 - a) + gen * a)
    # Where the weight is 0 take the input itself: identity by construction, not by float luck.
    out = np.where(a > 0, blended, src).astype(np.uint8)
    return Image.fromarray(out)


# -- validation ------------------------------------------------------------------------------------


def _number(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InvalidInput(f"{name} must be a number, got {value!r}", field=name)
    if value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise InvalidInput(f"{name} must be in {interval}, got {value}", field=name)
    return float(value)


def _integer(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{name} must be an integer, got {value!r}", field=name)
    if not low <= value <= high:
        raise InvalidInput(f"{name} must be in [{low}, {high}], got {value}", field=name)
    return value


def _prompt(name: str, value: Any, *, required: bool = False) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string", field=name)
    if required and not value.strip():
        raise InvalidInput(f"{name} must not be empty", field=name)
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidInput(f"{name} has {len(value)} characters, at most {MAX_PROMPT_CHARS}", field=name)
    return value


def _common(negative_prompt: Any, steps: Any, cfg_scale: Any, samples: Any, scheduler: Any) -> dict[str, Any]:
    """Validate the knobs every engine shares; returns the pipeline's keyword arguments."""
    negative = _prompt("negative_prompt", negative_prompt)
    _integer("steps", steps, 1, MAX_STEPS)
    _number("cfg_scale", cfg_scale, 0.0, limits.DIFFUSION_MAX_CFG_SCALE)
    _integer("samples", samples, 1, MAX_SAMPLES)
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise InvalidInput(
            f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}", field="scheduler"
        )
    return {
        "negative_prompt": negative or None,
        "num_inference_steps": steps,
        "guidance_scale": float(cfg_scale),
    }


def _check_effective_steps(name: str, strength: float, steps: int) -> None:
    # img2img and inpaint run only the last ``steps * strength`` steps; zero of them is no run.
    if int(steps * strength) < 1:
        raise InvalidInput(
            f"{name} {strength} with {steps} steps leaves no denoising step; raise {name} or steps",
            field=name,
        )


def _seeds(seed: Any, samples: int) -> list[int]:
    if seed is None:
        # The SenseTime seed range: easy to read back and type in to reproduce an output.
        seed = secrets.randbelow(99_999_999)
    seed = _integer("seed", seed, 0, MAX_SEED - samples + 1)
    return [seed + i for i in range(samples)]


def _side(name: str, value: Any, info: ModelInfo) -> int:
    value = _integer(name, value, MIN_SIDE, info.max_side)
    if value % 8:
        raise InvalidInput(f"{name} must be a multiple of 8, got {value}", field=name)
    return value


def _input_image(name: str, image: Any) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise InvalidInput(f"{name} must be an image", field=name)
    if min(image.size) < 16 or max(image.size) > MAX_INPUT_SIDE:
        raise InvalidInput(
            f"{name} is {image.width}x{image.height}; each side must be in [16, {MAX_INPUT_SIDE}]", field=name
        )
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.mode == "P":
        # Transparent pixels have no colour to continue: flatten them onto white.
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def _image_and_mask(image: Any, mask: Any, mask_mode: Any) -> tuple[Image.Image, Image.Image]:
    """The RGB image and the region to repaint as an L image (255 = repaint, 0 = keep)."""
    image = _input_image("image", image)
    if not isinstance(mask, Image.Image):
        raise InvalidInput("mask must be an image", field="mask")
    if mask.size != image.size:
        raise InvalidInput(
            f"mask is {mask.width}x{mask.height} but the image is "
            f"{image.width}x{image.height}; they must be the same size",
            field="mask",
        )
    if mask_mode not in MASK_MODES:
        raise InvalidInput(f"mask_mode must be 'white' or 'black', got {mask_mode!r}", field="mask_mode")
    if "A" in mask.getbands() and np.asarray(mask.getchannel("A")).min() < 255:
        # A transparent-background brush stroke: the painted (opaque) pixels are the region.
        gray = mask.getchannel("A")
        gray = gray if mask_mode == "white" else ImageChops.invert(gray)
    else:
        gray = mask.convert("L")
    region = (
        gray.point(lambda v: 255 if v >= 128 else 0)
        if mask_mode == "white"
        else gray.point(lambda v: 255 if v < 128 else 0)
    )
    if region.getextrema()[1] == 0:
        raise InvalidInput(
            f"the mask marks no region to repaint (mask_mode={mask_mode!r}: "
            f"{'white' if mask_mode == 'white' else 'black'} pixels are repainted)",
            field="mask",
        )
    return image, region


def _feather(feather: Any, image: Image.Image) -> int:
    if feather is None:
        return max(2, round(min(image.size) / 64))
    return _integer("feather", feather, 0, 256)


def _img2img_size(image: Image.Image, width: Any, height: Any, info: ModelInfo) -> tuple[int, int]:
    if width is None and height is None:
        scale = min(1.0, info.max_side / max(image.size))
        width, height = (
            max(MIN_SIDE, _round8(image.width * scale)),
            max(MIN_SIDE, _round8(image.height * scale)),
        )
    elif width is None:
        width = max(MIN_SIDE, _round8(_integer("height", height, 1, 10**6) * image.width / image.height))
    elif height is None:
        height = max(MIN_SIDE, _round8(_integer("width", width, 1, 10**6) * image.height / image.width))
    return _side("width", width, info), _side("height", height, info)


def _outpaint_size(image: Image.Image, ratio: Any, width: Any, height: Any) -> tuple[int, int]:
    if ratio is not None and (width is not None or height is not None):
        raise InvalidInput("give ratio or width/height, not both", field="ratio")
    if width is None and height is None:
        ratio = _number("ratio", 1.5 if ratio is None else ratio, 1.0, 5.0, low_open=True)
        canvas = (round(image.width * ratio), round(image.height * ratio))
    else:
        w = image.width if width is None else _integer("width", width, image.width, MAX_INPUT_SIDE)
        h = image.height if height is None else _integer("height", height, image.height, MAX_INPUT_SIDE)
        if (w, h) == image.size:
            raise InvalidInput(
                "width/height must make the canvas larger than the image",
                field="width" if width is not None else "height",
            )
        canvas = (w, h)
    if max(canvas) > MAX_INPUT_SIDE:
        raise InvalidInput(
            f"the outpainted image would be {canvas[0]}x{canvas[1]}; each side must be at "
            f"most {MAX_INPUT_SIDE}",
            field="ratio" if ratio is not None else "width",
        )
    return canvas


def _work_size(width: int, height: int, info: ModelInfo) -> tuple[int, int]:
    """The size the model paints at: the long side brought into [native, 1.5 x native]."""
    long_side = max(width, height)
    target = min(max(long_side, info.native_side), info.work_side)
    scale = target / long_side
    return max(8, _round8(width * scale)), max(8, _round8(height * scale))


def _resize_mask_covering(region: Image.Image, size: tuple[int, int]) -> Image.Image:
    # Any working pixel that is even partly region counts as region, so downscaling never shrinks
    # the area the model repaints (what it misses would show as unpainted seams).
    small = region.resize(size, Image.Resampling.BOX)
    return small.point(lambda v: 255 if v > 0 else 0)


def _with_size(call: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    return {**call, "width": width, "height": height}


def _round8(value: float) -> int:
    return int(value) // 8 * 8


def _lora_file(path: Path) -> Path:
    if path.is_file():
        return path
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise InvalidInput(f"lora folder {path} must hold exactly one .safetensors file", field="loras")
    return files[0]


@lru_cache(maxsize=64)
def _model_info(path: str) -> ModelInfo:
    """Read the native size and UNet channels from the folder's configs (no weights loaded)."""
    folder = Path(path)
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EngineError(
            f"model folder {folder} is not a complete diffusers pipeline: {exc}", code="model_broken"
        ) from exc
    vae_factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    sample = unet.get("sample_size", 64)
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    cls_name = str(index.get("_class_name", ""))
    # SD 2.x shares SD 1.5's pipeline class; only its text width (1024) tells them apart.
    base = "sdxl" if "XL" in cls_name else "sd2" if unet.get("cross_attention_dim") == 1024 else "sd15"
    # A folder holding only fp16 weight files must be loaded as that variant.
    unet_files = [p.name for p in (folder / "unet").glob("*.safetensors")]
    variant = "fp16" if unet_files and all(".fp16." in n for n in unet_files) else None
    return ModelInfo(base, int(sample) * vae_factor, int(unet.get("in_channels", 4)), variant)
