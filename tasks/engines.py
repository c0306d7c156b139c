"""Thin adapters from a task's validated payload to one engine call.

Engines are imported inside the adapters: the API process imports ``tasks`` to publish and must
never pull torch in, and a GPU worker must load its models in the forked child, not the parent.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter

from config import Settings
from inference.base import EngineError, EngineResult, InvalidInput, RunControl, check_stop

log = logging.getLogger("aiorch.engines")


@dataclass
class EngineCall:
    task: str
    payload: dict[str, Any]
    images: dict[str, Any]  # field -> PIL image, or a list of them for list fields
    control: RunControl
    attempt: int
    settings: Settings


_cache: Any = None


def pool_index() -> int:
    """This prefork child's slot in its pool (0 .. concurrency-1); 0 outside a pool."""
    try:
        from billiard.process import current_process

        return int(getattr(current_process(), "index", 0) or 0)
    except (ImportError, TypeError, ValueError):
        return 0


def cuda_device_for(index: int, device_count: int) -> str:
    """One GPU per pool process: child ``i`` of a ``-c N`` worker takes GPU ``i mod count``, so a
    worker started with one process per GPU spreads over all of them."""
    return f"cuda:{index % device_count}" if device_count > 1 else "cuda"


def torch_device() -> str:
    """CUDA when this process sees a GPU; imported lazily so only GPU-queue children load torch."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    device = cuda_device_for(pool_index(), torch.cuda.device_count())
    if device != "cuda":
        torch.cuda.set_device(device)
    return device


def model_cache() -> Any:
    """The per-process cache of loaded models, bounded by the device's memory budget."""
    global _cache
    if _cache is None:
        from inference.model_cache import ModelCache, default_budget_bytes

        device = torch_device()
        _cache = ModelCache(default_budget_bytes(device), device=device)
    return _cache


def model_store(settings: Settings) -> Any:
    from inference.model_store import ModelStore

    return ModelStore(settings.models_dir)


def chosen_model(call: EngineCall, task: str, types: tuple[str, ...]) -> Any:
    """The store entry named by ``payload.model``; None when the payload names none."""
    from inference.model_store import ModelNotFound

    model_id = call.payload.get("model")
    if not model_id:
        return None
    try:
        entry = model_store(call.settings).get(model_id)
    except ModelNotFound:
        raise InvalidInput(f"model {model_id!r} is not installed", field="model") from None
    if entry.type not in types or task not in entry.tasks:
        raise InvalidInput(f"model {model_id!r} ({entry.type}) does not serve {task}", field="model")
    return entry


def load_cached(key: str, path: Path, loader: Callable[[], Any]) -> Any:
    from inference.model_cache import estimate_checkpoint_bytes

    return model_cache().get_or_load(key, loader, estimate_checkpoint_bytes(path))


def upscale_engine(call: EngineCall) -> Any:
    """The engine an upscale call runs: the payload's model, else the best installed Real-ESRGAN
    model for its scale, else the weight-free Lanczos engine; its output capped at
    ``AIORCH_MAX_OUTPUT_SIDE``."""
    from inference.lanczos import LanczosUpscaler

    payload = call.payload
    entry = chosen_model(call, "upscale", ("realesrgan", "builtin"))
    engine: Any = None
    if entry is None or entry.type != "builtin":
        from inference.superres import Upscaler, choose_sr_model

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
        if payload.get("face_enhance"):
            raise InvalidInput(
                "face_enhance needs a face-restoration model, and none is installed", field="face_enhance"
            )
        return LanczosUpscaler(max_side=call.settings.max_output_side)
    # Set per call, not only at load: the cache may hold this model loaded by another adapter
    # (the face swap's enhancer) with the default limit.
    engine.max_side = call.settings.max_output_side
    return engine


def run_upscale(call: EngineCall) -> EngineResult:
    payload = call.payload
    image: Image.Image = call.images["image_url"]
    engine = upscale_engine(call)
    if engine.name == "lanczos":
        return engine(image, payload["scale"], sharpen=payload.get("sharpen", 0.0), control=call.control)
    result = engine(
        image, payload["scale"], face_enhance=payload.get("face_enhance", False), control=call.control
    )
    return _sharpened(result, payload.get("sharpen", 0.0))


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
    from inference.superres import UpscaleRequest

    requests = [
        UpscaleRequest(c.images["image_url"], c.payload["scale"], c.payload.get("face_enhance", False))
        for c in calls
    ]
    results = engine.upscale_batch(requests, max_batch=calls[0].settings.upscale_max_batch, control=control)
    return [
        r if isinstance(r, Exception) else _sharpened(r, c.payload.get("sharpen", 0.0))
        for r, c in zip(results, calls, strict=True)
    ]


