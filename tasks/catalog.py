"""Every task the platform knows: its queue, payload schema, input fields and time limits.

``engine`` names the adapter in ``tasks/engines.py`` that runs it; a task whose engine has not
been built yet is still listed (the capabilities endpoint says it is not installed) and the API
refuses it with a clear error instead of queueing a job that can never run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict

from marshmallow import Schema

from config import Settings
from config.routes import Routes
from tasks import payloads as p
from tasks.outbound import UrlPolicy


@dataclass(frozen=True)
class TaskSpec:
    name: str
    queue: str
    schema: type[Schema]
    # Payload fields that hold input images (a list field holds several).
    inputs: tuple[str, ...]
    summary: str
    engine: str | None = None
    soft_time_limit: int = 600
    time_limit: int = 660
    debug_only: bool = False
    # Model types one of which must be in the model store for the task to run (empty: none needed).
    model_types: tuple[str, ...] = ()
    # Input fields (among ``inputs``) that hold a video rather than an image.
    videos: tuple[str, ...] = ()
    # Served only through a route whose backends include a remote provider (no local engine).
    remote_only: bool = False
    # What the task makes: "image" (outputs checked and stored as images) or "video" (an MP4).
    output: str = "image"

    @property
    def available(self) -> bool:
        return self.engine is not None


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "upscale",
            "gpu.superres",
            p.UpscalePayload,
            ("image_url",),
            "Upscale an image by 1-4x",
            engine="upscale",
            soft_time_limit=300,
            time_limit=330,
        ),
        TaskSpec(
            "generate",
            "gpu.diffusion",
            p.GeneratePayload,
            ("image_url",),
            "Text-to-image and img2img diffusion",
            engine="diffusion",
            model_types=("diffusers",),
        ),
        TaskSpec(
            "inpaint",
            "gpu.diffusion",
            p.InpaintPayload,
            ("image_url", "mask_url"),
            "Repaint the masked region from a prompt",
            engine="diffusion",
            model_types=("diffusers",),
        ),
        TaskSpec(
            "remove_object",
            "gpu.diffusion",
            p.RemoveObjectPayload,
            ("image_url", "mask_url"),
            "Erase the masked object and fill the background",
            engine="diffusion",
            model_types=("diffusers",),
        ),
        TaskSpec(
            "outpaint",
            "gpu.diffusion",
            p.OutpaintPayload,
            ("image_url",),
            "Extend an image to a larger canvas",
            engine="diffusion",
            model_types=("diffusers",),
        ),
        TaskSpec(
            "remove_background",
            "gpu.vision",
            p.RemoveBackgroundPayload,
            ("image_url",),
            "Cut out the foreground as a PNG with alpha",
            engine="remove_background",
        ),
        TaskSpec(
            "scan_objects",
            "gpu.vision",
            p.ScanObjectsPayload,
            ("image_url",),
            "Detect objects and return boxes as JSON",
            engine="scan_objects",
            model_types=("detector",),
        ),
        TaskSpec(
            "face_detect",
            "gpu.faceswap",
            p.FaceDetectPayload,
            ("image_url",),
            "Detect faces and return their indices and boxes",
            engine="face_detect",
        ),
        TaskSpec(
            "faceswap",
            "gpu.faceswap",
            p.FaceswapPayload,
            ("source_url", "target_url"),
            "Swap one source face onto every face of the target",
            engine="faceswap",
        ),
        TaskSpec(
            "faceswap_multi",
            "gpu.faceswap",
            p.FaceswapMultiPayload,
            ("source_urls", "target_url"),
            "Swap several source faces onto chosen target faces",
            engine="faceswap_multi",
        ),
        TaskSpec(
            "faceswap_video",
            "gpu.faceswap",
            p.FaceswapVideoPayload,
            ("source_url", "source_urls", "target_url"),
            "Swap faces in every frame of a video, its audio kept",
            engine="faceswap_video",
            soft_time_limit=1800,
            time_limit=1860,
            videos=("target_url",),
        ),
        TaskSpec(
            "ahv_video",
            "cpu",
            p.AhvVideoPayload,
            ("image_url",),
            "Video generation (text or image to video) through a configured remote provider",
            remote_only=True,
            output="video",
        ),
        TaskSpec(
            "debug_sleep",
            "gpu.diffusion",
            p.DebugSleepPayload,
            (),
            "Diagnostics: sleep with progress, optionally kill the worker",
            engine="debug_sleep",
            debug_only=True,
            soft_time_limit=620,
            time_limit=650,
        ),
    )
}

# Seed 000's task names and endpoint spellings, mapped onto our tasks.
ALIASES: dict[str, str] = {
    "ahv_image": "generate",
    "remove-object": "remove_object",
    "remove_obj": "remove_object",
    "scan-objects": "scan_objects",
    "scan_obj": "scan_objects",
    "remove-background": "remove_background",
    "face-detect": "face_detect",
}

# Seed 000 tasks served by remote providers in the AHV orchestrator; they run here only through a
# configured route (AIORCH_ROUTES_FILE) whose backends include a provider.
REMOTE_ONLY = {
    "gg_image": "Image generation through a configured remote provider",
    "cx_image": "Image generation through a configured remote provider",
}
# The task whose payload schema and local queue a routed remote-only name takes. (ahv_video is a
# task of its own, ``remote_only``: no local task generates video; faceswap_video edits one.)
REMOTE_TARGETS = {"gg_image": "generate", "cx_image": "generate"}


class UnknownTask(LookupError):
    pass


class TaskUnavailable(LookupError):
    pass


def resolve(
    name: str,
    *,
    debug_tasks: bool = False,
    has_model: Callable[[TaskSpec], bool] | None = None,
    routes: Routes | None = None,
) -> TaskSpec:
    """The spec for a task name or alias; raises ``UnknownTask`` / ``TaskUnavailable``.

    ``has_model`` tells whether the model store holds a model the task needs; a task whose engine
    needs weights is unavailable until an operator installs some (``aiorch models add``).
    ``routes``: a task whose route starts with a remote provider runs without a local engine or
    model, and the remote-only seed names (``gg_image``, ...) exist only through a route.
    """
    canonical = REMOTE_TARGETS.get(name) or ALIASES.get(name, name)
    route = routes.for_task(name, canonical) if routes else None
    spec = TASKS.get(canonical)
    remote_only = name in REMOTE_ONLY or (spec is not None and spec.remote_only)
    if remote_only and (route is None or not route.has_remote):
        raise TaskUnavailable(f"task {name!r} needs a remote provider route, and none is configured")
    if spec is None or (spec.debug_only and not debug_tasks):
        raise UnknownTask(f"unknown task {name!r}")
    if route is not None and route.remote_first:
        return spec
    if not spec.available:
        raise TaskUnavailable(f"task {name!r} is known but its engine is not installed on this platform yet")
    if spec.model_types and has_model is not None and not has_model(spec):
        raise TaskUnavailable(
            f"task {name!r} needs a {' or '.join(spec.model_types)} model and none is installed "
            "(aiorch models add PATH)"
        )
    return spec


class TimeLimits(TypedDict):
    """``publish`` options: typed keys, so ``**`` cannot be mistaken for its other arguments."""

    soft_time_limit: int
    time_limit: int


def time_limits(spec: TaskSpec) -> TimeLimits:
    """The run task's limits for this task, sent with its message."""
    return {"soft_time_limit": spec.soft_time_limit, "time_limit": spec.time_limit}


