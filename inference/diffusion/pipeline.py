"""What the four diffusion pipelines share: the base class that shapes their results, and the
steps that repaint a region and put the untouched pixels back exactly.

Pixels the caller did not ask to change are copied back from the input after generation
(inpaint, remove_object, outpaint), so they stay identical to the input byte for byte, whatever
the VAE round trip did to them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from inference.base import EngineResult, OutputImage, RunControl
from inference.diffusion.loader import BACKEND, DiffusionModels, Lora, ModelInfo
from inference.diffusion.params import round8
from inference.model_store import ModelEntry


class DiffusionPipeline:
    """Base of the task pipelines: each is named after its task and has one way to run it,
    ``__call__``, which checks every input before the model is loaded or the GPU touched."""

    task = ""
    # Each engine's __call__ takes its own task's keywords; declared here (an annotation only)
    # so that code holding any pipeline of PIPELINES may call it.
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
        return EngineResult(backend=f"{BACKEND}:{entry.id}", images=outputs)


def masked_repaint(
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
    loras: list[Lora],
) -> list[Image.Image]:
    """Inpaint ``region`` (L, 255 = repaint) of ``image`` and composite the result back so that
    pixels outside the region keep the input's exact values."""
    work_w, work_h = work_size(image.width, image.height, info)
    # The model repaints a band around the region too (``feather`` px), so it does not see the
    # object's fringe as context to continue; the composite below keeps only the region itself.
    grown = region.filter(ImageFilter.MaxFilter(2 * feather + 1)) if feather else region
    call = {
        **call,
        "image": image.resize((work_w, work_h), Image.Resampling.LANCZOS),
        "mask_image": resize_mask_covering(grown, (work_w, work_h)),
    }
    results = models.run(
        entry,
        info,
        "inpaint",
        with_size(call, work_w, work_h),
        pixels=work_w * work_h,
        seeds=seeds,
        scheduler=scheduler,
        loras=loras,
        control=control,
    )
    alpha = inner_feather(region, feather)
    return [
        composite(image, r.convert("RGB").resize(image.size, Image.Resampling.LANCZOS), alpha)
        for r in results
    ]


def inner_feather(region: Image.Image, feather: int) -> np.ndarray:
    """Blend weights: 0 outside the region, rising to 1 within ``feather`` px inside it."""
    mask = np.asarray(region, dtype=np.float32) / 255.0
    if feather <= 0:
        return mask
    blurred = np.asarray(region.filter(ImageFilter.GaussianBlur(feather / 2)), dtype=np.float32) / 255.0
    # The blur is about 0.5 on the region's edge and 1 deep inside, so 2 * blur - 1 ramps from 0
    # at the edge to 1 about ``feather`` px in; multiplying by the hard mask keeps the weight at
    # exactly 0 outside, whatever the blur leaked there.
    return np.clip(blurred * 2.0 - 1.0, 0.0, 1.0) * mask


def composite(original: Image.Image, generated: Image.Image, alpha: np.ndarray) -> Image.Image:
    src = np.asarray(original, dtype=np.float32)
    gen = np.asarray(generated, dtype=np.float32)
    a = alpha[..., None]
    blended = np.rint(src * (1.0 - a) + gen * a)
    # Where the weight is 0 take the input itself: identity by construction, not by float luck.
    out = np.where(a > 0, blended, src).astype(np.uint8)
    return Image.fromarray(out)


def work_size(width: int, height: int, info: ModelInfo) -> tuple[int, int]:
    """The size the model paints at: the long side brought into [native, 1.5 x native]."""
    long_side = max(width, height)
    target = min(max(long_side, info.native_side), info.work_side)
    scale = target / long_side
    return max(8, round8(width * scale)), max(8, round8(height * scale))


def resize_mask_covering(region: Image.Image, size: tuple[int, int]) -> Image.Image:
    # Any working pixel that is even partly region counts as region, so downscaling never shrinks
    # the area the model repaints (what it misses would show as unpainted seams).
    small = region.resize(size, Image.Resampling.BOX)
    return small.point(lambda v: 255 if v > 0 else 0)


def with_size(call: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    return {**call, "width": width, "height": height}
