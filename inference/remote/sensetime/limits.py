"""SenseTime's own limits on our payload (seed 001's parameter tables), checked before any submit.

They are narrower than our engines' in places: generated sides of 640-6000 px (ours start at 64),
``hd_ratio`` in (1, 3] (our ``scale`` goes to 4), ``steps`` up to 70, ``cfg_scale`` in [1, 20],
LoRA ``merge_weight`` in (0, 2) (ours takes 2), and LoRAs on generation only. A payload outside
them is refused naming our field, so a route goes on to its next backend (``inference.remote.limits``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from inference.base import InvalidInput
from inference.remote.limits import Bound, check_bounds, lora_items, mapped_model

PROVIDER = "SenseTime"
MAX_PROMPT_CHARS = 2000
# "目前换脸接口最多支持换4张人脸"
MAX_FACES = 4
SAMPLES = Bound("samples", 1, 8)
SIDES = (Bound("width", 640, 6000), Bound("height", 640, 6000))
_DIFFUSION = (Bound("cfg_scale", 1, 20), Bound("steps", 0, 70, low_open=True), SAMPLES)
# Our task -> the seed's ranges on its fields (by our names: ``scale`` is the seed's ``hd_ratio``).
BOUNDS: dict[str, tuple[Bound, ...]] = {
    "generate": (
        *_DIFFUSION,
        *SIDES,
        Bound("seed", 0, 99999999, high_open=True),
        Bound("image_strength", 0, 1),
    ),
    "inpaint": (*_DIFFUSION, Bound("seed", 0, 9999999, high_open=True), Bound("strength", 0.1, 1)),
    "remove_object": (SAMPLES,),
    "outpaint": (Bound("ratio", 1, 5, low_open=True), SAMPLES, *SIDES),
    "upscale": (Bound("scale", 1, 3, low_open=True),),
    "stylize": (SAMPLES, *SIDES),
}
LORA_WEIGHT = Bound("weight", 0, 2, low_open=True, high_open=True)
# Only text/img2img takes ``lora_configs``; inpaint, outpaint and the rest have no such field.
LORA_TASKS = frozenset({"generate"})


def check_limits(task: str, payload: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    """Refuse (``InvalidInput`` naming our field and SenseTime's limit) what SenseTime cannot take."""
    check_bounds(PROVIDER, payload, BOUNDS.get(task, ()))
    prompt = payload.get("prompt")
    if isinstance(prompt, str) and len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidInput(
            f"{PROVIDER} takes a 'prompt' of at most {MAX_PROMPT_CHARS} characters", field="prompt"
        )
    if payload.get("model"):
        mapped_model(PROVIDER, str(payload["model"]), options, "model")
    loras = lora_items(payload)
    if loras and task not in LORA_TASKS:
        raise InvalidInput(f"{PROVIDER} takes LoRAs for generate only, not {task}", field="loras")
    for index, item in enumerate(loras):
        where = f"loras[{index}]"
        model = item.get("model") or item.get("model_id")
        if model:
            mapped_model(PROVIDER, str(model), options, f"{where}.model")
        LORA_WEIGHT.check(PROVIDER, item.get("weight"), where=f"{where}.weight")
    if task == "faceswap_multi":
        _check_faces(payload)
    for name, why in NOT_TAKEN.get(task, {}).items():
        if payload.get(name) is not None:
            raise InvalidInput(f"{PROVIDER} cannot take {task}'s {name!r}: {why}", field=name)
    if task == "stylize":
        stylization_model(payload, options)


# Fields of ours that seed 001 has no counterpart for, per task, and why.
NOT_TAKEN: dict[str, dict[str, str]] = {
    "remove_object": {
        "prompt": "its erase takes a mask only",
        "fill_prompt": "its erase repaints from no prompt",
    },
    # imgen_free places the image by pixels but needs the output's size, which our payload
    # (extensions around an image whose size the submit does not read) does not carry.
    "outpaint": {side: "free extension runs locally" for side in ("left", "right", "top", "bottom")},
    # Its stylization (seed 001 "风格化") is a model per style: no prompt, no strength.
    "stylize": {
        name: "its stylization model is the style" for name in ("prompt", "negative_prompt", "strength")
    },
}


def stylization_model(payload: Mapping[str, Any], options: Mapping[str, Any]) -> str:
    """SenseTime's stylization model for our ``style`` (a preset name or a LoRA id), through the
    route option ``styles`` (``{"anime": "<SenseTime model id>"}``); a style it does not map is
    refused naming ``style``, so the route goes on to a backend that has it (``local``)."""
    style = str(payload.get("style") or "")
    styles = options.get("styles")
    if not isinstance(styles, Mapping) or not styles.get(style):
        known = ", ".join(sorted(styles)) if isinstance(styles, Mapping) else ""
        raise InvalidInput(
            f"the {PROVIDER} route has no stylization model for style {style!r} (route option "
            f"'styles' maps: {known or 'none'})",
            field="style",
        )
    return str(styles[style])


def _check_faces(payload: Mapping[str, Any]) -> None:
    for name in ("target_faces_index", "swap_faces_index", "source_urls"):
        given = payload.get(name)
        if given:
            if isinstance(given, list) and len(given) > MAX_FACES:
                raise InvalidInput(f"{PROVIDER} swaps at most {MAX_FACES} faces", field=name)
            return
