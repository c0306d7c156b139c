"""``remove_background``: an ONNX segmentation model from the store, or weight-free GrabCut.

The engine code (``inference.background``: numpy, onnxruntime, OpenCV) is imported when a job
runs, not when this declaration is read: the API reads it too.
"""

from __future__ import annotations

from typing import Any

from inference.base import EngineResult
from inference.model_files import segmentation_family
from inference.registry import Engine, EngineCall, LocalTask
from inference.runtime import chosen_model, load_cached, model_store


def run_remove_background(call: EngineCall) -> EngineResult:
    from inference.background import BackgroundRemover, GrabCutBackgroundRemover  # heavy: numpy, onnxruntime

    entry = chosen_model(call, "remove_background", ("onnx",))
    if entry is None:
        installed = model_store(call.settings).list(type="onnx", task="remove_background")
        entry = installed[0] if installed else None
    engine: Any
    if entry is None:
        engine = GrabCutBackgroundRemover()
    else:
        path = model_store(call.settings).resolve_path(entry)
        # Recorded when it was added; entries from before that are read from the file now.
        family = entry.extra.get("family") or segmentation_family(path) or "u2net"
        model_id = entry.id
        engine = load_cached(
            f"seg:{model_id}", path, lambda: BackgroundRemover(path, model_id=model_id, family=family)
        )
    return engine(
        call.images["image_url"], return_mask=call.payload.get("return_mask", False), control=call.control
    )


ENGINE = Engine(
    name="background",
    queue="gpu.vision",
    tasks=(
        LocalTask(
            "remove_background",
            "Cut out the foreground as a PNG with alpha",
            predict_seconds=2.0,
            blocking_path="/remove-background",
        ),
    ),
    run=run_remove_background,
    warmup=("inference.background",),
)
