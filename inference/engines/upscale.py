"""``upscale``: a Real-ESRGAN model from the store, or the weight-free Lanczos engine; then, with
``face_enhance``, the faces of the output restored by a face restorer (GFPGAN, RestoreFormer).

The engine code (``inference.superres``: torch and spandrel; ``inference.lanczos``: numpy) is
imported when a job runs, not when this declaration is read: the API reads it too.
"""

from __future__ import annotations

import functools
from typing import Any

from PIL import ImageFilter

from inference.base import EngineError, EngineResult, RunControl
from inference.engines.faces import face_detector, face_restorer
from inference.registry import Engine, EngineCall, LocalTask
from inference.runtime import chosen_model, load_cached, model_store, torch_device


def upscale_engine(call: EngineCall) -> Any:
    """The engine an upscale call runs: the payload's model, else the best installed Real-ESRGAN
    model for its scale, else the weight-free Lanczos engine; its output capped at
    ``AIORCH_MAX_OUTPUT_SIDE``."""
    from inference.lanczos import LanczosUpscaler  # heavy: numpy

    payload = call.payload
    entry = chosen_model(call, "upscale", ("realesrgan", "builtin"))
    engine: Any = None
    if entry is None or entry.type != "builtin":
        from inference.superres import Upscaler, choose_sr_model  # heavy: torch

        store = model_store(call.settings)
        if entry is not None:
            candidates = [(entry.id, store.resolve_path(entry))]
        else:
            candidates = [
                (e.id, store.resolve_path(e)) for e in store.list(type="realesrgan", task="upscale")
            ]
        device = torch_device() if candidates else "cpu"
        for model_id, path in choose_sr_model(candidates, scale=payload["scale"]):
            try:
                loader = functools.partial(Upscaler, path, model_id=model_id, device=device)
                engine = load_cached(f"sr:{model_id}", path, loader)
                break
            except EngineError:
                if entry is not None:
                    raise  # the client asked for this model: say why it cannot run
    if engine is None:
        return LanczosUpscaler(max_side=call.settings.max_output_side)
    # Set per call, not only at load: the cache may hold this model loaded by another engine
    # (the face swap's enhancer) with the default limit.
    engine.max_side = call.settings.max_output_side
    return engine


def run_upscale(call: EngineCall) -> EngineResult:
    payload = call.payload
    image = call.images["image_url"]
    # The restorer first: a picture it cannot take, or no restorer that loads, fails the job
    # before any upscaling is spent on it.
    restorer = face_restorer(call)
    if restorer is not None:
        from inference.face_restore import check_restorable  # heavy: torch

        check_restorable(image)
    engine = upscale_engine(call)
    if engine.name == "lanczos":
        result = engine(image, payload["scale"], sharpen=payload.get("sharpen", 0.0), control=call.control)
    else:
        result = sharpened(engine(image, payload["scale"], control=call.control), payload.get("sharpen", 0.0))
    if restorer is None:
        return result
    # At the output's scale, as GFPGAN's own pipeline restores after its background upsampler.
    detector = face_detector(call)
    for output in result.images:
        output.image, count = restorer.restore_image(output.image, detector, control=call.control)
        output.meta["face_enhance"] = restorer.name
        output.meta["faces_restored"] = count
    result.backend = f"{result.backend}+{restorer.name}"
    return result


def run_upscale_batch(calls: list[EngineCall], control: RunControl) -> list[EngineResult | Exception]:
    """Several upscale jobs that share a model and an input size, in batched forward passes.

    ``tasks/batching.py`` picks the jobs; each gets its own outcome (a result or the error that
    refused its input). An exception raised here (a crash, ``Cancelled``) ends every job of the
    batch the same way.
    """
    engine = upscale_engine(calls[0])
    if engine.name == "lanczos":
        # Nothing to stack without a network: run them one by one.
        outcomes: list[EngineResult | Exception] = []
        for call in calls:
            try:
                outcomes.append(run_upscale(call))
            except EngineError as exc:
                outcomes.append(exc)
        return outcomes
    from inference.superres import UpscaleRequest  # heavy: torch

    requests = [
        UpscaleRequest(c.images["image_url"], c.payload["scale"], c.payload.get("face_enhance", False))
        for c in calls
    ]
    results = engine.upscale_batch(requests, max_batch=calls[0].settings.upscale_max_batch, control=control)
    return [
        r if isinstance(r, Exception) else sharpened(r, c.payload.get("sharpen", 0.0))
        for r, c in zip(results, calls, strict=True)
    ]


def sharpened(result: EngineResult, sharpen: float) -> EngineResult:
    """The outputs with the Lanczos engine's own unsharp mask, so ``sharpen`` means one thing
    whichever engine ran."""
    if sharpen:
        for output in result.images:
            output.image = output.image.filter(
                ImageFilter.UnsharpMask(radius=2, percent=int(sharpen * 150), threshold=2)
            )
    return result


ENGINE = Engine(
    name="upscale",
    queue="gpu.superres",
    tasks=(
        LocalTask(
            "upscale",
            "Upscale an image by 1-4x",
            predict_seconds=3.0,
            soft_time_limit=300,
            time_limit=330,
            blocking_path="/upscale",
        ),
    ),
    run=run_upscale,
    run_batch=run_upscale_batch,
    warmup=("inference.superres", "inference.lanczos"),
)
