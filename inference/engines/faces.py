"""The face tasks: ``face_detect``, ``faceswap``, ``faceswap_multi`` and ``faceswap_video``.

Engine choice: the InsightFace engine when the store holds all three of its ONNX models, else the
weight-free mediapipe mesh engine when mediapipe imports, else the Haar landmark engine. Each is
built once per worker process and kept. ``face_detect`` runs on the same engine, so it reports
the faces (and indices) of the engine that swaps them.

The engine code (``inference.faceswap``: numpy, OpenCV, onnxruntime, mediapipe) is imported when a
job runs, not when this declaration is read: the API reads it too.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from inference.base import EngineError, EngineResult, InvalidInput
from inference.model_files import FACE_ROLES
from inference.registry import Engine, EngineCall, LocalTask
from inference.runtime import load_cached, model_cache, model_store, torch_device

log = logging.getLogger("aiorch.engines")

# The weight-free engine of this process, per AIORCH_MAX_FACES.
_landmark_engines: dict[int, Any] = {}


def face_engine(call: EngineCall) -> Any:
    """The face engine for this call's settings (see the module docstring for the choice)."""
    from inference.faceswap import InsightFaceSwapper, LandmarkFaceSwapper, MeshFaceSwapper  # heavy: cv2

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

    Upscaling is an enhancement, so, as in the upscale engine, a missing or broken weight file
    is passed over for the next candidate instead of failing the swap.
    """
    if not call.payload.get("upscale", 1):
        return None, None
    store = model_store(call.settings)
    candidates = [(e.id, store.resolve_path(e)) for e in store.list(type="realesrgan", task="upscale")]
    if not candidates:
        return None, None
    from inference.superres import Upscaler, choose_sr_model  # heavy: torch

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


def face_restorer(call: EngineCall) -> Any:
    """``face_enhance``: the best installed face restorer that loads (``inference.face_restore``);
    None when the payload does not ask for one.

    GFPGAN before RestoreFormer, and within one architecture the highest id first (``gfpganv1.4``
    before ``gfpganv1.3``). The client asked for the restoration (the API checked that one is
    installed), so, unlike the swap's upscaler, no usable restorer fails the job, saying why; a
    broken file among several is passed over.
    """
    if not call.payload.get("face_enhance"):
        return None
    from inference.face_restore import FaceRestorer  # heavy: torch

    store = model_store(call.settings)
    entries = sorted(store.list(type="face_restorer", task=call.task), key=lambda e: e.id, reverse=True)
    entries.sort(key=lambda e: e.extra.get("arch") != "GFPGAN")  # stable: ids stay in order
    if not entries:
        raise InvalidInput(
            "face_enhance needs a face-restoration model (GFPGAN, RestoreFormer or CodeFormer), and none "
            "is installed",
            field="face_enhance",
        )
    device = torch_device()
    failure: EngineError | None = None
    for entry in entries:
        path = store.resolve_path(entry)
        try:
            loader = functools.partial(FaceRestorer, path, model_id=entry.id, device=device)
            # The job's CodeFormer fidelity on a view of the cached network (others ignore it).
            restorer = load_cached(f"restore:{entry.id}", path, loader)
            return restorer.at_fidelity(call.payload.get("face_fidelity"))
        except EngineError as exc:
            log.warning("face restorer %s unusable: %s", entry.id, exc)
            failure = exc
    assert failure is not None
    raise EngineError(f"no installed face restorer can be used: {failure}", code=failure.code)


def face_detector(call: EngineCall) -> Any:
    """What finds the faces to restore in a picture no face engine has looked at (upscale's
    output): the installed SCRFD detector when it loads (five landmarks, and robust), else the
    face engine's own detector (the weight-free one when the InsightFace models are not all in)."""
    from inference.faceswap.insight import ScrfdDetector  # heavy: cv2, onnxruntime

    store = model_store(call.settings)
    for entry in store.list(type="onnx"):
        path = store.resolve_path(entry)
        if entry.extra.get("role") == "face_detector" and path.is_file():
            try:
                return load_cached(f"face:scrfd:{entry.id}", path, functools.partial(ScrfdDetector, path))
            except EngineError as exc:
                log.warning("face detector %s unusable, using the face engine's: %s", entry.id, exc)
            break
    detector = face_engine(call).detector
    assert detector is not None  # every face engine is built with one
    return detector


