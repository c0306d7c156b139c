"""The weight-free upscaler: Lanczos resampling with an optional unsharp mask.

It is the fallback every fresh install has, and it is named as what it is in
``result.meta.backend`` so nobody mistakes it for a neural super-resolution model.
"""

from __future__ import annotations

from PIL import Image, ImageFilter

from inference.base import EngineResult, InvalidInput, NullControl, OutputImage, RunControl

BACKEND = "lanczos"


class LanczosUpscaler:
    """Upscale an image by ``scale`` in (1, 4] with Lanczos resampling."""

    name = BACKEND

    def __init__(self, max_side: int = 8192):
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
        width = round(image.width * scale)
        height = round(image.height * scale)
        if max(width, height) > self.max_side:
            raise InvalidInput(
                f"output {width}x{height} would exceed the maximum side of {self.max_side} px",
                field="scale",
            )
        control.progress(5)
        # Lanczos on 8-bit RGB(A) or L; palette and other modes are widened first so the filter
        # interpolates colours rather than palette indices.
        if image.mode not in ("RGB", "RGBA", "L", "LA"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        out = image.resize((width, height), Image.Resampling.LANCZOS)
        if sharpen > 0:
            # percent 0..150 maps the seed's small floats (e.g. 0.12) onto a gentle unsharp mask.
            out = out.filter(ImageFilter.UnsharpMask(radius=2, percent=int(sharpen * 150), threshold=2))
        control.progress(100)
        meta = {"width": width, "height": height, "scale": scale}
        return EngineResult(backend=BACKEND, images=[OutputImage(out, meta)])
