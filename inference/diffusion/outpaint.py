"""``outpaint``: extend the canvas around an image and paint the new area."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from config import limits
from inference.base import EngineResult, InvalidInput, NullControl, RunControl
from inference.diffusion.params import MAX_INPUT_SIDE, SamplingParams, input_image, integer, number
from inference.diffusion.pipeline import DiffusionPipeline, resize_mask_covering, with_size, work_size

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
ALIGN_ALIASES = limits.OUTPAINT_ALIGN_ALIASES


class Outpainter(DiffusionPipeline):
    """``outpaint``: extend the canvas around ``image`` and paint the new area.

    The canvas is ``ratio`` times the image (default 1.5, in (1, 5]) or ``width``/``height``;
    ``align`` places the original on it (default ``middle``), and the original's pixels are
    pasted back unchanged at that position. Or free extension: ``left``/``right``/``top``/
    ``bottom`` pixels added on those sides (the canvas is the image plus them; the model paints
    at a multiple of 8 and the result is scaled to the canvas).
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
        left: int | None = None,
        right: int | None = None,
        top: int | None = None,
        bottom: int | None = None,
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
        client: str | None = None,
    ) -> EngineResult:
        control = control or NullControl()
        params = SamplingParams.check(prompt, negative_prompt, steps, cfg_scale, samples, scheduler)
        image = input_image("image", image)
        sides = {"left": left, "right": right, "top": top, "bottom": bottom}
        if not isinstance(align, str) or ALIGN_ALIASES.get(align, align) not in ALIGNS:
            raise InvalidInput(f"align must be one of {', '.join(ALIGNS)}, got {align!r}", field="align")
        align = ALIGN_ALIASES.get(align, align)
        if any(value is not None for value in sides.values()):
            # Free extension: the canvas is the image plus the pixels asked for on each side.
            canvas_w, canvas_h, x, y = extended_canvas(image, ratio, width, height, sides)
            align = "free"
        else:
            canvas_w, canvas_h = outpaint_size(image, ratio, width, height)
            fx, fy = ALIGNS[align]
            x, y = round((canvas_w - image.width) * fx), round((canvas_h - image.height) * fy)
        entry, info = self.models.resolve(model, self.task, client)
        seeds = params.seeds(seed)
        lora_list = self.models.resolve_loras(loras, entry.base_model_type or info.base_model_type, client)

        # The new area starts as the original's edge pixels stretched outward: a strength below
        # 1 then continues the image instead of denoising from flat grey.
        arr = np.asarray(image)
        pad = ((y, canvas_h - image.height - y), (x, canvas_w - image.width - x), (0, 0))
        canvas = Image.fromarray(np.pad(arr, pad, mode="edge"))
        region = Image.new("L", (canvas_w, canvas_h), 255)
        region.paste(0, (x, y, x + image.width, y + image.height))
        work_w, work_h = work_size(canvas_w, canvas_h, info)
        call = {
            **params.pipeline_kwargs(),
            "image": canvas.resize((work_w, work_h), Image.Resampling.LANCZOS),
            # Any working pixel touched by the new area is repainted (the original is pasted back
            # at full resolution afterwards, so nothing of it is lost).
            "mask_image": resize_mask_covering(region, (work_w, work_h)),
            "strength": 1.0,
        }
        results = self.models.run(
            entry,
            info,
            "inpaint",
            with_size(call, work_w, work_h),
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


def extended_canvas(
    image: Image.Image, ratio: Any, width: Any, height: Any, sides: dict[str, Any]
) -> tuple[int, int, int, int]:
    """The canvas (width, height) and the image's place on it (x, y) for ``left``/``right``/
    ``top``/``bottom`` pixels added around ``image``."""
    for name, value in (("ratio", ratio), ("width", width), ("height", height)):
        if value is not None:
            raise InvalidInput("give ratio, width/height or left/right/top/bottom, not several", field=name)
    px = {name: integer(name, value or 0, 0, MAX_INPUT_SIDE) for name, value in sides.items()}
    if not any(px.values()):
        raise InvalidInput("at least one side must extend the image by a pixel or more", field="left")
    canvas = (image.width + px["left"] + px["right"], image.height + px["top"] + px["bottom"])
    if max(canvas) > MAX_INPUT_SIDE:
        pair = ("left", "right") if canvas[0] > MAX_INPUT_SIDE else ("top", "bottom")
        field = max(pair, key=lambda name: px[name])
        raise InvalidInput(
            f"the outpainted image would be {canvas[0]}x{canvas[1]}; each side must be at most "
            f"{MAX_INPUT_SIDE}",
            field=field,
        )
    return canvas[0], canvas[1], px["left"], px["top"]


def outpaint_size(image: Image.Image, ratio: Any, width: Any, height: Any) -> tuple[int, int]:
    if ratio is not None and (width is not None or height is not None):
        raise InvalidInput("give ratio or width/height, not both", field="ratio")
    if width is None and height is None:
        ratio = number("ratio", 1.5 if ratio is None else ratio, 1.0, 5.0, low_open=True)
        canvas = (round(image.width * ratio), round(image.height * ratio))
    else:
        w = image.width if width is None else integer("width", width, image.width, MAX_INPUT_SIDE)
        h = image.height if height is None else integer("height", height, image.height, MAX_INPUT_SIDE)
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
