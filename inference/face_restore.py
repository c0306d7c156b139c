"""Face restoration: GFPGAN, RestoreFormer and CodeFormer weight files, read by spandrel, applied to the faces
of a picture (``upscale``'s output, a face swap's swapped faces) when a payload asks
``face_enhance``.

The pipeline is the one GFPGAN made the norm (facexlib's restore helper), written here around the
platform's own face records:

1. faces come from the platform's detectors (SCRFD when installed, else mediapipe's mesh, else
   the Haar cascades), each with five landmarks (eyes, nose tip, mouth corners; two, the eyes,
   from the Haar engine);
2. each face is aligned onto the FFHQ five-point template of a 512 px square by a least-squares
   similarity (``faces.similarity_transform``): the crop the networks were trained on;
3. the network restores the square (all of an image's faces in one batch);
4. the square is warped back and blended in through its own mask, eroded and blurred, so only the
   face's neighbourhood changes and pixels outside the square keep their values exactly.

spandrel reads the architectures' ``.pth``/``.safetensors`` files with its allow-listed
unpickler. GFPGAN is called on its bare network, not through spandrel's descriptor: the descriptor
feeds the [0, 1] image straight in, while GFPGAN was trained on [-1, 1] and answers in [-1, 1]
(with [0, 1] input it paints grey noise over the face); StyleGAN's noise inputs are the ones
stored with the weights (``randomize_noise=False``), so a restoration is repeatable. RestoreFormer's
descriptor normalises for itself.

CodeFormer is read only where the optional ``spandrel_extra_arches`` is installed (CodeFormer's
licence is non-commercial: the operator chooses the ``faces-noncommercial`` extra); the loader
registers its architectures once (``inference.spandrel_files``). Like GFPGAN it works in [-1, 1]
and is called on its bare network, with its fidelity weight ``w`` (``face_fidelity``: 0 favours
the codebook's clean face, 1 the input's identity; CodeFormer's own default 0.5), which the
descriptor has no way to pass. The other architectures have no such knob and ignore it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from inference.base import EngineError, InvalidInput, NullControl, RunControl, check_stop
from inference.faceswap.blending import alpha_blend, feather
from inference.faceswap.engine import fit_max_side
from inference.faceswap.faces import Detector, Face, similarity_transform
from inference.spandrel_files import load_descriptor

log = logging.getLogger(__name__)

# spandrel architecture id -> the name results carry (``gfpgan:<model id>``).
ARCHS = {"GFPGAN": "gfpgan", "RestoreFormer": "restoreformer", "CodeFormer": "codeformer"}
CROP = 512
# CodeFormer's fidelity weight w when the payload gives none: its own inference script's default.
DEFAULT_FIDELITY = 0.5
# FFHQ's five points (eyes, nose tip, mouth corners, the viewer's left first) in the 512 px
# aligned square both networks were trained on: the template facexlib aligns GFPGAN's input to.
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.19360],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    np.float64,
)
# A face whose aligned square covers fewer pixels than this in the picture is left alone: the
# network would invent a face from a few pixels, and nobody sees the difference at that size.
MIN_FACE_SIDE = 24
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


@dataclass
class Restored:
    """The picture with its faces restored, the soft alpha of what changed, and how many faces."""

    rgb: np.ndarray
    region: np.ndarray
    faces: int


class FaceRestorer:
    """A GFPGAN, RestoreFormer or CodeFormer network, loaded once; ``restore`` puts restored faces
    into a picture.

    ``dtype`` defaults to float16 on CUDA where the architecture supports it, else bfloat16 where
    the device does (spandrel marks all three as not float16-safe), else float32; on the CPU
    always float32. ``max_batch`` bounds the faces one forward pass takes. ``fidelity`` is
    CodeFormer's ``w`` in [0, 1] (``at_fidelity`` gives a view of a loaded restorer with another).
    """

    fidelity: float = DEFAULT_FIDELITY

    def __init__(
        self,
        model_path: str | Path,
        *,
        model_id: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        max_batch: int = 4,
    ):
        path = Path(model_path)
        self.model_id = model_id or path.stem
        self.device = torch.device(device)
        self.max_batch = max_batch
        descriptor = _load_descriptor(path)
        self.arch = descriptor.architecture.id
        if dtype is None:
            dtype = torch.float32
            if self.device.type == "cuda":
                if descriptor.supports_half:
                    dtype = torch.float16
                elif descriptor.supports_bfloat16 and torch.cuda.is_bf16_supported():
                    dtype = torch.bfloat16
        try:
            descriptor = descriptor.to(self.device).to(dtype).eval()
        except Exception as exc:  # spandrel's UnsupportedDtypeError, torch's RuntimeError
            raise EngineError(f"cannot place {self.model_id} on {self.device} as {dtype}: {exc}") from exc
        self.dtype = dtype
        self._descriptor = descriptor
        # The bare network, which the model cache measures and GFPGAN is called through.
        self.network: torch.nn.Module = descriptor.model

    @property
    def name(self) -> str:
        return f"{ARCHS[self.arch]}:{self.model_id}"

    def at_fidelity(self, fidelity: float | None) -> FaceRestorer:
        """This restorer (the same loaded network) restoring at CodeFormer fidelity ``fidelity``
        (None: the default): a job's own setting, which never changes the cached restorer."""
        fidelity = DEFAULT_FIDELITY if fidelity is None else float(fidelity)
        if not 0.0 <= fidelity <= 1.0:
            raise InvalidInput(f"face_fidelity must be in [0, 1], got {fidelity}", field="face_fidelity")
        if fidelity == self.fidelity:
            return self
        view = copy.copy(self)
        view.fidelity = fidelity
        return view

    @property
    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.network.parameters())

    def restore_crops(self, crops: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Restore aligned 512x512x3 uint8 RGB face squares; returns them in the same form."""
        out: list[np.ndarray] = []
        for start in range(0, len(crops), self.max_batch):
            batch = np.stack(crops[start : start + self.max_batch])
            x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).contiguous()
            x = x.to(self.dtype) / 255.0
            with torch.inference_mode():
                if self.arch == "GFPGAN":
                    y = self.network(x * 2 - 1, return_rgb=False, randomize_noise=False)[0]
                    y = (y + 1) / 2
                elif self.arch == "CodeFormer":
                    y = self.network(x * 2 - 1, weight=self.fidelity)[0]
                    y = (y + 1) / 2
                else:
                    y = self._descriptor(x)
                y = (y.float().clamp(0, 1) * 255).round().to(torch.uint8)
            out.extend(y.permute(0, 2, 3, 1).cpu().numpy())
        return out

    def restore(
        self,
        rgb: np.ndarray,
        faces: Sequence[Face],
        *,
        within: np.ndarray | None = None,
        control: RunControl | None = None,
    ) -> Restored:
        """``rgb`` (HxWx3 uint8) with each face of ``faces`` (found in ``rgb``'s own pixels)
        restored. ``within`` (HxW float in [0, 1]) limits the change to a region (a swap's faces).
        Faces without landmarks or too small to matter are left as they are."""
        control = control or NullControl()
        height, width = rgb.shape[:2]
        squares = []
        for face in faces:
            if face.kps is None or len(face.kps) < 2:
                continue
            matrix = similarity_transform(face.kps, FFHQ_TEMPLATE_512[: len(face.kps)])
            # The matrix scales the picture's face onto the 512 square; its side in the picture:
            side = CROP / float(np.hypot(matrix[0, 0], matrix[0, 1]))
            if side < MIN_FACE_SIDE:
                continue
            # Reflected borders: FFHQ's own alignment pads faces at the picture's edge that way.
            crop = cv2.warpAffine(
                rgb, matrix, (CROP, CROP), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
            )
            squares.append((matrix, crop))
        region = np.zeros((height, width), np.float32)
        if not squares:
            return Restored(rgb, region, 0)
        check_stop(control)
        restored = self.restore_crops([crop for _, crop in squares])
        out = rgb.copy()
        for (matrix, _), face_square in zip(squares, restored, strict=True):
            check_stop(control)
            _paste(out, region, matrix, face_square, within)
        return Restored(out, region, len(squares))

    def restore_image(
        self,
        image: Image.Image,
        detector: Detector,
        *,
        detect_side: int = 1080,
        field: str = "face_enhance",
        control: RunControl | None = None,
    ) -> tuple[Image.Image, int]:
        """``image`` with its faces found by ``detector`` (on a copy shrunk to ``detect_side``)
        and restored; its mode and alpha kept. Returns it and the number of faces restored."""
        check_restorable(image, field)
        alpha = image.getchannel("A") if "A" in image.getbands() else None
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
        small = fit_max_side(rgb, detect_side)
        faces = [face.scaled(rgb.shape[1] / small.shape[1]) for face in detector.detect(small)]
        result = self.restore(rgb, faces, control=control)
        if result.faces == 0:
            return image, 0
        out = Image.fromarray(result.rgb)
        if image.mode in ("L", "LA"):
            out = out.convert("L")
        if alpha is not None:
            out = out.convert("LA" if image.mode == "LA" else "RGBA")
            out.putalpha(alpha)
        return out, result.faces


def check_restorable(image: Image.Image, field: str = "face_enhance") -> None:
    """Refuse (``InvalidInput`` naming ``field``) a picture face restoration cannot work on: the
    networks take 8-bit colour, so 16-bit and float pictures are refused rather than truncated."""
    if image.mode in _16BIT_MODES:
        raise InvalidInput("face_enhance works on 8-bit images only", field=field)


def _paste(
    out: np.ndarray,
    region: np.ndarray,
    matrix: np.ndarray,
    face_square: np.ndarray,
    within: np.ndarray | None,
) -> None:
    """Blend a restored square back into ``out`` (in place) where its aligned crop came from,
    and record the soft alpha of the change in ``region``."""
    height, width = out.shape[:2]
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0, 1], [CROP, 0, 1], [0, CROP, 1], [CROP, CROP, 1]], np.float64) @ inverse.T
    x0, y0 = np.floor(corners.min(axis=0)).astype(int)
    x1, y1 = np.ceil(corners.max(axis=0)).astype(int)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    if x1 - x0 < 4 or y1 - y0 < 4:
        return
    # Only the square's bounding box in the picture is warped: a 4x upscale is tens of
    # megapixels, and each face touches a small part of it.
    inverse[:, 2] -= (x0, y0)
    size = (x1 - x0, y1 - y0)
    face_roi = cv2.warpAffine(
        face_square, inverse, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    mask = cv2.warpAffine(
        np.full((CROP, CROP), 255, np.uint8), inverse, size, flags=cv2.INTER_NEAREST, borderValue=0
    )
    # As GFPGAN's paste: the edge fades over a tenth of the face's size, inside the square.
    face_px = float(np.sqrt(max(cv2.countNonZero(mask), 1)))
    alpha = feather(mask, max(2, int(0.1 * face_px)))
    if within is not None:
        alpha = alpha * within[y0:y1, x0:x1]
    out[y0:y1, x0:x1] = alpha_blend(face_roi, out[y0:y1, x0:x1], alpha)
    np.maximum(region[y0:y1, x0:x1], alpha, out=region[y0:y1, x0:x1])


def _load_descriptor(path: Path) -> Any:
    return load_descriptor(path, what="face restoration", archs=ARCHS)