def _sharpened(result: EngineResult, sharpen: float) -> EngineResult:
    if sharpen:
        # The same unsharp mask the Lanczos engine applies, so `sharpen` means one thing everywhere.
        for output in result.images:
            output.image = output.image.filter(
                ImageFilter.UnsharpMask(radius=2, percent=int(sharpen * 150), threshold=2)
            )
    return result


def run_remove_background(call: EngineCall) -> EngineResult:
    from inference.background import BackgroundRemover, GrabCutBackgroundRemover, segmentation_family

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
        engine = load_cached(
            f"seg:{entry.id}", path, lambda: BackgroundRemover(path, model_id=entry.id, family=family)
        )
    return engine(
        call.images["image_url"], return_mask=call.payload.get("return_mask", False), control=call.control
    )


def run_scan_objects(call: EngineCall) -> EngineResult:
    from inference.detection import ObjectScanner
    from tasks import payloads

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
    scanner = load_cached(
        f"det:{entry.id}",
        path,
        lambda: ObjectScanner(
            path, labels, model_id=entry.id, device=device, max_detections=payloads.MAX_OBJECTS
        ),
    )
    return scanner(
        call.images["image_url"],
        min_score=call.payload["min_score"],
        max_objects=call.payload["max_objects"],
        control=call.control,
    )


_landmark_engines: dict[int, Any] = {}


def face_engine(call: EngineCall) -> Any:
    """The InsightFace engine when the store holds all three of its ONNX models, else the
    weight-free mediapipe mesh engine when mediapipe imports, else the Haar landmark engine.
    Each is built once per worker process and kept. face_detect comes here too, so it reports
    the faces (and indices) of the engine that swaps them."""
    from inference.faceswap import InsightFaceSwapper, LandmarkFaceSwapper, MeshFaceSwapper
    from inference.model_store import FACE_ROLES

    limit = call.settings.max_faces
    store = model_store(call.settings)
    paths: dict[str, tuple[str, Path]] = {}
    for entry in store.list(type="onnx"):
        role = entry.extra.get("role")
        if role in FACE_ROLES and role not in paths and store.resolve_path(entry).is_file():
            paths[role] = (entry.id, store.resolve_path(entry))
    if len(paths) == len(FACE_ROLES):
        (det_id, det), (rec_id, rec), (swap_id, swap) = (
            paths[r] for r in ("face_detector", "face_recognizer", "face_swapper")
        )
        size = sum(path.stat().st_size for _, path in paths.values())
        try:
            return model_cache().get_or_load(
                f"face:insightface:{det_id}+{rec_id}+{swap_id}:{limit}",
                lambda: InsightFaceSwapper(det, rec, swap, max_faces=limit),
                size,
            )
        except EngineError as exc:
            # A broken file must not stop every face job: the weight-free engine still serves
            # them, and result.meta.backend says which engine ran.
            log.warning("InsightFace models unusable, using the landmark engine: %s", exc)
    if limit not in _landmark_engines:
        # Building either takes ~0.1-2 s (mediapipe's import and graphs, or the Haar cascades);
        # once per worker process, not per job.
        try:
            _landmark_engines[limit] = MeshFaceSwapper(max_faces=limit)
        except EngineError as exc:
            # mediapipe is installed apart from the extras (--no-deps, see the Makefile).
            log.warning("mediapipe face mesh unavailable, using the Haar landmark engine: %s", exc)
            _landmark_engines[limit] = LandmarkFaceSwapper(max_faces=limit)
    return _landmark_engines[limit]


def face_upscaler(call: EngineCall) -> tuple[Callable[[Image.Image], Image.Image] | None, str | None]:
    """``upscale=1``: the best installed SR model that loads, and its id, to enhance swapped
    faces; ``(None, None)`` when upscale is 0 or no SR model can be loaded.

    Upscaling is an enhancement, so, as in ``run_upscale``, a missing or broken weight file is
    passed over for the next candidate instead of failing the swap.
    """
    if not call.payload.get("upscale", 1):
        return None, None
    store = model_store(call.settings)
    candidates = [(e.id, store.resolve_path(e)) for e in store.list(type="realesrgan", task="upscale")]
    if not candidates:
        return None, None
    from inference.superres import Upscaler, choose_sr_model

    device = torch_device()
    for model_id, path in choose_sr_model(candidates, scale=2):

        def load(m: str = model_id, p: Path = path) -> Any:
            return Upscaler(p, model_id=m, device=device)

        try:
            engine = load_cached(f"sr:{model_id}", path, load)
        except EngineError as exc:
            log.warning("super-resolution model %s unusable for faceswap: %s", model_id, exc)
            continue

        def upscale(image: Image.Image, engine: Any = engine) -> Image.Image:
            return engine(image, 2.0).images[0].image

        return upscale, model_id
    return None, None


def _name_upscaler(result: EngineResult, model_id: str | None) -> EngineResult:
    for output in result.images:
        output.meta["upscaler"] = model_id
    return result


