"""``remove_object``: erase a region, given as a mask or named by a prompt.

The region: ``mask_url``, or ``prompt`` ("the dog") matched against the labels of the installed
object detector (``scan_objects``'s), whose boxes, grown by ``grow``, make the mask
(``inference.object_masks``); a prompt that names nothing in the picture fails the job with the
code ``nothing_to_remove``.

The remover: LaMa (``inference.lama``, one forward pass) when a LaMa model is installed and the
payload asks for nothing only diffusion can do (no ``fill_prompt``, one sample); else the
diffusion remover (``inference.diffusion.ObjectRemover``), which repaints following
``fill_prompt`` when one is given and makes ``samples`` outputs with seeds. ``model`` names either
kind. The engine code (torch, spandrel, diffusers) is imported when a job runs: the API reads
this declaration too.
"""

from __future__ import annotations

from typing import Any

from config import limits
from inference.base import EngineError, EngineResult, InvalidInput
from inference.model_store import ModelEntry
from inference.registry import Engine, EngineCall, LocalTask
from inference.runtime import chosen_model, diffusion_models, load_cached, model_store, torch_device
from inference.safety import check_prompt

TASK = "remove_object"


def run_remove_object(call: EngineCall) -> EngineResult:
    payload = call.payload
    check_prompt([payload.get("fill_prompt")], call.settings.prompt_blocklist, field="fill_prompt")
    remover = choose_remover(call)
    image, mask, mask_mode = call.images["image_url"], call.images.get("mask_url"), payload["mask_mode"]
    removed: dict[str, Any] = {}
    if mask is None:
        mask, objects = _mask_from_prompt(call)
        mask_mode = "white"
        removed = {"prompt": payload["prompt"], "removed": objects}
    if remover is not None:
        eraser = _lama(call, remover)
        return eraser(image, mask, mask_mode=mask_mode, control=call.control, **removed)
    from inference.diffusion import ObjectRemover  # heavy: torch, diffusers

    result = ObjectRemover(diffusion_models(call.settings))(
        image,
        mask,
        mask_mode=mask_mode,
        model=payload.get("model"),
        prompt=payload.get("fill_prompt"),
        seed=payload.get("seed"),
        samples=payload["samples"],
        control=call.control,
        client=call.owner or None,
    )
    for output in result.images:
        output.meta.update(removed)
    return result


def choose_remover(call: EngineCall) -> ModelEntry | None:
    """The LaMa model that erases this job, or None for the diffusion remover (see the module)."""
    payload, owner = call.payload, call.owner or None
    diffusion_only = [name for name in ("fill_prompt",) if payload.get(name)]
    if payload.get("samples", 1) > 1:
        diffusion_only.append("samples")
    named = chosen_model(call, TASK, ("diffusers", "lama"))
    if named is not None:
        if named.type == "lama" and diffusion_only:
            raise InvalidInput(
                f"LaMa model {named.id!r} erases without a prompt and makes one output; "
                f"{diffusion_only[0]} needs a diffusers model",
                field=diffusion_only[0],
            )
        return named if named.type == "lama" else None
    store = model_store(call.settings)
    lamas = store.list(type="lama", task=TASK, client=owner)
    if lamas and not diffusion_only:
        return lamas[0]
    if store.list(type="diffusers", task=TASK, client=owner):
        return None
    if lamas:
        raise InvalidInput(
            f"{diffusion_only[0]} needs a diffusers model, and only LaMa is installed",
            field=diffusion_only[0],
        )
    raise EngineError("no object removal model (LaMa or diffusers) is installed", code="model_not_installed")


def _lama(call: EngineCall, entry: ModelEntry) -> Any:
    from inference.lama import LamaEraser  # heavy: torch, spandrel

    path = model_store(call.settings).resolve_path(entry)
    device, model_id = torch_device(), entry.id
    return load_cached(f"lama:{model_id}", path, lambda: LamaEraser(path, model_id=model_id, device=device))


def _mask_from_prompt(call: EngineCall) -> tuple[Any, list[dict[str, Any]]]:
    """The mask of the objects ``prompt`` names, found by the installed detector."""
    from inference.detection import ObjectScanner  # heavy: torch, torchvision
    from inference.object_masks import mask_from_prompt

    store = model_store(call.settings)
    detectors = store.list(type="detector", task="scan_objects", client=call.owner or None)
    if not detectors:
        raise InvalidInput(
            "removing by prompt needs an object detector and none is installed "
            "(aiorch models add DETECTOR.pth); send mask_url instead",
            code="detector_not_installed",
            field="prompt",
        )
    entry = detectors[0]
    path = store.resolve_path(entry)
    labels = path.parent / entry.extra["labels"]
    device, model_id = torch_device(), entry.id
    # The same cache key as scan_objects: one loaded detector serves both tasks.
    scanner = load_cached(
        f"det:{model_id}",
        path,
        lambda: ObjectScanner(
            path, labels, model_id=model_id, device=device, max_detections=limits.SCAN_MAX_OBJECTS
        ),
    )
    image = call.images["image_url"]
    found = scanner(image, min_score=call.payload["min_score"], max_objects=limits.SCAN_MAX_OBJECTS)
    objects = found.data["objects"] if found.data else []
    mask, chosen = mask_from_prompt(
        call.payload["prompt"], objects, image.size, scanner.labels.values(), grow=call.payload["grow"]
    )
    return mask, chosen


ENGINE = Engine(
    name="object_removal",
    queue="gpu.diffusion",
    tasks=(
        LocalTask(
            TASK,
            "Erase an object (a mask, or named by a prompt) and fill the background",
            model_types=("diffusers", "lama"),
            predict_seconds=6.0,
            blocking_path="/remove-object",
        ),
    ),
    run=run_remove_object,
    warmup=("inference.diffusion", "inference.lama"),
)
