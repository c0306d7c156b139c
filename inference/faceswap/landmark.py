"""The fallback weight-free face engine: OpenCV Haar cascades, eye-based alignment, Poisson blending.

The dense-landmark engine (``mesh.py``, mediapipe's 468-point face mesh) is the weight-free
engine of a full install; this one serves where mediapipe cannot be imported (it is installed
with ``--no-deps`` outside the ``gpu`` extra, see the Makefile), and it is named for what it is.
It finds faces and eye centres with the Haar cascades OpenCV (< 5) ships inside its wheel, so it
needs nothing but OpenCV. Having no dense landmarks, its swap is a similarity warp fixed by the
two eyes (or by the face boxes when the eyes are not found), colour matched and Poisson-cloned
inside a feathered face oval: a faithful "paste this face there" for frontal faces, not an
identity-preserving neural swap.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from inference.base import EngineError
from inference.faceswap.blending import paste_face
from inference.faceswap.engine import DEFAULT_MAX_FACES, FaceSwapEngine
from inference.faceswap.faces import Face, drop_duplicates, expand_box, keep_largest, similarity_transform

BACKEND = "landmark-opencv-haar"


class FaceDetector:
    """Weight-free face detector: OpenCV's frontal-face and eye Haar cascades.

    Returns at most ``max_faces`` faces (the largest), in index order: left to right, then top
    to bottom (see ``order_faces``). Each face has a box, a score and, when both eyes were
    found where eyes belong, ``left_eye``/``right_eye`` landmarks. The score is the share of
    the cascade's overlapping hits that voted for the box, n / (n + min_neighbors): a relative
    confidence in (0, 1), not a calibrated probability.

    Detection runs on a copy shrunk to ``detect_side`` (Haar cost grows with pixel count);
    faces smaller than ``min_face`` pixels at that size are not found. The scale step of 1.05
    (not OpenCV's usual 1.1) costs about twice the time and finds faces the coarser pyramid
    skips between two levels; at 800 px it is ~0.15 s on one CPU core. The finer pyramid also
    gives every true face more overlapping hits, so ``min_neighbors`` is 8 rather than the
    usual 5: at 5 the astronaut photo's shoulder patch passes for a face.
    """

    name = "opencv-haar"

    def __init__(
        self,
        *,
        max_faces: int = DEFAULT_MAX_FACES,
        detect_side: int = 800,
        min_face: int = 32,
        scale_factor: float = 1.05,
        min_neighbors: int = 8,
    ):
        self.max_faces = max_faces
        self.detect_side = detect_side
        self.min_face = min_face
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        root = getattr(getattr(cv2, "data", None), "haarcascades", None)
        if root is None or not hasattr(cv2, "CascadeClassifier"):
            # OpenCV 5 dropped both the bundled cascades and the class.
            raise EngineError(
                "this OpenCV build ships no Haar cascades (needs opencv < 5)", code="backend_unavailable"
            )
        self._faces = cv2.CascadeClassifier(root + "haarcascade_frontalface_default.xml")
        self._eyes = cv2.CascadeClassifier(root + "haarcascade_eye.xml")
        if self._faces.empty() or self._eyes.empty():
            raise EngineError(f"Haar cascades missing under {root}", code="backend_unavailable")

    def detect(self, rgb: np.ndarray) -> list[Face]:
        height, width = rgb.shape[:2]
        scale = min(1.0, self.detect_side / max(height, width))
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if scale < 1:
            gray = cv2.resize(
                gray, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA
            )
        # Histogram equalisation makes the cascade far less sensitive to exposure.
        boxes, votes = self._faces.detectMultiScale2(
            cv2.equalizeHist(gray),
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(self.min_face, self.min_face),
        )
        candidates = []
        for (x, y, w, h), n in zip(
            np.asarray(boxes).reshape(-1, 4), np.asarray(votes).reshape(-1), strict=True
        ):
            eyes = self._find_eyes(gray, int(x), int(y), int(w), int(h))
            candidates.append(
                Face(
                    (x / scale, y / scale, (x + w) / scale, (y + h) / scale),
                    float(n) / (float(n) + self.min_neighbors),
                    None if eyes is None else eyes / scale,
                )
            )
        # The cascade's own grouping still leaves a face inside a larger face box now and then;
        # keep the better-voted one of any heavily overlapping pair (eyes found count first:
        # a box whose eyes sit where eyes belong is the real face).
        kept = drop_duplicates(candidates, rank=lambda f: (f.kps is not None, f.score))
        return keep_largest(kept, self.max_faces)

    def _find_eyes(self, gray: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray | None:
        """Eye centres (image-left first) inside a face box, or None when not plausible."""
        top, bottom = y + int(0.15 * h), y + int(0.58 * h)
        # Equalised per face: a frame-wide histogram is dominated by the background, which can
        # leave the eye region too flat for the eye cascade.
        roi = cv2.equalizeHist(gray[top:bottom, x : x + w])
        size = max(8, w // 8)
        eyes = self._eyes.detectMultiScale(
            roi, scaleFactor=1.1, minNeighbors=3, minSize=(size, size), maxSize=(w // 2, w // 2)
        )
        left = [e for e in np.asarray(eyes).reshape(-1, 4) if e[0] + e[2] / 2 < w / 2]
        right = [e for e in np.asarray(eyes).reshape(-1, 4) if e[0] + e[2] / 2 >= w / 2]
        if not left or not right:
            return None
        # The largest hit on each side: small hits inside the eye region are usually eyebrows
        # or nostrils.
        pick = [max(side, key=lambda e: e[2] * e[3]) for side in (left, right)]
        points = np.array([[x + e[0] + e[2] / 2, top + e[1] + e[3] / 2] for e in pick], np.float32)
        dx, dy = points[1] - points[0]
        if not 0.25 * w <= dx <= 0.7 * w or abs(dy) > 0.35 * dx:
            return None
        return points


class LandmarkFaceSwapper(FaceSwapEngine):
    """Weight-free face swap: Haar detection, eye alignment, colour match and seamless cloning.

    ``backend`` is ``landmark-opencv-haar``. See the module docstring for what it can and
    cannot do.
    """

    backend = BACKEND
    detector_class = FaceDetector

    def _prepare_source(self, rgb: np.ndarray, face: Face) -> Any:
        return rgb, face

    def _swap_face(self, rgb: np.ndarray, face: Face, source: Any) -> tuple[np.ndarray, np.ndarray]:
        source_rgb, source_face = source
        height, width = rgb.shape[:2]
        matrix = _alignment(source_face, face)
        # Work on a region around the target face only: warping and Poisson-solving the whole
        # frame for every face would cost seconds on a 1080p group photo.
        x0, y0, x1, y1 = expand_box(face, 1.8, width, height)
        roi_w, roi_h = x1 - x0, y1 - y0
        matrix[:, 2] -= (x0, y0)
        warped = cv2.warpAffine(
            source_rgb, matrix, (roi_w, roi_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )
        inside_source = cv2.warpAffine(
            np.full(source_rgb.shape[:2], 255, np.uint8),
            matrix,
            (roi_w, roi_h),
            flags=cv2.INTER_NEAREST,
            borderValue=0,
        )

        # The face oval: a Haar box spans brows to chin and cheek to cheek; the ellipse keeps
        # hair, ears and background of the source out of the target.
        oval = np.zeros((roi_h, roi_w), np.uint8)
        cx, cy = face.center[0] - x0, face.box[1] + 0.55 * face.height - y0
        axes = (max(2, int(0.40 * face.width)), max(2, int(0.50 * face.height)))
        cv2.ellipse(oval, (round(cx), round(cy)), axes, 0, 0, 360, 255, -1)
        mask = cv2.bitwise_and(oval, inside_source)
        return paste_face(rgb, (x0, y0, x1, y1), warped, mask, max(2, int(0.06 * face.width)))


def _alignment(source: Face, target: Face) -> np.ndarray:
    """2x3 similarity taking source-image points onto the target face."""
    if source.kps is not None and target.kps is not None:
        # The eyes fix rotation, scale and position; the box centres pull the estimate toward
        # the face as a whole so one misplaced eye hit cannot tilt the face by much.
        src = np.vstack([source.kps[:2], [source.center]])
        dst = np.vstack([target.kps[:2], [target.center]])
        return similarity_transform(src, dst)
    scale = target.width / max(source.width, 1e-6)
    (sx, sy), (tx, ty) = source.center, target.center
    return np.array([[scale, 0.0, tx - scale * sx], [0.0, scale, ty - scale * sy]])
