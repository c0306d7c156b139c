"""The weight-free upscaler: Lanczos resampling with an optional unsharp mask.

It is the fallback every fresh install has, and it is named as what it is in
``result.meta.backend`` so nobody mistakes it for a neural super-resolution model.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from inference.base import EngineResult, InvalidInput, NullControl, OutputImage, RunControl

BACKEND = "lanczos"
# Pillow opens 16-bit greyscale PNG/TIFF as I;16 (or 32-bit "I"); converting those to RGB clips
# every value above 255 to white, so they are resampled in float and kept 16-bit.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def capped_size(width: int, height: int, scale: float, max_side: int) -> tuple[int, int, bool]:
    """The output size for ``scale``, shrunk (aspect kept) so its longer side is at most ``max_side``.

    Returns (width, height, capped). A too-large output is capped rather than refused: the client
    gets the largest image the platform will make, and ``meta.capped`` says so.
    """
    out_w, out_h = round(width * scale), round(height * scale)
    if max(out_w, out_h) <= max_side:
        return out_w, out_h, False
    ratio = max_side / max(width, height)
    return max(1, min(max_side, round(width * ratio))), max(1, min(max_side, round(height * ratio))), True


class LanczosUpscaler:
    """Upscale an image by ``scale`` in (1, 4] with Lanczos resampling."""

    name = BACKEND

    def __init__(self, max_side: int = 8192):
        if max_side < 1:
            raise ValueError(f"max_side must be at least 1, got {max_side}")
        self.max_side = max_side

    def __call__(
        self,
        image: Image.Image,
        scale: float,
        *,
        sharpen: float = 0.0,
        control: RunControl | None = None,
    ) -> EngineResult:
        control = control or NullControl()
        if not 1 < scale <= 4:
            raise InvalidInput(f"scale must be in (1, 4], got {scale}", field="scale")
        if not 0 <= sharpen <= 1:
            raise InvalidInput(f"sharpen must be in [0, 1], got {sharpen}", field="sharpen")
        width, height, capped = capped_size(image.width, image.height, scale, self.max_side)
        control.progress(5)
        # Lanczos on 8-bit RGB(A) or L, or on 16-bit grey in float; palette and other modes are
        # widened first so the filter interpolates colours rather than palette indices.
        if image.mode in SIXTEEN_BIT_MODES:
            out = _resize_sixteen_bit(image, width, height)
        else:
            if image.mode not in ("RGB", "RGBA", "L", "LA"):
                image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
            out = image.resize((width, height), Image.Resampling.LANCZOS)
        if sharpen > 0:
            # percent 0..150 maps the seed's small floats (e.g. 0.12) onto a gentle unsharp mask.
            out = out.filter(ImageFilter.UnsharpMask(radius=2, percent=int(sharpen * 150), threshold=2))
        control.progress(100)
        meta = {"width": width, "height": height, "scale": scale, "capped": capped}
        return EngineResult(backend=BACKEND, images=[OutputImage(out, meta)])


def _resize_sixteen_bit(image: Image.Image, width: int, height: int) -> Image.Image:
    values = np.asarray(image, dtype=np.float32)
    resized = np.asarray(Image.fromarray(values).resize((width, height), Image.Resampling.LANCZOS))
    return Image.fromarray(np.clip(np.rint(resized), 0, 65535).astype(np.uint16))