def run_face_detect(call: EngineCall) -> EngineResult:
    return face_engine(call).face_detect(
        call.images["image_url"], max_side=call.payload["max_side"], control=call.control
    )


def run_faceswap(call: EngineCall) -> EngineResult:
    p = call.payload
    upscaler, upscaler_id = face_upscaler(call)
    result = face_engine(call).faceswap(
        call.images["source_url"],
        call.images["target_url"],
        max_side=p["max_side"],
        sharpen=p["sharpen"],
        max_faces=p["max_faces"],
        upscaler=upscaler,
        control=call.control,
    )
    return _name_upscaler(result, upscaler_id)


def run_faceswap_multi(call: EngineCall) -> EngineResult:
    p = call.payload
    sources = call.images["source_urls"]
    upscaler, upscaler_id = face_upscaler(call)
    result = face_engine(call).faceswap_multi(
        sources,
        call.images["target_url"],
        p.get("swap_faces_index") or [0] * len(sources),
        p.get("target_faces_index") or list(range(len(sources))),
        max_side=p["max_side"],
        sharpen=p["sharpen"],
        upscaler=upscaler,
        control=call.control,
    )
    return _name_upscaler(result, upscaler_id)


def run_faceswap_video(call: EngineCall) -> EngineResult:
    """faceswap or faceswap_multi's mapping over every frame of the target video, into an MP4
    scratch file that the task layer stores and deletes."""
    import tempfile

    from inference.faceswap.video import VideoFaceSwapper

    p = call.payload
    upscaler, upscaler_id = face_upscaler(call)
    fd, scratch = tempfile.mkstemp(prefix="aiorch-video-", suffix=".mp4")
    os.close(fd)
    try:
        result = VideoFaceSwapper(face_engine(call))(
            call.images["target_url"],
            scratch,
            source=call.images.get("source_url"),
            sources=call.images.get("source_urls"),
            swap_faces_index=p.get("swap_faces_index"),
            target_faces_index=p.get("target_faces_index"),
            max_side=p["max_side"],
            sharpen=p["sharpen"],
            max_faces=p["max_faces"],
            upscaler=upscaler,
            control=call.control,
        )
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise
    for output in result.files:
        output.meta["upscaler"] = upscaler_id
    return result


def run_debug_sleep(call: EngineCall) -> EngineResult:
    """Sleep in small slices so cancellation and progress behave like a real engine's steps."""
    crash = call.payload.get("crash", "never")
    seconds = call.payload.get("seconds", 1.0)
    end = time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0:
            break
        check_stop(call.control)
        call.control.progress(100 * (1 - left / max(seconds, 1e-6)))
        time.sleep(min(0.05, left))
    if crash == "always" or (crash == "first" and call.attempt == 1):
        # A hard crash, as a segfaulting CUDA kernel would do: no exception, no cleanup.
        os.kill(os.getpid(), signal.SIGKILL)
    return EngineResult(backend="debug_sleep", data={"slept": seconds, "attempt": call.attempt})


_diffusion: Any = None

# payload field -> engine argument, where they differ
_DIFFUSION_ARGS = {"image_url": "image", "mask_url": "mask"}
_NOT_FOR_ENGINE = {"format", "watermark"}


def run_diffusion(call: EngineCall) -> EngineResult:
    """generate / inpaint / remove_object / outpaint on one shared pipeline per base model."""
    global _diffusion
    from inference.diffusion import ENGINES as DIFFUSION_ENGINES
    from inference.diffusion import DiffusionModels
    from inference.safety import check_prompt

    # Refused before any model loads: a blocked prompt never touches the GPU.
    check_prompt([call.payload.get("prompt")], call.settings.prompt_blocklist)
    if _diffusion is None:
        _diffusion = DiffusionModels(model_store(call.settings), model_cache())
    kwargs = {
        _DIFFUSION_ARGS.get(name, name): value
        for name, value in call.payload.items()
        if name not in _NOT_FOR_ENGINE and value is not None
    }
    for field, arg in _DIFFUSION_ARGS.items():
        if field in call.images:
            kwargs[arg] = call.images[field]
    engine = DIFFUSION_ENGINES[call.task](_diffusion)
    return engine(**kwargs, control=call.control)


ENGINES: dict[str, Callable[[EngineCall], EngineResult]] = {
    "diffusion": run_diffusion,
    "upscale": run_upscale,
    "remove_background": run_remove_background,
    "scan_objects": run_scan_objects,
    "face_detect": run_face_detect,
    "faceswap": run_faceswap,
    "faceswap_multi": run_faceswap_multi,
    "faceswap_video": run_faceswap_video,
    "debug_sleep": run_debug_sleep,
}

# Engines that can run several waiting jobs as one batch (tasks/batching.py picks the jobs).
BATCH_ENGINES: dict[str, Callable[[list[EngineCall], RunControl], list[EngineResult | Exception]]] = {
    "upscale": run_upscale_batch,
}
