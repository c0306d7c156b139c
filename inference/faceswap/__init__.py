"""Face detection and face swap engines (issue 6).

- ``LandmarkFaceSwapper`` / ``FaceDetector``: weight-free, OpenCV Haar cascades.
- ``InsightFaceSwapper``: SCRFD + ArcFace + inswapper ONNX models from the model store.

Both expose ``face_detect``, ``faceswap`` and ``faceswap_multi`` with the same parameters,
errors and face index order; see ``common.FaceSwapEngine``.
"""

from inference.faceswap.common import KEYPOINT_NAMES, Face, FaceSwapEngine, order_faces
from inference.faceswap.insight import InsightFaceSwapper
from inference.faceswap.landmark import FaceDetector, LandmarkFaceSwapper

__all__ = [
    "KEYPOINT_NAMES",
    "Face",
    "FaceDetector",
    "FaceSwapEngine",
    "InsightFaceSwapper",
    "LandmarkFaceSwapper",
    "order_faces",
]
