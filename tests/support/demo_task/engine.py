"""The ``demo_invert`` engine: inverts an image's colours, blended by ``amount``.

In the product this file would be ``inference/engines/demo.py``, found there without a list.
"""

from __future__ import annotations

from PIL import Image, ImageChops

from inference.base import EngineResult, OutputImage, check_stop
from inference.registry import Engine, EngineCall, LocalTask


def run_demo_invert(call: EngineCall) -> EngineResult:
    check_stop(call.control)
    image = call.images["image_url"].convert("RGB")
    inverted = Image.blend(image, ImageChops.invert(image), call.payload["amount"])
    call.control.progress(100)
    meta = {"width": inverted.width, "height": inverted.height, "amount": call.payload["amount"]}
    return EngineResult(backend="demo-invert", images=[OutputImage(inverted, meta)])


ENGINE = Engine(
    name="demo",
    queue="gpu.vision",
    tasks=(
        LocalTask(
            "demo_invert",
            "Demonstration: invert an image's colours",
            predict_seconds=0.5,
            soft_time_limit=30,
            time_limit=40,
            blocking_path="/demo-invert",
        ),
    ),
    run=run_demo_invert,
    warmup=("PIL.ImageChops",),
)
