"""``scan_objects``: a torchvision detector from the store, boxes and labels as JSON.

The engine code (``inference.detection``: torch, torchvision) is imported when a job runs, not
when this declaration is read: the API reads it too.
"""

from __future__ import annotations

from config import limits
from inference.base import EngineError, EngineResult
from inference.registry import Engine, EngineCall, LocalTask
from inference.runtime import chosen_model, load_cached, model_store, torch_device


def run_scan_objects(call: EngineCall) -> EngineResult:
    from inference.detection import ObjectScanner  # heavy: torch

    store = model_store(call.settings)
    entry = chosen_model(call, "scan_objects", ("detector",))
    if entry is None:
        installed = store.list(type="detector", task="scan_objects")
        if not installed:
            raise EngineError("no object detection model is installed", code="model_not_installed")
        entry = installed[0]
    path = store.resolve_path(entry)
    labels = path.parent / entry.extra["labels"]
    device = torch_device()
    model_id = entry.id
    scanner = load_cached(
        f"det:{model_id}",
        path,
        lambda: ObjectScanner(
            path, labels, model_id=model_id, device=device, max_detections=limits.SCAN_MAX_OBJECTS
        ),
    )
    return scanner(
        call.images["image_url"],
        min_score=call.payload["min_score"],
        max_objects=call.payload["max_objects"],
        control=call.control,
    )


ENGINE = Engine(
    name="detection",
    queue="gpu.vision",
    tasks=(
        LocalTask(
            "scan_objects",
            "Detect objects and return boxes as JSON",
            model_types=("detector",),
            predict_seconds=1.0,
            blocking_path="/scan-objects",
        ),
    ),
    run=run_scan_objects,
    warmup=("inference.detection",),
)