def payload_schema(spec: TaskSpec, settings: Settings) -> Any:
    """The payload schema of ``spec`` under these settings (the SSRF guard's policy and
    AIORCH_MAX_FACES), for the API and the workers alike."""
    return _schema(spec, UrlPolicy.from_settings(settings), settings.max_faces)


@functools.lru_cache(maxsize=256)
def _schema(spec: TaskSpec, url_policy: UrlPolicy, max_faces: int) -> Any:
    # One instance per task and policy: building one costs more than loading with it, and
    # ``load`` keeps no state on the instance.
    return spec.schema(url_policy=url_policy, max_faces=max_faces)  # type: ignore[call-arg]


def known_names(debug_tasks: bool = False) -> list[str]:
    names = [n for n, s in TASKS.items() if debug_tasks or not s.debug_only]
    return sorted([*names, *ALIASES, *REMOTE_ONLY])


# Input references a worker reads without the network: checked on the run queue itself.
LOCAL_REFS = ("data:", "asset://")


def fetch_free(spec: TaskSpec, payload: dict[str, Any]) -> bool:
    """True when every input of the payload is a ``data:`` URI or a stored asset, and none is a
    video: such a job skips the prepare queue and its hop (its run task checks the inputs).
    Anything else, an http(s) URL above all, is fetched on the cpu queue, never on a GPU slot."""
    if spec.videos and any(payload.get(field) is not None for field in spec.videos):
        return False
    for field in spec.inputs:
        value = payload.get(field)
        for ref in value if isinstance(value, list) else [value]:
            if ref is not None and not (isinstance(ref, str) and ref.startswith(LOCAL_REFS)):
                return False
    return True
