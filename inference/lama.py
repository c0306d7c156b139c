"""``remove_object`` with LaMa: the masked region erased in one forward pass, no diffusion run.

LaMa (Suvorov et al., "Resolution-robust Large Mask Inpainting with Fourier Convolutions") is the
model IOPaint erases with by default. Its weights are read by spandrel (``LaMa`` architecture)
from the original checkpoints (``generator.*`` keys; the discriminator and loss networks beside it
are dropped), from a bare state dict, or from IOPaint's TorchScript ``big-lama.pt``.

As the diffusion remover does, LaMa repaints the region grown by ``feather`` pixels (so the
object's fringe is not continued) and the result is blended back through a mask feathered inward:
pixels outside the region stay the input's own, byte for byte. Large images follow IOPaint's
"crop" strategy: LaMa sees the region's neighbourhood (a margin around it), scaled down to at most
``max_side`` when that is still larger, never the whole picture at full size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from inference.base import EngineResult, NullControl, OutputImage, RunControl, check_stop
from inference.diffusion.params import feather_width, image_and_mask
from inference.diffusion.pipeline import composite, inner_feather, resize_mask_covering
from inference.spandrel_files import load_descriptor

BACKEND = "lama"


class LamaEraser:
    """Erase the masked region of an image with a LaMa model loaded once from ``weights_path``."""

    def __init__(
        self,
        weights_path: str | Path,
        *,
        model_id: str | None = None,
        device: str | torch.device = "cpu",
        crop_trigger: int = 800,
        crop_margin: int = 128,
        max_side: int = 1280,
    ):
        path = Path(weights_path)
        self.model_id = model_id or path.stem
        self.device = torch.device(device)
        # IOPaint's defaults for LaMa: crop around the region once the image's long side passes
        # 800 px, with 128 px of context, and never run it on more than 1280 px.
        self.crop_trigger = crop_trigger
        self.crop_margin = crop_margin
        self.max_side = max_side
        # LaMa stays fp32: spandrel marks it as not supporting fp16 (its FFTs lose the image).
        self._descriptor = _load_descriptor(path).to(self.device).eval()
        self.network: torch.nn.Module = self._descriptor.model

    @property
    def backend(self) -> str:
        return f"{BACKEND}:{self.model_id}"

    @property
    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.network.state_dict().values())

    def __call__(
        self,
        image: Image.Image,
        mask: Image.Image,
        *,
        mask_mode: str = "white",
        feather: int | None = None,
        control: RunControl | None = None,
        **meta: Any,
    ) -> EngineResult:
        """``meta``: facts the caller adds to the output's ``meta`` (what a prompt matched)."""
        control = control or NullControl()
        image, region = image_and_mask(image, mask, mask_mode)
        feather = feather_width(feather, image)
        grown = region.filter(ImageFilter.MaxFilter(2 * feather + 1)) if feather else region
        box = self._work_box(grown)
        crop, crop_mask = image.crop(box), grown.crop(box)
        scale = min(1.0, self.max_side / max(crop.size))
        work = (
            crop.size
            if scale == 1.0
            else (max(8, round(crop.width * scale)), max(8, round(crop.height * scale)))
        )
        if work != crop.size:
            crop_in = crop.resize(work, Image.Resampling.LANCZOS)
            # Downscaling must never shrink what is erased: a partly masked pixel is masked.
            crop_mask = resize_mask_covering(crop_mask, work)
        else:
            crop_in = crop
        check_stop(control)
        control.progress(10)
        painted = self._forward(crop_in, crop_mask)
        check_stop(control)
        if painted.size != crop.size:
            painted = painted.resize(crop.size, Image.Resampling.LANCZOS)
        filled = image.copy()
        filled.paste(painted, box[:2])
        out = composite(image, filled, inner_feather(region, feather))
        control.progress(100)
        facts = {"width": out.width, "height": out.height, "model": self.model_id, "index": 0}
        return EngineResult(
            backend=self.backend,
            images=[OutputImage(out, {**facts, "mask_mode": mask_mode, "work_size": list(work), **meta})],
        )

    def _work_box(self, grown: Image.Image) -> tuple[int, int, int, int]:
        width, height = grown.size
        if max(width, height) <= self.crop_trigger:
            return (0, 0, width, height)
        left, top, right, bottom = grown.getbbox() or (0, 0, width, height)
        margin = self.crop_margin
        return (
            max(0, left - margin),
            max(0, top - margin),
            min(width, right + margin),
            min(height, bottom + margin),
        )

    def _forward(self, image: Image.Image, mask: Image.Image) -> Image.Image:
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        holes = torch.from_numpy((np.asarray(mask) > 0).astype(np.float32))[None, None]
        with torch.inference_mode():
            # spandrel pads to LaMa's multiple of 8 and crops the padding off again.
            out = self._descriptor(pixels.to(self.device), holes.to(self.device))
        rgb = out[0].clamp(0, 1).permute(1, 2, 0).float().cpu().numpy()
        return Image.fromarray(np.rint(rgb * 255.0).astype(np.uint8))


def _load_descriptor(path: Path) -> Any:
    # The original checkpoints hold the discriminator and the loss networks beside the generator;
    # only the generator erases.
    return load_descriptor(path, what="LaMa", archs=("LaMa",), masked=True, keep=_generator_only)


def _generator_only(state: dict[str, Any]) -> dict[str, Any]:
    if any(key.startswith("generator.") for key in state):
        return {key: value for key, value in state.items() if key.startswith("generator.")}
    return state


