"""The diffusion tasks: ``generate`` (txt2img, img2img), ``inpaint``, ``outpaint``.

All of them run on one shared pipeline per base model (``inference.diffusion``), as do
``stylize`` and the diffusion remover of ``remove_object``, declared by engines of their own
(``stylize.py``, ``object_removal.py``) on the same model layer (``runtime.diffusion_models``).
That code (torch, diffusers) is imported when a job runs, not when this declaration is read:
the API reads it too.
"""

from __future__ import annotations

from inference.base import EngineResult
from inference.registry import Engine, EngineCall, LocalTask
from inference.runtime import diffusion_models
from inference.safety import check_prompt

# payload field -> engine argument, where they differ
_ENGINE_ARGS = {"image_url": "image", "mask_url": "mask"}
# What the task layer applies to the outputs, not the engine.
_NOT_FOR_ENGINE = {"format", "watermark"}


def run_diffusion(call: EngineCall) -> EngineResult:
    """Run ``call.task``'s pipeline on the shared model layer."""
    # Refused before any model loads: a blocked prompt never touches the GPU.
    check_prompt([call.payload.get("prompt")], call.settings.prompt_blocklist)
    from inference.diffusion import PIPELINES  # heavy: torch, diffusers

    kwargs = {
        _ENGINE_ARGS.get(name, name): value
        for name, value in call.payload.items()
        if name not in _NOT_FOR_ENGINE and value is not None
    }
    for field, arg in _ENGINE_ARGS.items():
        if field in call.images:
            kwargs[arg] = call.images[field]
    if "controlnets" in call.images:
        # Each ControlNet's decoded image in place of its reference (generate's controlnets).
        kwargs["controlnets"] = [
            {**{k: v for k, v in item.items() if k != "image_url"}, "image": image}
            for item, image in zip(kwargs["controlnets"], call.images["controlnets"], strict=True)
        ]
    pipeline = PIPELINES[call.task](diffusion_models(call.settings))
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
            "outpaint", "Extend an image to a larger canvas", model_types=_DIFFUSERS, predict_seconds=10.0
        ),
    ),
    run=run_diffusion,
    warmup=("inference.diffusion",),
)
