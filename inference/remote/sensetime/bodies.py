"""SenseTime request bodies: our task and payload (names from the seeds) as a SenseTime
capability ("family") and the JSON it takes (seed 001).

The seed's ranges are checked before a body is built, by ``inference.remote.sensetime.limits``
(``check_limits``, which ``SenseTimeClient.submit`` calls first and the route's fall-through asks too);
what only the body's shape can tell (a required field, a URL the provider can fetch) is refused
here, ``InvalidInput`` naming the field, before any request is sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from inference.base import InvalidInput
from inference.remote.base import require
from inference.remote.limits import mapped_model
from inference.remote.sensetime.controlnet import controlnet_configs
from inference.remote.sensetime.limits import free_outpaint, free_outpaint_size, stylization_model
from inference.remote.sensetime.training import build_train_lora

_ALIGN = {
    "topleft",
    "topmiddle",
    "topright",
    "middleleft",
    "middle",
    "middleright",
    "bottomleft",
    "bottommiddle",
    "bottomright",
}
# Our outpaint ``align`` words onto the seed's ``align_position`` enum.
_ALIGN_ALIASES = {
    "center": "middle",
    "top": "topmiddle",
    "bottom": "bottommiddle",
    "left": "middleleft",
    "right": "middleright",
}


def build_request(task: str, payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    """Our task and payload (names from the seeds) as a SenseTime family and request body.

    Raises ``InvalidInput`` naming the field for anything the seed's limits refuse, before any
    request is sent.
    """
    builder = _BUILDERS.get(task)
    if builder is None:
        raise InvalidInput(f"SenseTime serves no task {task!r}", field="task")
    return builder(payload, options)


def _model_id(payload: Mapping[str, Any], options: Mapping[str, Any]) -> str:
    # The payload's ``model`` is ours where the route maps our ids (option ``models``), so a route
    # [SenseTime, local] serves the same payload on both; else it is SenseTime's id as it is.
    if payload.get("model"):
        return mapped_model("SenseTime", str(payload["model"]), options, "model")
    model = options.get("model_id")
    if not model:
        raise InvalidInput("SenseTime needs a model_id (route option or payload 'model')", field="model")
    return str(model)


def _public_url(payload: Mapping[str, Any], name: str) -> str:
    # SenseTime fetches inputs itself ("必须是公开可访"): data: URIs and asset:// ids must be
    # turned into public URLs of ours before the submit.
    value = require(payload, name)
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise InvalidInput(f"'{name}' must be a public http(s) URL for SenseTime", field=name)
    return value


def _common(body: dict, payload: Mapping[str, Any], options: Mapping[str, Any], *, png: bool = False) -> dict:
    fmt = str(payload.get("format") or options.get("format") or "").lower()
    # SenseTime writes JPG or PNG only; webp is requested as PNG (lossless) and re-encoded by us.
    if png or fmt in ("png", "webp"):
        body["format"] = "PNG"
    elif fmt in ("jpg", "jpeg"):
        body["format"] = "JPG"
    if options.get("watermark_type"):
        # SenseTime's own label ("Default": "图片由 AI 生成", "MakaLogo"), only where the route asks
        # for it. The payload's ``watermark`` (text, position, opacity) is not SenseTime's to draw:
        # its fixed labels cannot say it, so we draw it on the downloaded output, as locally.
        body["watermark_config"] = {"type": options["watermark_type"]}
    return body


def _put(body: dict, payload: Mapping[str, Any], ours: str, theirs: str | None = None) -> None:
    if payload.get(ours) is not None:
        body[theirs or ours] = payload[ours]


def _diffusion_params(body: dict, payload: Mapping[str, Any]) -> None:
    _put(body, payload, "negative_prompt", "neg_prompt")
    for name in ("cfg_scale", "steps", "samples", "seed"):
        _put(body, payload, name)


def _build_generate(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    prompt = require(payload, "prompt")
    if len(prompt) > 2000:
        raise InvalidInput("'prompt' must be at most 2000 characters", field="prompt")
    body: dict[str, Any] = {"model_id": _model_id(payload, options), "prompt": prompt}
    _diffusion_params(body, payload)
    for side in ("width", "height"):
        _put(body, payload, side)
    if payload.get("image_url"):
        body["img_url"] = _public_url(payload, "image_url")
        _put(body, payload, "image_strength")
    loras = payload.get("loras") or []
    if loras:
        body["lora_configs"] = [_lora(item, options, index) for index, item in enumerate(loras)]
    for name in ("force_translation", "add_prompt", "controlnet_configs"):
        if name in options:
            body[name] = options[name]
    if payload.get("controlnets"):
        # The job's own ControlNets replace a route's default controlnet_configs.
        body["controlnet_configs"] = controlnet_configs(payload["controlnets"])
    return "imgenstd", _common(body, payload, options)


def _lora(item: Any, options: Mapping[str, Any], index: int) -> dict[str, Any]:
    if isinstance(item, str):
        return {"model_id": mapped_model("SenseTime", item, options, f"loras[{index}].model")}
    # The contract's form is {"model", "weight"} (a LoRA trained at SenseTime is named by its
    # provider_model_id); SenseTime's own key names are taken too.
    found: Mapping[str, Any] = item if isinstance(item, Mapping) else {}
    model_id = found.get("model") or found.get("model_id") or found.get("id")
    if not model_id:
        raise InvalidInput("each LoRA is a model id or {'model', 'weight'}", field="loras")
    where = f"loras[{index}]"
    lora: dict[str, Any] = {"model_id": mapped_model("SenseTime", str(model_id), options, f"{where}.model")}
    weight = found.get("merge_weight", found.get("weight"))
    if weight is not None:
        if not 0 < float(weight) < 2:
            raise InvalidInput("a LoRA weight must be in (0, 2)", field=f"{where}.weight")
        lora["merge_weight"] = float(weight)
    return lora


def _build_faceswap(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    faces = [{"url": _public_url(payload, "source_url"), "index": 0, "base_index": 0}]
    return "face.imggen", _faceswap_body(payload, options, faces)


def _build_faceswap_multi(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    sources = require(payload, "source_urls")
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise InvalidInput("'source_urls' must be a list of URLs", field="source_urls")
    swap = list(payload.get("swap_faces_index") or range(len(sources)))
    target = list(payload.get("target_faces_index") or range(len(swap)))
    if len(swap) != len(target):
        raise InvalidInput(
            "'swap_faces_index' and 'target_faces_index' differ in length", field="target_faces_index"
        )
    # "目前换脸接口最多支持换4张人脸"
    if len(target) > 4:
        raise InvalidInput("SenseTime swaps at most 4 faces", field="target_faces_index")
    faces = []
    for i, (index, base_index) in enumerate(zip(swap, target, strict=True)):
        url = sources[i] if i < len(sources) else sources[-1]
        if not url.startswith(("http://", "https://")):
            raise InvalidInput("'source_urls' must be public http(s) URLs for SenseTime", field="source_urls")
        faces.append({"url": url, "index": int(index), "base_index": int(base_index)})
    return "face.imggen", _faceswap_body(payload, options, faces)


def _faceswap_body(payload: Mapping[str, Any], options: Mapping[str, Any], faces: list[dict]) -> dict:
    body: dict[str, Any] = {
        "model_id": _model_id(payload, options),
        "base_img": {"url": _public_url(payload, "target_url")},
        "faces": faces,
    }
    for name in ("dino_scale", "guidance_scale", "prompt"):
        if name in options:
            body[name] = options[name]
    return _common(body, payload, options)


def _build_face_detect(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    return "face.detect", {
        "img_url": _public_url(payload, "image_url"),
        "type": options.get("type", "normal"),
    }


def _build_remove_object(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    # The mask goes through as is: the platform's mask convention is SenseTime's (black = area to
    # erase), see seeds/README.md.
    body: dict[str, Any] = {
        "model_id": _model_id(payload, options),
        "img_url": _public_url(payload, "image_url"),
        "mask_img_url": _public_url(payload, "mask_url"),
    }
    _put(body, payload, "samples")
    if "mask_type" in options:
        body["mask_type"] = options["mask_type"]
    return "erase", _common(body, payload, options)


def _build_outpaint(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    body: dict[str, Any] = {
        "model_id": _model_id(payload, options),
        "img_url": _public_url(payload, "image_url"),
    }
    if free_outpaint(payload):
        return _build_free_outpaint(body, payload, options)
    _put(body, payload, "ratio", "outpaint_ratio")
    _put(body, payload, "samples")
    for side in ("width", "height"):
        _put(body, payload, side)
    align = payload.get("align")
    if align is not None:
        align = _ALIGN_ALIASES.get(str(align).lower().replace("-", "").replace("_", ""), str(align).lower())
        if align not in _ALIGN:
            raise InvalidInput(f"'align' must be one of {sorted(_ALIGN)}", field="align")
        body["align_position"] = align
    return "outpaint", _common(body, payload, options)


def _build_free_outpaint(
    body: dict, payload: Mapping[str, Any], options: Mapping[str, Any]
) -> tuple[str, dict]:
    # imgen_free: the output's size and where the input sits in it (its top-left corner at
    # free_x, free_y), so the output is exactly the input plus our margins.
    size = free_outpaint_size(payload, options)
    if size is None:
        raise InvalidInput(
            "SenseTime's free outpaint needs the input's size (route option 'input_sizes', which "
            "the submit step fills)",
            field="image_url",
        )
    body["width"], body["height"] = size
    body["free_x"] = int(payload.get("left") or 0)
    body["free_y"] = int(payload.get("top") or 0)
    _put(body, payload, "samples")
    return "outpaint.free", _common(body, payload, options)


def _build_inpaint(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    body: dict[str, Any] = {
        "model_id": _model_id(payload, options),
        "img_url": _public_url(payload, "image_url"),
        "mask_img_url": _public_url(payload, "mask_url"),
        "prompt": require(payload, "prompt"),
    }
    _put(body, payload, "strength", "repaint_strength")
    _diffusion_params(body, payload)
    return "inpaint", _common(body, payload, options)


def _build_upscale(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    body: dict[str, Any] = {
        "model_id": _model_id(payload, options),
        "img_url": _public_url(payload, "image_url"),
    }
    # hd_ratio is (1.0, 3.0]; our scale goes to 4, so a route must send larger scales elsewhere.
    _put(body, payload, "scale", "hd_ratio")
    return "sup_res", _common(body, payload, options)


def _build_remove_background(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    body: dict[str, Any] = {
        "model_id": _model_id(payload, options),
        "img_url": _public_url(payload, "image_url"),
    }
    # PNG keeps the alpha channel the task exists for ("JPG不带透明通道").
    return "split", _common(body, payload, options, png=True)


def _build_stylize(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    # Our ``style`` picks the stylization model (route option ``styles``); our ``model`` is a
    # local base model, which SenseTime's stylization has no use for.
    body: dict[str, Any] = {
        "model_id": stylization_model(payload, options),
        "img_url": _public_url(payload, "image_url"),
    }
    _put(body, payload, "samples")
    if (payload.get("width") is None) != (payload.get("height") is None):
        raise InvalidInput("'width' and 'height' go together for stylization", field="width")
    for side in ("width", "height"):
        _put(body, payload, side)
    return "stylization", _common(body, payload, options)


def _build_train_lora(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    return "lora", build_train_lora(payload, options)


_BUILDERS = {
    "generate": _build_generate,
    "faceswap": _build_faceswap,
    "faceswap_multi": _build_faceswap_multi,
    "face_detect": _build_face_detect,
    "remove_object": _build_remove_object,
    "outpaint": _build_outpaint,
    "inpaint": _build_inpaint,
    "upscale": _build_upscale,
    "remove_background": _build_remove_background,
    "stylize": _build_stylize,
    "train_lora": _build_train_lora,
}


SUPPORTED_TASKS = frozenset(_BUILDERS)
