"""The diffusion model layer: resolve a model in the store, load it once into the cache, run it.

All four tasks run on diffusers pipelines loaded from a local folder listed in the model store
(SD 1.5, SD 2.x and SDXL layouts). One base pipeline is loaded per model and kept in the
``ModelCache``; each run derives the task's pipeline from it with ``AutoPipelineFor*.from_pipe``,
which shares the loaded modules, so switching between tasks never reloads weights.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from config import limits
from inference.base import Cancelled, ContentRejected, EngineError, InvalidInput, RunControl, check_stop
from inference.diffusion.params import MAX_LORAS, SCHEDULERS, number, round8
from inference.model_cache import ModelCache, estimate_checkpoint_bytes, file_identity
from inference.model_store import ModelEntry, ModelNotFound, ModelStore

BACKEND = "diffusers"


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
        return round8(self.native_side * 3 // 2)


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
class Lora:
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

    def resolve(
        self, model: str | None, task: str, client: str | None = None
    ) -> tuple[ModelEntry, ModelInfo]:
        """The base model a job names (or the default one); ``client``: the job's, which sees the
        operator's models and its own only."""
        if model is None:
            model = self.default_model
        if model is None:
            candidates = self.store.list(type="diffusers", task=task, client=client)
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
                entry = self.store.get(model, client=client)
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
        return entry, model_info(str(self.store.resolve_path(entry)))

    def resolve_loras(self, loras: Any, base_model_type: str, client: str | None = None) -> list[Lora]:
        """The LoRAs a job names, checked; another client's LoRA is unknown to ``client``."""
        if loras is None:
            return []
        if not isinstance(loras, (list, tuple)):
            raise InvalidInput("loras must be a list of {model, weight}", field="loras")
        if len(loras) > MAX_LORAS:
            raise InvalidInput(f"at most {MAX_LORAS} loras, got {len(loras)}", field="loras")
        resolved: list[Lora] = []
        for i, item in enumerate(loras):
            where = f"loras[{i}]"
            if not isinstance(item, dict) or not isinstance(item.get("model"), str):
                raise InvalidInput(f"{where} must be an object with a 'model' id", field=where)
            weight = number(
                f"{where}.weight",
                item.get("weight", 1.0),
                0.0,
                limits.DIFFUSION_MAX_LORA_WEIGHT,
                low_open=True,
            )
            try:
                entry = self.store.get(item["model"], client=client)
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
            resolved.append(Lora(entry, lora_file(self.store.resolve_path(entry)), weight))
        return resolved

    # -- loading -----------------------------------------------------------------------------

    def cache_key(self, entry: ModelEntry) -> str:
        # With the files' identity: a model replaced under the same id is loaded afresh.
        identity = file_identity(self.store.resolve_path(entry))
        return f"{BACKEND}:{entry.id}#{identity}:{self.device}:{str(self.dtype).removeprefix('torch.')}"

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
        loras: list[Lora],
        control: RunControl,
        modules: dict[str, Any] | None = None,
    ) -> list[Image.Image]:
        """Run ``kind`` ("text2img", "img2img" or "inpaint") once per seed, in batches.
        ``modules``: loaded modules the task's pipeline adds to the base one's (``controlnet``,
        which makes it the ControlNet pipeline of ``kind``).

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
                pipe = self._task_pipeline(loaded, kind, scheduler, modules or {})
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

    def _task_pipeline(
        self, loaded: LoadedPipeline, kind: str, scheduler: str | None, modules: dict[str, Any]
    ) -> Any:
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
        pipe = auto.from_pipe(base, scheduler=sched, **modules)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _apply_loras(self, loaded: LoadedPipeline, loras: list[Lora]) -> None:
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


def lora_file(path: Path) -> Path:
    if path.is_file():
        return path
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise InvalidInput(f"lora folder {path} must hold exactly one .safetensors file", field="loras")
    return files[0]


@lru_cache(maxsize=64)
def model_info(path: str) -> ModelInfo:
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
