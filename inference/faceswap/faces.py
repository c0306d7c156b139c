"""The face record and its geometry: index order, duplicates, the largest faces, alignment.

``Face`` is what every detector returns (SCRFD, the mesh, the Haar cascades), in pixel
coordinates of the image it was found in; ``order_faces`` fixes the documented index order that
``face_detect`` reports and ``faceswap_multi`` takes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

# Names of the five points in the order SCRFD emits them and the ArcFace template expects them.
# "left"/"right" are as seen in the image (viewer's left), not the person's own left.
KEYPOINT_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


@dataclass(frozen=True)
class Face:
    """One detected face in pixel coordinates of the image it was found in.

    ``kps`` holds the first ``len(kps)`` points of ``KEYPOINT_NAMES``: five for SCRFD and the
    mesh engine, two (the eye centres) for the Haar engine when both eyes were found, else
    ``None``. ``mesh`` is the mesh engine's dense landmarks (468 x 2), else ``None``.
    """

    box: tuple[float, float, float, float]
    score: float
    kps: np.ndarray | None = None
    mesh: np.ndarray | None = None

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    def scaled(self, factor: float) -> Face:
        kps = None if self.kps is None else self.kps * factor
        mesh = None if self.mesh is None else self.mesh * factor
        x1, y1, x2, y2 = (v * factor for v in self.box)
        return Face((x1, y1, x2, y2), self.score, kps, mesh)

    def to_dict(self, index: int, width: int, height: int) -> dict[str, Any]:
        x1, y1, x2, y2 = self.box
        box = {
            "x1": int(np.clip(round(x1), 0, width)),
            "y1": int(np.clip(round(y1), 0, height)),
            "x2": int(np.clip(round(x2), 0, width)),
            "y2": int(np.clip(round(y2), 0, height)),
        }
        landmarks: dict[str, list[float]] = {}
        if self.kps is not None:
            for name, (x, y) in zip(KEYPOINT_NAMES, self.kps, strict=False):
                landmarks[name] = [round(float(x), 1), round(float(y), 1)]
        return {"index": index, "box": box, "score": round(float(self.score), 4), "landmarks": landmarks}


class Detector(Protocol):
    def detect(self, rgb: np.ndarray) -> list[Face]: ...


def order_faces(faces: Sequence[Face]) -> list[Face]:
    """Put faces in the documented index order: left to right, then top to bottom.

    Sorting on the raw x of each centre would let a pixel of detector jitter decide the order of
    two faces stacked one above the other. So faces are first grouped into columns: walking
    left to right, a face joins the current column while its centre lies within half the median
    face width of the column's first face; columns are numbered left to right and faces inside
    a column top to bottom. The grouping is a partition of the sorted list, so the order is
    total and deterministic.
    """
    if not faces:
        return []
    by_x = sorted(faces, key=lambda f: (f.center[0], f.center[1]))
    tolerance = 0.5 * float(np.median([f.width for f in faces]))
    columns: list[list[Face]] = [[by_x[0]]]
    for face in by_x[1:]:
        if face.center[0] - columns[-1][0].center[0] <= tolerance:
            columns[-1].append(face)
        else:
            columns.append([face])
    return [face for column in columns for face in sorted(column, key=lambda f: f.center[1])]


def box_overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over the smaller box: 1.0 when one box lies inside the other.

    Plain IoU misses a detector's typical duplicate, a small box on the lower half of a face
    inside the full face box; two real faces never overlap that much.
    """
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / smaller if smaller > 0 else 0.0


def drop_duplicates(faces: Sequence[Face], rank: Callable[[Face], Any]) -> list[Face]:
    """Of any two faces whose boxes overlap by half (``box_overlap``), keep the higher ``rank``.

    For a detector's duplicate hits on one face; returns the kept faces, best ranked first.
    """
    kept: list[Face] = []
    for face in sorted(faces, key=rank, reverse=True):
        if all(box_overlap(face.box, k.box) < 0.5 for k in kept):
            kept.append(face)
    return kept


def keep_largest(faces: Sequence[Face], limit: int) -> list[Face]:
    """The ``limit`` largest faces (ties broken by score), in index order.

    Large faces are the ones a person means; capping by size rather than by position keeps a
    small false positive at the left edge from taking a slot.
    """
    ranked = sorted(faces, key=lambda f: (f.area, f.score), reverse=True)[:limit]
    return order_faces(ranked)


def expand_box(face: Face, factor: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The face box grown by ``factor`` about its centre, clipped to the image, as ints."""
    cx, cy = face.center
    half_w, half_h = face.width * factor / 2, face.height * factor / 2
    x0 = int(max(0, np.floor(cx - half_w)))
    y0 = int(max(0, np.floor(cy - half_h)))
    x1 = int(min(width, np.ceil(cx + half_w)))
    y1 = int(min(height, np.ceil(cy + half_h)))
    return x0, y0, x1, y1


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift) taking ``src`` points to ``dst``.

    Umeyama's closed form, the estimate the ArcFace/inswapper alignment was trained with. It is
    used instead of ``cv2.estimateAffinePartial2D`` because that one is a robust (RANSAC/LMedS)
    estimator: with five landmarks it may drop a point, and with two (the Haar eyes) it has no
    sample to vote with. Returns the 2x3 matrix for ``cv2.warpAffine``.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1, 1] = -1  # a reflection is not a similarity; flip the weakest axis instead
    rotation = u @ d @ vt
    var = (src_c**2).sum() / len(src)
    scale = (s * np.diag(d)).sum() / var if var > 0 else 1.0
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix
