"""The diffusion tasks: ``generate`` (txt2img, img2img), ``inpaint``, ``remove_object``, ``outpaint``.

All four run on one shared pipeline per base model (``inference.diffusion``). That code (torch,
diffusers) is imported when a job runs, not when this declaration is read: the API reads it too.
"""

from __future__ import annotations

from typing import Any

from inference.base import EngineResult
from inference.registry import Engine, EngineCall, LocalTask
from inference.runtime import model_cache, model_store
from inference.safety import check_prompt

# The process's shared model layer, built on its first diffusion job.
_models: Any = None

# payload field -> engine argument, where they differ
_ENGINE_ARGS = {"image_url": "image", "mask_url": "mask"}
# What the task layer applies to the outputs, not the engine.
_NOT_FOR_ENGINE = {"format", "watermark"}


def run_diffusion(call: EngineCall) -> EngineResult:
    """Run ``call.task``'s pipeline on the shared model layer."""
    global _models
    # Refused before any model loads: a blocked prompt never touches the GPU.
    check_prompt([call.payload.get("prompt")], call.settings.prompt_blocklist)
    from inference.diffusion import PIPELINES, DiffusionModels  # heavy: torch, diffusers

    if _models is None:
        _models = DiffusionModels(model_store(call.settings), model_cache())
    kwargs = {
        _ENGINE_ARGS.get(name, name): value
        for name, value in call.payload.items()
        if name not in _NOT_FOR_ENGINE and value is not None
    }
    for field, arg in _ENGINE_ARGS.items():
        if field in call.images:
            kwargs[arg] = call.images[field]
    pipeline = PIPELINES[call.task](_models)
    return pipeline(**kwargs, control=call.control, client=call.owner or None)


_DIFFUSERS = ("diffusers",)

ENGINE = Engine(
    name="diffusion",
    queue="gpu.diffusion",
    tasks=(
        LocalTask(
            "generate", "Text-to-image and img2img diffusion", model_types=_DIFFUSERS, predict_seconds=8.0
        ),
        LocalTask(
            "inpaint", "Repaint the masked region from a prompt", model_types=_DIFFUSERS, predict_seconds=8.0
        ),
        LocalTask(
            "remove_object",
            "Erase the masked object and fill the background",
            model_types=_DIFFUSERS,
            predict_seconds=6.0,
            blocking_path="/remove-object",
        ),
        LocalTask(
            "outpaint", "Extend an image to a larger canvas", model_types=_DIFFUSERS, predict_seconds=10.0
        ),
    ),
    run=run_diffusion,
    warmup=("inference.diffusion",),
)
