"""The dense-landmark weight-free face engine: mediapipe's face mesh, a Delaunay warp, Poisson blending.

Faces are found by mediapipe's full-range face detector, then mediapipe's 468-point face mesh
is fitted to each one; both models ship inside the mediapipe 0.10.21 wheel, so the engine needs
no download and no model store. The source face is cut into the Delaunay triangles of its own
mesh and each triangle is mapped affinely onto the same three landmarks of the target face,
which follows the target's pose and expression far better than the Haar engine's one
similarity. The warped face is colour matched, Poisson-cloned inside the convex hull of the
target mesh and feathered (``blending.paste_face``, shared with the Haar engine). It moves pixels
of the source face; it is not an identity-preserving neural swap.

mediapipe 0.10.21 declares numpy < 2, protobuf < 5 and opencv-contrib-python, none of which it
needs at run time with this platform's numpy 2, protobuf 6 and opencv-python-headless, so it is
installed with ``--no-deps`` (Makefile, docker/Dockerfile.worker-gpu). When it cannot be
imported, ``inference.engines.faces.face_engine`` falls back to the Haar engine (``landmark.py``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from inference.base import EngineError
from inference.faceswap.blending import paste_face
from inference.faceswap.engine import DEFAULT_MAX_FACES, FaceSwapEngine
from inference.faceswap.faces import Face, drop_duplicates, expand_box, keep_largest

BACKEND = "landmark-mediapipe-mesh"
MESH_POINTS = 468

# Mesh vertices behind the five named keypoints (``KEYPOINT_NAMES``, the viewer's left first).
# In an unmirrored photo the person's right eye (mesh 33/133/159/145) is on the viewer's left.
_LEFT_EYE = [33, 133, 159, 145]
_RIGHT_EYE = [263, 362, 386, 374]
_NOSE_TIP = 1
_MOUTH_LEFT, _MOUTH_RIGHT = 61, 291


def _solutions() -> Any:
    """``mediapipe.solutions``, or ``backend_unavailable`` when mediapipe cannot be imported."""
    try:
        import mediapipe as mp  # deferred: the Haar fallback must import without it
    except Exception as exc:  # noqa: BLE001 - a wrong protobuf fails with AttributeError, not ImportError
        raise EngineError(f"mediapipe cannot be imported: {exc}", code="backend_unavailable") from exc
    return mp.solutions


def mesh_keypoints(mesh: np.ndarray) -> np.ndarray:
    """The five ``KEYPOINT_NAMES`` points (eye centres, nose tip, mouth corners) of a 468-point mesh."""
    return np.array(
        [
            mesh[_LEFT_EYE].mean(axis=0),
            mesh[_RIGHT_EYE].mean(axis=0),
            mesh[_NOSE_TIP],
            mesh[_MOUTH_LEFT],
            mesh[_MOUTH_RIGHT],
        ],
        np.float32,
    )


class MeshDetector:
    """Weight-free face detector with dense landmarks: mediapipe face detection + face mesh.

    The full-range detector (``model_selection=1``, faces up to ~5 m away, i.e. small faces in
    group photos; run on tiles of wide pictures, see ``_detections``) gives boxes and scores;
    the mesh is then fitted on a square crop of twice the
    box, where the face fills the frame as the mesh model expects. A detection the mesh cannot
    be fitted to is dropped: the mesh is what the swap warps, so a face without one could be
    reported by ``face_detect`` but never swapped, and the indices would then disagree.

    The box of a face is the bounding box of its mesh (the region a swap changes); the score is
    the detector's. At most ``max_faces`` faces (the largest), in index order (``order_faces``).
    mediapipe graphs are not thread-safe, so calls are serialised with a lock.
    """

    name = "mediapipe-mesh"

    def __init__(
        self, *, max_faces: int = DEFAULT_MAX_FACES, min_score: float = 0.5, crop_factor: float = 2.0
    ):
        solutions = _solutions()
        self.max_faces = max_faces
        self.crop_factor = crop_factor
        try:
            self._detector = solutions.face_detection.FaceDetection(
                model_selection=1, min_detection_confidence=min_score
            )
            # Two faces per crop: a neighbour may reach into the crop, and the one nearest the
            # crop's centre is the face the detector meant.
            self._mesh = solutions.face_mesh.FaceMesh(
                static_image_mode=True,
                max_num_faces=2,
                refine_landmarks=False,
                min_detection_confidence=min_score,
            )
        except Exception as exc:  # noqa: BLE001 - mediapipe raises RuntimeError/ValueError of its own
            # A wheel without its bundled models (0.10.30 and later) fails here.
            raise EngineError(f"mediapipe face models unusable: {exc}", code="backend_unavailable") from exc
        self._lock = threading.Lock()

    def detect(self, rgb: np.ndarray) -> list[Face]:
        rgb = np.ascontiguousarray(rgb)
        with self._lock:
            # Duplicate hits (overlapping tiles) are dropped before the costlier mesh fitting.
            found = drop_duplicates(self._detections(rgb), rank=lambda f: f.score)
            candidates = []
            for detection in found:
                mesh = self._fit_mesh(rgb, detection.box)
                if mesh is None:
                    continue
                (x0, y0), (x1, y1) = mesh.min(axis=0), mesh.max(axis=0)
                box = (float(x0), float(y0), float(x1), float(y1))
                candidates.append(Face(box, detection.score, mesh_keypoints(mesh), mesh))
        # Two detections of one face can still fit the same mesh; keep the better-scored one.
        return keep_largest(drop_duplicates(candidates, rank=lambda f: f.score), self.max_faces)

    def _detections(self, rgb: np.ndarray) -> list[Face]:
        """Detector boxes over the whole image and over square tiles of its short side.

        The detector sees a 192 x 192 copy of what it is given, so on a wide group photo a face
        of a tenth of the width is a dozen pixels there and is missed now and then. Square tiles
        of the short side, overlapping by half, give every face that fits in half a tile a tile
        it lies wholly inside, at the detector's best scale; the whole image is still searched
        for faces too large for a tile. Three tiles on a 16:9 frame, ~20 ms each here (2 cores).
        """
        height, width = rgb.shape[:2]
        side = min(height, width)
        windows = [(0, 0, width, height)]
        if max(height, width) > 1.2 * side:
            step = side // 2
            xs = sorted({*range(0, width - side + 1, step), width - side})
            ys = sorted({*range(0, height - side + 1, step), height - side})
            windows += [(x, y, x + side, y + side) for y in ys for x in xs]
        faces = []
        for x0, y0, x1, y1 in windows:
            tile = np.ascontiguousarray(rgb[y0:y1, x0:x1])
            for detection in self._detector.process(tile).detections or []:
                rel = detection.location_data.relative_bounding_box
                w, h = x1 - x0, y1 - y0
                box = (
                    x0 + rel.xmin * w,
                    y0 + rel.ymin * h,
                    x0 + (rel.xmin + rel.width) * w,
                    y0 + (rel.ymin + rel.height) * h,
                )
                faces.append(Face(box, float(detection.score[0])))
        return faces

    def _fit_mesh(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray | None:
        """The 468 x 2 mesh (image pixels) of the face in ``box``, or None when none fits there."""
        height, width = rgb.shape[:2]
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        half = self.crop_factor * max(box[2] - box[0], box[3] - box[1]) / 2
        x0, y0 = int(max(0, np.floor(cx - half))), int(max(0, np.floor(cy - half)))
        x1, y1 = int(min(width, np.ceil(cx + half))), int(min(height, np.ceil(cy + half)))
        if x1 - x0 < 16 or y1 - y0 < 16:
            return None
        crop = np.ascontiguousarray(rgb[y0:y1, x0:x1])
        found = self._mesh.process(crop).multi_face_landmarks or []
        best, best_distance = None, np.inf
        for landmarks in found:
            points = np.array([(p.x, p.y) for p in landmarks.landmark[:MESH_POINTS]], np.float32)
            points = points * (x1 - x0, y1 - y0) + (x0, y0)
            mx, my = points.mean(axis=0)
            if not (box[0] <= mx <= box[2] and box[1] <= my <= box[3]):
                continue  # a neighbour's face reaching into the crop
            distance = float(np.hypot(mx - cx, my - cy))
            if distance < best_distance:
                best, best_distance = points, distance
        return best


def triangulate(points: np.ndarray) -> np.ndarray:
    """Delaunay triangles of ``points`` (N x 2) as a T x 3 array of point indices.

    ``cv2.Subdiv2D`` returns triangle corners as coordinates; each is mapped back to the
    nearest input point. Triangles touching Subdiv2D's virtual outer vertices (far outside the
    points) are dropped, which leaves exactly the triangulation of the points' convex hull.
    """
    points = np.asarray(points, np.float32)
    x0, y0 = np.floor(points.min(axis=0)) - 1
    x1, y1 = np.ceil(points.max(axis=0)) + 1
    subdiv = cv2.Subdiv2D((int(x0), int(y0), int(x1 - x0) + 1, int(y1 - y0) + 1))
    subdiv.insert([(float(x), float(y)) for x, y in points])
    corners = np.asarray(subdiv.getTriangleList(), np.float32).reshape(-1, 3, 2)
    distance = ((corners[:, :, None, :] - points[None, None]) ** 2).sum(axis=-1)  # T x 3 x N
    indices = distance.argmin(axis=-1)
    real = distance.min(axis=-1).max(axis=-1) < 1e-2
    return indices[real]


def warp_triangles(
    source: np.ndarray,
    source_points: np.ndarray,
    target_points: np.ndarray,
    triangles: np.ndarray,
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Piecewise-affine warp of ``source`` so each triangle's source points land on its target points.

    Returns the warped image of size ``shape`` (h, w) and the uint8 mask (0/255) of the pixels a
    triangle covers. Rather than one ``warpAffine`` per triangle (~900 per face), every target
    pixel is labelled with the triangle it lies in and one ``remap`` pulls all of them through
    their triangle's inverse affine map. Triangles that collapse to a line in the target cover
    no pixel and are skipped (their inverse does not exist).
    """
    height, width = shape
    dst = np.asarray(target_points, np.float64)[triangles]  # T x 3 x 2
    src = np.asarray(source_points, np.float64)[triangles]
    homogeneous = np.concatenate([dst, np.ones((*dst.shape[:2], 1))], axis=2)  # T x 3 x 3
    solid = np.abs(np.linalg.det(homogeneous)) > 1e-3
    # [x, y, 1] @ inverse = source (x, y) for every point of the triangle.
    inverse = np.linalg.solve(homogeneous[solid], src[solid]).astype(np.float32)  # T' x 3 x 2
    labels = np.full((height, width), -1, np.int32)
    for i, corners in enumerate(dst[solid]):
        # shift=4: corners at 1/16 px, so neighbouring triangles meet without gaps.
        cv2.fillConvexPoly(labels, np.round(corners * 16).astype(np.int32), int(i), cv2.LINE_8, 4)
    covered = labels >= 0
    per_pixel = inverse[np.where(covered, labels, 0)]  # h x w x 3 x 2
    ys, xs = np.indices((height, width), dtype=np.float32)
    map_x = xs * per_pixel[..., 0, 0] + ys * per_pixel[..., 1, 0] + per_pixel[..., 2, 0]
    map_y = xs * per_pixel[..., 0, 1] + ys * per_pixel[..., 1, 1] + per_pixel[..., 2, 1]
    warped = cv2.remap(source, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return warped, covered.astype(np.uint8) * 255


@dataclass(frozen=True)
class MeshSource:
    """A source face ready to swap: a crop around it, its mesh in crop pixels, its triangles."""

    rgb: np.ndarray
    points: np.ndarray
    triangles: np.ndarray
    width: float


class MeshFaceSwapper(FaceSwapEngine):
    """Weight-free face swap on mediapipe's 468-point mesh: Delaunay warp, colour match, seamless cloning.

    ``backend`` is ``landmark-mediapipe-mesh``. See the module docstring.
    """

    backend = BACKEND
    detector_class = MeshDetector

    def _prepare_source(self, rgb: np.ndarray, face: Face) -> MeshSource:
        if face.mesh is None:
            raise EngineError("the source face has no landmark mesh", code="swap_failed")
        height, width = rgb.shape[:2]
        x0, y0, x1, y1 = expand_box(face, 1.2, width, height)
        points = face.mesh - (x0, y0)
        # Triangulated once per source: the same triangles serve every target face.
        return MeshSource(rgb[y0:y1, x0:x1].copy(), points, triangulate(points), face.width)

    def _swap_face(self, rgb: np.ndarray, face: Face, source: MeshSource) -> tuple[np.ndarray, np.ndarray]:
        if face.mesh is None:
            raise EngineError("the target face has no landmark mesh", code="swap_failed")
        height, width = rgb.shape[:2]
        src_rgb, src_points = source.rgb, source.points
        shrink = face.width / max(source.width, 1e-6)
        if shrink < 0.8:
            # A much larger source face: remap's bilinear taps would alias, so area-average the
            # source down to about the target's size first.
            src_rgb = cv2.resize(src_rgb, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
            src_points = src_points * shrink
        # The region around the target mesh, with room for the feathered edge and the Poisson
        # boundary (the mesh's own box is the face box).
        x0, y0, x1, y1 = expand_box(face, 1.3, width, height)
        warped, mask = warp_triangles(
            src_rgb, src_points, face.mesh - (x0, y0), source.triangles, (y1 - y0, x1 - x0)
        )
        return paste_face(rgb, (x0, y0, x1, y1), warped, mask, max(2, int(0.06 * face.width)))
