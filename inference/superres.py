"""Neural super-resolution with the Real-ESRGAN family of models.

Weights are read with spandrel rather than the ``realesrgan`` package: spandrel recognises the
RRDB (``RealESRGAN_x4plus``, ``RealESRGAN_x2plus``, ``RealESRGAN_x4plus_anime_6B``) and compact
(``realesr-general-x4v3``) checkpoints by their state-dict keys, unwraps ``params_ema`` /
``params``, unpickles with an allow-list, and imports nothing that current torchvision removed.
``realesrgan`` 0.3.0 imports ``torchvision.transforms.functional_tensor`` (gone from torchvision)
and drags in basicsr, whose source build needs ``--no-build-isolation``; the inference it adds on
top of the network (tiling, alpha, 16-bit) is reimplemented here where it can be tested.

The model always runs at its native factor; an asked ``scale`` in (1, 4] is then reached with an
antialiased Lanczos resize, as Real-ESRGAN's own ``outscale`` does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from inference.base import (
    EngineError,
    EngineResult,
    InvalidInput,
    NullControl,
    OutputImage,
    RunControl,
    check_stop,
)
from inference.lanczos import LanczosUpscaler, capped_size
from inference.spandrel_files import load_descriptor
from inference.superres_tensors import DevicePass

log = logging.getLogger(__name__)

BACKEND = "realesrgan"

# spandrel architecture ids that make up the Real-ESRGAN family; anything else spandrel can read
# (SwinIR, HAT, ...) is refused so ``backend`` never names an engine that did not run.
_FAMILY_ARCHS = {"ESRGAN": "rrdb", "Compact": "compact"}

# Best first for general photos. The anime model is tuned for flat line art and smears photo
# texture, so it is only the default when nothing else is installed.
MODEL_PREFERENCE = (
    "RealESRGAN_x4plus",
    "realesr-general-x4v3",
    "RealESRGAN_x2plus",
    "RealESRGAN_x4plus_anime_6B",
)
_X2_MODEL = "RealESRGAN_x2plus"

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


@dataclass(frozen=True)
class UpscaleRequest:
    """One image of a batch, with its own asked scale."""

    image: Image.Image
    scale: float
    face_enhance: bool = False


@dataclass
class _Prepared:
    """A checked, decoded request: what the network pass and the finishing step need."""

    scale: float
    face_enhance: bool
    width: int
    height: int
    capped: bool
    color: np.ndarray  # HxWx3 or HxW (grey) uint8, or HxW float32 in [0, 1] for 16-bit grey
    alpha: np.ndarray | None  # HxW uint8
    out_mode: str
    model_alpha: bool
    # The colour comes back from the device as final uint8 pixels (see _prepare).
    quantize: bool


class FaceRestorer(Protocol):
    """A face-restoration model (GFPGAN, CodeFormer, ...) applied to the upscaled RGB image."""

    name: str

    def __call__(self, image: Image.Image) -> Image.Image:
        """Return an image of the same size with the faces in it restored."""


class Upscaler:
    """Upscale an image by ``scale`` in (1, 4] with a Real-ESRGAN-family model.

    The model is loaded once in ``__init__`` and reused for every call. ``tile_size`` bounds the
    input area the network sees at once (``None`` never tiles); each tile is extended by
    ``tile_overlap`` input pixels on every side and only its centre is kept, so the network sees
    the same neighbourhood as in an untiled run and no seams appear. ``channels_last`` and
    ``cudnn_benchmark`` apply on CUDA only (see ``DevicePass``).
    """

    name = BACKEND

    def __init__(
        self,
        model_path: str | Path,
        *,
        model_id: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        tile_size: int | None = 512,
        tile_overlap: int = 32,
        max_side: int = 8192,
        min_side: int = 8,
        max_native_pixels: int = 100_000_000,
        alpha_upsampler: str = "model",
        face_restorer: FaceRestorer | None = None,
        channels_last: bool = True,
        cudnn_benchmark: bool = True,
    ):
        if tile_size is not None and tile_size < 16:
            raise ValueError(f"tile_size must be at least 16 or None, got {tile_size}")
        if tile_overlap < 0:
            raise ValueError(f"tile_overlap must be >= 0, got {tile_overlap}")
        if alpha_upsampler not in ("model", "lanczos"):
            raise ValueError(f"alpha_upsampler must be 'model' or 'lanczos', got {alpha_upsampler!r}")
        path = Path(model_path)
        self.model_id = model_id or path.stem
        self.device = torch.device(device)
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.max_side = max_side
        self.min_side = min_side
        self.max_native_pixels = max_native_pixels
        self.alpha_upsampler = alpha_upsampler
        self.face_restorer = face_restorer

        descriptor = _load_descriptor(path)
        if dtype is None:
            # fp16 halves memory and roughly doubles throughput on CUDA; CPU kernels for half are
            # slow or missing, so CPU stays in fp32 unless the caller asks otherwise.
            use_half = self.device.type == "cuda" and descriptor.supports_half
            dtype = torch.float16 if use_half else torch.float32
        try:
            descriptor = descriptor.to(self.device).to(dtype).eval()
        except Exception as exc:  # spandrel raises its own UnsupportedDtypeError, torch RuntimeError
            raise EngineError(f"cannot place {self.model_id} on {self.device} as {dtype}: {exc}") from exc
        self.dtype = dtype
        # The bare network too, so a memory-bounded cache that looks for modules can measure it.
        self.network: torch.nn.Module = descriptor.model
        self.arch = _FAMILY_ARCHS[descriptor.architecture.id]
        self.native_scale: int = descriptor.scale
        self._pass = DevicePass(
            descriptor,
            device=self.device,
            dtype=dtype,
            scale=self.native_scale,
            channels_last=channels_last,
            cudnn_benchmark=cudnn_benchmark,
        )
        if self._pass.channels_last:
            # Both RRDB and compact are plain conv stacks: NHWC weights let cuDNN run them on
            # tensor cores without reordering every activation.
            self.network.to(memory_format=torch.channels_last)

    @property
    def backend(self) -> str:
        return f"{BACKEND}:{self.model_id}"

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the weights, for a memory-bounded model cache."""
        return sum(p.numel() * p.element_size() for p in self.network.parameters())

    def __call__(
        self,
        image: Image.Image,
        scale: float,
        *,
        face_enhance: bool = False,
        control: RunControl | None = None,
    ) -> EngineResult:
        control = control or NullControl()
        started = self._start_timing()
        job = self._prepare(UpscaleRequest(image, scale, face_enhance))
        color_span = (5.0, 50.0) if job.model_alpha else (5.0, 90.0)
        control.progress(color_span[0])
        native, tiles = self._upscale_plane(job.color, job.quantize, control, color_span)
        alpha_native = None
        if job.model_alpha:
            assert job.alpha is not None
            alpha_native, alpha_tiles = self._upscale_plane(job.alpha, False, control, (50.0, 90.0))
            tiles += alpha_tiles
        result = self._finish(job, native, alpha_native, tiles=tiles, batch_size=1, control=control)
        result.images[0].meta["timing"] = self._timing(started)
        control.progress(100)
        return result

    def upscale_batch(
        self,
        requests: Sequence[UpscaleRequest],
        *,
        max_batch: int = 8,
        control: RunControl | None = None,
    ) -> list[EngineResult | EngineError]:
        """Upscale several images, stacking same-size ones into one forward pass.

        Images that fit in one tile are grouped by size and run ``max_batch`` at a time as one
        (N, 3, H, W) tensor: on a GPU one large launch keeps the device busy where N small ones
        leave it idle between kernels. Larger images run alone, tiled as in ``__call__``. Each
        request gets its own outcome: the result, or the ``EngineError`` that refused it, so one
        bad image does not fail the others. ``Cancelled`` (and engine crashes) end the whole call.
        """
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        control = control or NullControl()
        started = self._start_timing()
        outcomes: list[EngineResult | EngineError | None] = [None] * len(requests)
        jobs: dict[int, _Prepared] = {}
        for index, request in enumerate(requests):
            try:
                jobs[index] = self._prepare(request)
            except EngineError as exc:
                outcomes[index] = exc
        # Planes that go through the network: each image's colour, and its alpha when it varies.
        planes: list[tuple[int, str, np.ndarray, bool]] = []
        for index, job in jobs.items():
            planes.append((index, "color", job.color, job.quantize))
            if job.model_alpha:
                assert job.alpha is not None
                planes.append((index, "alpha", job.alpha, False))
        by_size: dict[tuple[int, int], list[tuple[int, str, np.ndarray, bool]]] = {}
        alone = []
        for plane in planes:
            if self.tile_size is None or max(plane[2].shape[:2]) <= self.tile_size:
                by_size.setdefault(plane[2].shape[:2], []).append(plane)
            else:
                alone.append(plane)
        chunks = [
            group[k : k + max_batch] for group in by_size.values() for k in range(0, len(group), max_batch)
        ]
        steps = len(chunks) + len(alone)
        native: dict[tuple[int, str], np.ndarray] = {}
        tiles: dict[int, int] = dict.fromkeys(jobs, 0)
        batch_sizes: dict[int, int] = dict.fromkeys(jobs, 1)
        control.progress(5)
        for done, chunk in enumerate(chunks):
            check_stop(control)
            outs = self._forward_batch([p[2] for p in chunk], [p[3] for p in chunk])
            for (index, kind, _, _), out in zip(chunk, outs, strict=True):
                native[index, kind] = out
                tiles[index] += 1
                if kind == "color":
                    batch_sizes[index] = len(chunk)
            control.progress(5 + 85 * (done + 1) / steps)
        for done, (index, kind, array, quantize) in enumerate(alone, start=len(chunks)):
            native[index, kind], count = self._upscale_plane(array, quantize, control, (5.0, 5.0))
            tiles[index] += count
            control.progress(5 + 85 * (done + 1) / steps)
        for index, job in jobs.items():
            try:
                outcomes[index] = self._finish(
                    job,
                    native[index, "color"],
                    native.get((index, "alpha")),
                    tiles=tiles[index],
                    batch_size=batch_sizes[index],
                    control=control,
                )
            except EngineError as exc:
                outcomes[index] = exc
        timing = self._timing(started)
        for outcome in outcomes:
            if isinstance(outcome, EngineResult):
                outcome.images[0].meta["timing"] = timing
        control.progress(100)
        return [outcome for outcome in outcomes if outcome is not None]

    def _start_timing(self) -> float:
        self._pass.reset_clock()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return time.perf_counter()

    def _timing(self, started: float) -> dict[str, float | int | None]:
        """Where the call's time went, for the benchmark and for operators reading job results:
        the whole engine call, the network passes within it, and the device's peak memory."""
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return {
            "engine_s": round(time.perf_counter() - started, 4),
            "forward_s": round(self._pass.forward_s, 4),
            "peak_device_bytes": peak,
        }

    def _prepare(self, request: UpscaleRequest) -> _Prepared:
        """Check one request up front (before any GPU work) and decode its image."""
        image, scale, face_enhance = request.image, request.scale, request.face_enhance
        if not 1 < scale <= 4:
            raise InvalidInput(f"scale must be in (1, 4], got {scale}", field="scale")
        if min(image.size) < self.min_side:
            raise InvalidInput(
                f"image {image.width}x{image.height} is too small; both sides must be at least "
                f"{self.min_side} px",
                field="image",
            )
        width, height, capped = capped_size(image.width, image.height, scale, self.max_side)
        native_pixels = image.width * image.height * self.native_scale**2
        if native_pixels > self.max_native_pixels:
            raise InvalidInput(
                f"image {image.width}x{image.height} is too large for the x{self.native_scale} model "
                f"({native_pixels} intermediate pixels, limit {self.max_native_pixels})",
                field="image",
            )
        if face_enhance and self.face_restorer is None:
            raise InvalidInput(
                "face_enhance needs a face-restoration model (e.g. GFPGAN or CodeFormer) and none is "
                "installed on this worker",
                field="face_enhance",
            )
        color, alpha, out_mode = _decode(image)
        if face_enhance and out_mode == "I;16":
            raise InvalidInput("face_enhance works on 8-bit images only", field="face_enhance")
        # As Real-ESRGAN does: a varying alpha plane goes through the network as a grey image,
        # which keeps cut-out edges as crisp as the colour edges.
        model_alpha = alpha is not None and self.alpha_upsampler == "model" and bool(np.ptp(alpha) > 0)
        # 8-bit colour wanted at the model's own size needs nothing after the network but rounding,
        # so that happens on the device and only uint8 comes back. Grey (its luma is taken on the
        # host), 16-bit and resized outputs come back as float32 for the finishing below.
        native_size = (image.width * self.native_scale, image.height * self.native_scale)
        quantize = color.dtype == np.uint8 and color.ndim == 3 and (width, height) == native_size
        return _Prepared(
            scale, face_enhance, width, height, capped, color, alpha, out_mode, model_alpha, quantize
        )

    def _finish(
        self,
        job: _Prepared,
        native: np.ndarray,
        alpha_native: np.ndarray | None,
        *,
        tiles: int,
        batch_size: int,
        control: RunControl,
    ) -> EngineResult:
        width, height = job.width, job.height
        if job.quantize:
            out = native  # final uint8 pixels already
        else:
            out = _resize(native @ _LUMA if job.color.ndim == 2 else native, width, height)
        out_alpha = None
        if job.alpha is not None:
            if alpha_native is not None:
                out_alpha = _resize(alpha_native @ _LUMA, width, height)
            elif np.ptp(job.alpha) == 0:
                # Fully opaque (or uniformly translucent) alpha, the common case for RGBA PNGs:
                # no need to spend a model pass on a constant.
                out_alpha = np.full((height, width), job.alpha.flat[0], dtype=np.uint8)
            else:
                out_alpha = _resize(_unit(job.alpha), width, height)
        result = _encode(out, out_alpha, job.out_mode)
        backend = self.backend
        if job.face_enhance:
            check_stop(control)
            assert self.face_restorer is not None  # refused in _prepare otherwise
            result = _restore_faces(result, self.face_restorer)
            backend = f"{backend}+{self.face_restorer.name}"
        meta = {
            "width": width,
            "height": height,
            "scale": job.scale,
            "native_scale": self.native_scale,
            "model": self.model_id,
            "arch": self.arch,
            "tiles": tiles,
            "batch_size": batch_size,
            "capped": job.capped,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        return EngineResult(backend=backend, images=[OutputImage(result, meta)])

    def _forward_batch(self, planes: list[np.ndarray], quantize: list[bool]) -> list[np.ndarray]:
        """One forward pass over same-size planes; halves the batch on CUDA out-of-memory."""
        try:
            return self._pass.run_batch(planes, quantize)
        except torch.OutOfMemoryError:
            if len(planes) == 1 or self.device.type != "cuda":
                raise
            log.warning("out of GPU memory with a batch of %s, splitting it", len(planes))
            torch.cuda.empty_cache()
            half = len(planes) // 2
            return self._forward_batch(planes[:half], quantize[:half]) + self._forward_batch(
                planes[half:], quantize[half:]
            )

    def _upscale_plane(
        self, plane: np.ndarray, quantize: bool, control: RunControl, span: tuple[float, float]
    ) -> tuple[np.ndarray, int]:
        """Run the network over one plane (see ``DevicePass``); returns the native-scale result."""
        tile_size = self.tile_size
        while True:
            try:
                return self._pass.run_tiled(
                    plane,
                    quantize=quantize,
                    tile_size=tile_size,
                    overlap=self.tile_overlap,
                    control=control,
                    span=span,
                )
            except torch.OutOfMemoryError:
                # A large image on a busy GPU: retry with smaller tiles instead of failing the
                # job; below 128 px tiles the overlap dominates and it is better to give up.
                smaller = (tile_size or max(plane.shape[:2])) // 2
                if smaller < 128 or self.device.type != "cuda":
                    raise
                log.warning("out of GPU memory with %s px tiles, retrying with %s", tile_size, smaller)
                torch.cuda.empty_cache()
                tile_size = smaller


def _load_descriptor(path: Path) -> Any:
    descriptor = load_descriptor(path, what="Real-ESRGAN", archs=_FAMILY_ARCHS)
    if descriptor.scale < 1:
        raise EngineError(f"{path.name} has no upscaling factor", code="invalid_model")
    return descriptor


def _decode(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Split an image into colour (HxW or HxWx3), alpha (HxW or None) and the output mode.

    8-bit planes stay uint8 (the device normalises them, see ``DevicePass``); 16-bit grey is
    normalised here, to float32 in [0, 1].
    """
    mode = image.mode
    if mode in _16BIT_MODES or mode == "I":
        # Pillow opens 16-bit greyscale PNG/TIFF as I;16 or, in older paths, as 32-bit "I".
        values = np.asarray(image).astype(np.float32)
        return np.clip(values / 65535.0, 0.0, 1.0), None, "I;16"
    if mode == "F":
        raise InvalidInput(
            "floating-point images are not supported; send an 8- or 16-bit image", field="image"
        )
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "1":
        image = image.convert("L")
    elif mode == "La":
        image = image.convert("LA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    array = np.array(image)  # writable: torch warns on the read-only array np.asarray gives
    if image.mode == "L":
        return array, None, "L"
    if image.mode == "LA":
        return np.ascontiguousarray(array[..., 0]), np.ascontiguousarray(array[..., 1]), "LA"
    if image.mode == "RGBA":
        return np.ascontiguousarray(array[..., :3]), np.ascontiguousarray(array[..., 3]), "RGBA"
    return array, None, "RGB"


def _unit(plane: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1]."""
    return plane.astype(np.float32) / 255.0


def _resize(plane: np.ndarray, width: int, height: int) -> np.ndarray:
    """Antialiased Lanczos resize of a float HxW or HxWxC array, done in float to avoid banding."""
    if plane.shape[1] == width and plane.shape[0] == height:
        return plane
    if plane.ndim == 2:
        return np.asarray(Image.fromarray(plane).resize((width, height), Image.Resampling.LANCZOS))
    return np.stack([_resize(plane[..., c], width, height) for c in range(plane.shape[2])], axis=2)


def _encode(color: np.ndarray, alpha: np.ndarray | None, mode: str) -> Image.Image:
    """Colour and alpha, each float32 in [0, 1] or final uint8 already, as an image."""
    if mode == "I;16":
        return Image.fromarray(_quantize(color, 65535, np.uint16))
    planes = [
        p if p.dtype == np.uint8 else _quantize(p, 255, np.uint8) for p in (color, alpha) if p is not None
    ]
    # Pillow infers L, LA, RGB or RGBA from the uint8 array's shape.
    return Image.fromarray(planes[0] if len(planes) == 1 else np.dstack(planes))


def _quantize(array: np.ndarray, top: int, dtype: type) -> np.ndarray:
    return np.clip(np.rint(array * top), 0, top).astype(dtype)


def _restore_faces(image: Image.Image, restorer: FaceRestorer) -> Image.Image:
    alpha = image.getchannel("A") if "A" in image.getbands() else None
    restored = restorer(image.convert("RGB"))
    if restored.size != image.size:
        raise EngineError(f"face restorer {restorer.name} changed the image size")
    if image.mode in ("L", "LA"):
        restored = restored.convert("L")
    if alpha is not None:
        restored = restored.convert("RGBA" if image.mode == "RGBA" else "LA")
        restored.putalpha(alpha)
    return restored


def choose_sr_model(
    candidates: Mapping[str, str | Path] | Iterable[tuple[str, str | Path]],
    *,
    scale: float | None = None,
) -> list[tuple[str, Path]]:
    """Installed candidates (model id, weight file), best first.

    A candidate is installed when its file exists. Known Real-ESRGAN ids rank by
    ``MODEL_PREFERENCE``; for ``scale`` <= 2 the x2 model comes first, because it runs its trunk
    on a quarter of the pixels and needs no downscale afterwards. Unknown ids rank after the
    general-purpose models and before the anime one.
    """
    items = candidates.items() if isinstance(candidates, Mapping) else candidates
    installed = [(model_id, Path(path)) for model_id, path in items if Path(path).is_file()]
    order = [_canonical(m) for m in MODEL_PREFERENCE]
    if scale is not None and scale <= 2:
        order.remove(_canonical(_X2_MODEL))
        order.insert(0, _canonical(_X2_MODEL))

    def rank(item: tuple[str, Path]) -> float:
        model_id = _canonical(item[0])
        return order.index(model_id) if model_id in order else len(order) - 1.5

    return sorted(installed, key=rank)


def _canonical(model_id: str) -> str:
    return model_id.lower().replace("-", "_")


def default_upscaler(
    candidates: Mapping[str, str | Path] | Iterable[tuple[str, str | Path]],
    *,
    scale: float | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    max_side: int = 8192,
    **upscaler_options,
) -> Upscaler | LanczosUpscaler:
    """The best installed SR model that loads, else the weight-free Lanczos engine."""
    for model_id, path in choose_sr_model(candidates, scale=scale):
        try:
            return Upscaler(
                path, model_id=model_id, device=device, dtype=dtype, max_side=max_side, **upscaler_options
            )
        except EngineError as exc:
            # A broken file must not take the whole upscale task down while others work.
            log.warning("skipping super-resolution model %s: %s", model_id, exc)
    return LanczosUpscaler(max_side=max_side)
