"""``stylize``: img2img in a named style preset or a LoRA, on the shared diffusion model layer.

The pipeline (``inference.diffusion.stylize``: torch, diffusers) is imported when a job runs, not
when this declaration is read: the API reads it too.
"""

from __future__ import annotations

from inference.base import EngineResult
from inference.registry import Engine, EngineCall, LocalTask
from inference.runtime import diffusion_models
from inference.safety import check_prompt
from inference.styles import style_presets

# The payload fields the pipeline takes (format and watermark are the task layer's).
_ARGS = (
    "style",
    "prompt",
    "negative_prompt",
    "strength",
    "model",
    "steps",
    "cfg_scale",
    "seed",
    "samples",
    "scheduler",
)


def run_stylize(call: EngineCall) -> EngineResult:
    # Refused before any model loads: a blocked prompt never touches the GPU.
    check_prompt([call.payload.get("prompt")], call.settings.prompt_blocklist)
    from inference.diffusion.stylize import Stylizer  # heavy: torch, diffusers

    kwargs = {name: call.payload[name] for name in _ARGS if call.payload.get(name) is not None}
    stylizer = Stylizer(diffusion_models(call.settings))
    return stylizer(
        call.images["image_url"],
        **kwargs,
        # The built-in presets with the operator's (AIORCH_STYLES_FILE) over them.
        presets=style_presets(call.settings.styles),
        control=call.control,
        client=call.owner or None,
    )


ENGINE = Engine(
    name="stylize",
    queue="gpu.diffusion",
    tasks=(
        LocalTask(
            "stylize",
            "Redraw an image in a style preset or a LoRA (img2img)",
            model_types=("diffusers",),
            predict_seconds=6.0,
        ),
    ),
    run=run_stylize,
    warmup=("inference.diffusion",),
)