def swap_enhancer(restorer: Any, counts: list[int]) -> Callable[[Any, Sequence[Any], Any], Any]:
    """The face engines' ``enhancer`` hook for ``restorer``: it restores the swapped faces inside
    the swap's region only, and appends how many it restored to ``counts`` (for the meta)."""

    def enhance(rgb: Any, faces: Sequence[Any], region: Any) -> Any:
        restored = restorer.restore(rgb, faces, within=region)
        counts.append(restored.faces)
        return restored.rgb

    return enhance


def _name_enhancers(
    result: EngineResult, upscaler_id: str | None, restorer: Any, counts: list[int]
) -> EngineResult:
    for output in result.images:
        output.meta["face_enhance"] = None if restorer is None else restorer.name
        output.meta["faces_restored"] = sum(counts)
    return _name_upscaler(result, upscaler_id)


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
    restorer = face_restorer(call)
    counts: list[int] = []
    engine = face_engine(call)
    started = time.perf_counter()
    result = engine.faceswap(
        call.images["source_url"],
        call.images["target_url"],
        max_side=p["max_side"],
        sharpen=p["sharpen"],
        max_faces=p["max_faces"],
        upscaler=upscaler,
        control=call.control,
        enhancer=None if restorer is None else swap_enhancer(restorer, counts),
    )
    # The engine call alone, as the GPU bench's ratio (a) compares it with the raw call.
    for output in result.images:
        output.meta.setdefault("timing", {})["engine_s"] = round(time.perf_counter() - started, 6)
    return _name_enhancers(result, upscaler_id, restorer, counts)


def run_faceswap_multi(call: EngineCall) -> EngineResult:
    p = call.payload
    sources = call.images["source_urls"]
    upscaler, upscaler_id = face_upscaler(call)
    restorer = face_restorer(call)
    counts: list[int] = []
    result = face_engine(call).faceswap_multi(
        sources,
        call.images["target_url"],
        p.get("swap_faces_index") or [0] * len(sources),
        p.get("target_faces_index") or list(range(len(sources))),
        max_side=p["max_side"],
        sharpen=p["sharpen"],
        upscaler=upscaler,
        control=call.control,
        enhancer=None if restorer is None else swap_enhancer(restorer, counts),
    )
    return _name_enhancers(result, upscaler_id, restorer, counts)


def run_faceswap_video(call: EngineCall) -> EngineResult:
    """faceswap or faceswap_multi's mapping over every frame of the target video, into an MP4
    scratch file that the task layer stores and deletes."""
    from inference.faceswap.video import VideoFaceSwapper  # heavy: cv2, PyAV

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


RUNS: dict[str, Callable[[EngineCall], EngineResult]] = {
    "face_detect": run_face_detect,
    "faceswap": run_faceswap,
    "faceswap_multi": run_faceswap_multi,
    "faceswap_video": run_faceswap_video,
}


def run_face_task(call: EngineCall) -> EngineResult:
    return RUNS[call.task](call)


ENGINE = Engine(
    name="faces",
    queue="gpu.faceswap",
    tasks=(
        LocalTask("face_detect", "Detect faces and return their indices and boxes", predict_seconds=1.0),
        LocalTask(
            "faceswap",
            "Swap one source face onto every face of the target",
            predict_seconds=4.0,
            blocking_path="/faceswap",
        ),
        LocalTask(
            "faceswap_multi", "Swap several source faces onto chosen target faces", predict_seconds=6.0
        ),
        LocalTask(
            "faceswap_video",
            "Swap faces in every frame of a video, its audio kept",
            soft_time_limit=1800,
            time_limit=1860,
            blocking_path="/faceswap/video",
        ),
    ),
    run=run_face_task,
    warmup=("inference.faceswap.landmark", "inference.faceswap.insight"),
)
