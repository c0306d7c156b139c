"""Face detection and face swap engines (issue 6).

- ``MeshFaceSwapper`` / ``MeshDetector``: weight-free, mediapipe's 468-point face mesh (its
  models ship in the mediapipe wheel), Delaunay-triangle warp.
- ``LandmarkFaceSwapper`` / ``FaceDetector``: weight-free, OpenCV Haar cascades; the fallback
  where mediapipe cannot be imported.
- ``InsightFaceSwapper``: SCRFD + ArcFace + inswapper ONNX models from the model store.

All expose ``face_detect``, ``faceswap`` and ``faceswap_multi`` with the same parameters,
errors and face index order; see ``engine.FaceSwapEngine``. The face record and its geometry are
in ``faces``, the blending steps in ``blending``.
"""

from inference.faceswap.engine import FaceSwapEngine
from inference.faceswap.faces import KEYPOINT_NAMES, Face, order_faces
from inference.faceswap.insight import InsightFaceSwapper
from inference.faceswap.landmark import FaceDetector, LandmarkFaceSwapper
from inference.faceswap.mesh import MeshDetector, MeshFaceSwapper

__all__ = [
    "KEYPOINT_NAMES",
    "Face",
    "FaceDetector",
    "FaceSwapEngine",
    "InsightFaceSwapper",
    "LandmarkFaceSwapper",
    "MeshDetector",
    "MeshFaceSwapper",
    "order_faces",
]
