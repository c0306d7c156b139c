"""The InsightFace-class engine: SCRFD detector, ArcFace embedding and inswapper, on onnxruntime.

This is the production path. The operator installs the three ONNX files in the model store
(e.g. ``det_10g.onnx`` and ``w600k_r50.onnx`` from the buffalo_l pack, and
``inswapper_128.onnx``); the caller passes their paths. Nothing is downloaded. The
``insightface`` package itself is not needed: its pre- and post-processing is small, and
re-implementing it here keeps the engine free of that package's import-time downloads and
its pinned dependencies.

The pipeline, per target face:
1. SCRFD finds faces and five landmarks;
2. the source face, aligned to the 112 px ArcFace template, gives a 512-d identity embedding,
   projected through inswapper's ``emap`` matrix (its last initializer) as it was trained;
3. the target face, aligned to the same template placed in 128 px, and the latent go through
   inswapper, which returns the swapped 128 px face;
4. the face is warped back, colour matched and blended with a feathered mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from inference.base import EngineError
from inference.faceswap.blending import alpha_blend, feather, match_colour
from inference.faceswap.engine import DEFAULT_MAX_FACES, FaceSwapEngine
from inference.faceswap.faces import Face, keep_largest, similarity_transform
from inference.runtime import check_onnx_session, onnx_session_providers

# The five-point ArcFace template in its 112x112 crop (eyes, nose tip, mouth corners).
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    np.float64,
)


def arcface_template(size: int) -> np.ndarray:
    """The template for a ``size`` px crop, placed the way insightface's models were trained.

    Sizes that are multiples of 112 scale it; others (inswapper's 128) scale by size/128 and
    shift it 8 px (scaled) to the right, i.e. the 112 crop centred in a 128 one horizontally.
    """
    if size % 112 == 0:
        return ARCFACE_TEMPLATE_112 * (size / 112.0)
    ratio = size / 128.0
    template = ARCFACE_TEMPLATE_112 * ratio
    template[:, 0] += 8.0 * ratio
    return template


def default_providers() -> list[Any]:
    """The platform's choice for this process (``inference.runtime.onnx_session_providers``): CUDA
    with this process's device and arena on a GPU worker, the CPU after it for any op CUDA lacks;
    the CPU alone on a machine without a GPU. Every ONNX engine picks its providers alike."""
    return onnx_session_providers()


def _session(path: str | Path, providers: Sequence[Any] | None, threads: int | None) -> Any:
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise EngineError(f"model file not found: {path}", code="model_missing")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    chosen = list(providers or default_providers())
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    except Exception as exc:  # onnxruntime raises its own untyped errors for a bad file
        raise EngineError(f"cannot load {path.name}: {exc}", code="model_invalid") from exc
    return check_onnx_session(session, chosen)


def _spatial(shape: Sequence[Any], default: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an NCHW input, or ``default`` where the model leaves them dynamic."""
    h, w = shape[2], shape[3]
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        return h, w
    return default


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    order = scores.argsort()[::-1]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        xx1 = np.maximum(boxes[i, 0], boxes[order[1:], 0])
        yy1 = np.maximum(boxes[i, 1], boxes[order[1:], 1])
        xx2 = np.minimum(boxes[i, 2], boxes[order[1:], 2])
        yy2 = np.minimum(boxes[i, 3], boxes[order[1:], 3])
        inter = np.maximum(0.0, xx2 - xx1) * np.maximum(0.0, yy2 - yy1)
        iou = inter / (areas[i] + areas[order[1:]] - inter + 1e-9)
        order = order[1:][iou <= threshold]
    return keep


class ScrfdDetector:
    """SCRFD (or a RetinaFace exported in SCRFD's layout) face detector with five landmarks.

    Output layout, as the insightface exports have it: for each of ``n`` strides the score
    maps, then the box distances, then the landmark offsets (9 outputs for strides 8/16/32 with
    two anchors per cell, 15 for strides 8..128 with one). A leading batch axis is accepted.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        det_size: int = 640,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        threads: int | None = None,
    ):
        self.session = _session(path, providers, threads)
        inputs = self.session.get_inputs()
        self.input_name = inputs[0].name
        self.input_size = _spatial(inputs[0].shape, (det_size, det_size))
        self.output_names = [o.name for o in self.session.get_outputs()]
        layouts = {9: ([8, 16, 32], 2), 15: ([8, 16, 32, 64, 128], 1)}
        if len(self.output_names) not in layouts:
            raise EngineError(
                f"{Path(path).name} has {len(self.output_names)} outputs; a SCRFD detector with "
                "landmarks has 9 or 15",
                code="model_invalid",
            )
        self.strides, self.anchors = layouts[len(self.output_names)]
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self._centres: dict[tuple[int, int, int], np.ndarray] = {}

    def _anchor_centres(self, height: int, width: int, stride: int) -> np.ndarray:
        key = (height, width, stride)
        if key not in self._centres:
            ys, xs = np.mgrid[: height // stride, : width // stride]
            centres = (np.stack([xs, ys], axis=-1).reshape(-1, 2) * stride).astype(np.float32)
            # Each cell has ``anchors`` anchors at the same centre, consecutive in the outputs.
            self._centres[key] = np.repeat(centres, self.anchors, axis=0)
        return self._centres[key]

    def detect(self, rgb: np.ndarray) -> list[Face]:
        in_h, in_w = self.input_size
        height, width = rgb.shape[:2]
        # Letterbox: keep the aspect ratio, pad right/bottom with zeros as SCRFD was trained.
        scale = min(in_h / height, in_w / width)
        new_w, new_h = max(1, int(width * scale)), max(1, int(height * scale))
        canvas = np.zeros((in_h, in_w, 3), np.float32)
        canvas[:new_h, :new_w] = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outputs = self.session.run(self.output_names, {self.input_name: blob.astype(np.float32)})
        outputs = [o[0] if o.ndim == 3 else o for o in outputs]

        n = len(self.strides)
        boxes, scores, points = [], [], []
        for i, stride in enumerate(self.strides):
            score = outputs[i].reshape(-1)
            distance = outputs[i + n].reshape(-1, 4) * stride
            offsets = outputs[i + 2 * n].reshape(-1, 5, 2) * stride
            centres = self._anchor_centres(in_h, in_w, stride)
            if len(centres) != len(score):
                raise EngineError(
                    f"detector output for stride {stride} has {len(score)} scores, expected {len(centres)}",
                    code="model_invalid",
                )
            hit = np.where(score >= self.score_threshold)[0]
            c = centres[hit]
            d = distance[hit]
            boxes.append(np.hstack([c - d[:, :2], c + d[:, 2:]]))
            scores.append(score[hit])
            points.append(c[:, None, :] + offsets[hit])
        all_boxes = np.concatenate(boxes) / scale
        all_scores = np.concatenate(scores)
        all_points = np.concatenate(points) / scale
        faces = []
        for i in _nms(all_boxes, all_scores, self.nms_threshold):
            x1, y1, x2, y2 = (float(v) for v in all_boxes[i])
            faces.append(Face((x1, y1, x2, y2), float(all_scores[i]), all_points[i].astype(np.float32)))
        return faces


class ArcFaceEncoder:
    """ArcFace recognition model: an aligned face crop to an L2-normalised identity embedding."""

    def __init__(
        self, path: str | Path, *, providers: Sequence[str] | None = None, threads: int | None = None
    ):
        self.session = _session(path, providers, threads)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.size = _spatial(inp.shape, (112, 112))[0]
        self.mean, self.std = 127.5, 127.5
        # Some exports carry their own normalisation (a Sub and a Mul at the top of the graph);
        # feeding them pre-normalised pixels would normalise twice.
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        head = {node.op_type for node in graph.node[:8]}
        if {"Sub", "Mul"} <= head:
            self.mean, self.std = 0.0, 1.0

    def embed(self, rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
        matrix = similarity_transform(kps, arcface_template(self.size))
        crop = cv2.warpAffine(rgb, matrix, (self.size, self.size), borderValue=0.0).astype(np.float32)
        blob = ((crop - self.mean) / self.std).transpose(2, 0, 1)[None]
        embedding = self.session.run(None, {self.input_name: blob})[0].reshape(-1).astype(np.float32)
        norm = np.linalg.norm(embedding)
        if not np.isfinite(norm) or norm == 0:
            raise EngineError("the recognition model returned an empty embedding", code="swap_failed")
        return embedding / norm


class InSwapper:
    """inswapper_128: (aligned target face, source latent) -> swapped face, both RGB in [0, 1]."""

    def __init__(
        self, path: str | Path, *, providers: Sequence[str] | None = None, threads: int | None = None
    ):
        import onnx
        from onnx import numpy_helper

        self.session = _session(path, providers, threads)
        # The identity projection ("emap") ships as the graph's last initializer; the graph does
        # not use it, the caller applies it to the ArcFace embedding.
        graph = onnx.load(str(path), load_external_data=False).graph
        if not graph.initializer:
            raise EngineError(f"{Path(path).name} has no emap initializer", code="model_invalid")
        self.emap = numpy_helper.to_array(graph.initializer[-1]).astype(np.float32)
        inputs = {i.name: i for i in self.session.get_inputs()}
        names = list(inputs)
        if len(names) != 2:
            raise EngineError(
                f"{Path(path).name} should take 2 inputs, has {len(names)}", code="model_invalid"
            )
        # The released model names them "target" and "source"; fall back to their order.
        self.target_name = "target" if "target" in inputs else names[0]
        self.source_name = "source" if "source" in inputs else names[1]
        self.size = _spatial(inputs[self.target_name].shape, (128, 128))[0]
        latent_dim = inputs[self.source_name].shape[-1]
        if self.emap.ndim != 2 or (isinstance(latent_dim, int) and self.emap.shape[1] != latent_dim):
            raise EngineError(
                f"emap of shape {self.emap.shape} does not fit the source input", code="model_invalid"
            )

    def latent(self, embedding: np.ndarray) -> np.ndarray:
        latent = embedding.reshape(1, -1) @ self.emap
        return (latent / np.linalg.norm(latent)).astype(np.float32)

    def swap(self, aligned: np.ndarray, latent: np.ndarray) -> np.ndarray:
        blob = (aligned.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
        pred = self.session.run(None, {self.target_name: blob, self.source_name: latent})[0]
        return np.clip(pred[0].transpose(1, 2, 0) * 255.0 + 0.5, 0, 255).astype(np.uint8)


class InsightFaceSwapper(FaceSwapEngine):
    """Production face swap from three local ONNX files; ``backend`` is ``insightface:<swapper>``.

    ``providers`` defaults to CUDA when onnxruntime has it, else the CPU. Sessions are built
    once here; keep the instance warm in the worker's model cache.
    """

    def __init__(
        self,
        detector_path: str | Path,
        recognition_path: str | Path,
        swapper_path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        max_faces: int = DEFAULT_MAX_FACES,
        det_size: int = 640,
        det_threshold: float = 0.5,
        source_max_side: int = 1280,
        threads: int | None = None,
    ):
        detector = ScrfdDetector(
            detector_path,
            providers=providers,
            det_size=det_size,
            score_threshold=det_threshold,
            threads=threads,
        )
        super().__init__(detector=detector, max_faces=max_faces, source_max_side=source_max_side)
        self.encoder = ArcFaceEncoder(recognition_path, providers=providers, threads=threads)
        self.swapper = InSwapper(swapper_path, providers=providers, threads=threads)
        self.backend = f"insightface:{Path(swapper_path).stem}"
        self.template = arcface_template(self.swapper.size)

    def run_meta(self) -> dict[str, Any]:
        # What onnxruntime actually gave the swapper, CUDA first on a GPU worker.
        return {"providers": list(self.swapper.session.get_providers())}

    def detect(self, rgb: np.ndarray) -> list[Face]:
        return keep_largest(super().detect(rgb), self.max_faces)

    def _prepare_source(self, rgb: np.ndarray, face: Face) -> Any:
        assert face.kps is not None  # SCRFD faces always carry five points
        return self.swapper.latent(self.encoder.embed(rgb, face.kps))

    def _swap_face(self, rgb: np.ndarray, face: Face, source: Any) -> tuple[np.ndarray, np.ndarray]:
        assert face.kps is not None
        size = self.swapper.size
        height, width = rgb.shape[:2]
        matrix = similarity_transform(face.kps, self.template)
        aligned = cv2.warpAffine(rgb, matrix, (size, size), borderValue=0.0)
        swapped = self.swapper.swap(aligned, source)

        # Paste back only over the region the aligned square covers in the target.
        inverse = cv2.invertAffineTransform(matrix)
        corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64) @ inverse.T
        x0, y0 = np.floor(corners.min(axis=0)).astype(int)
        x1, y1 = np.ceil(corners.max(axis=0)).astype(int)
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
        if x1 - x0 < 4 or y1 - y0 < 4:
            return rgb, np.zeros((height, width), np.float32)
        inverse[:, 2] -= (x0, y0)
        roi_size = (x1 - x0, y1 - y0)
        face_roi = cv2.warpAffine(
            swapped, inverse, roi_size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        # The square's margin is neck, hair and background of the aligned crop; the feather
        # radius (a tenth of the face's size in the target) fades those out.
        square = np.full((size, size), 255, np.uint8)
        mask = cv2.warpAffine(square, inverse, roi_size, flags=cv2.INTER_NEAREST, borderValue=0)
        face_px = float(np.sqrt(max(cv2.countNonZero(mask), 1)))
        alpha_roi = feather(mask, max(2, int(0.1 * face_px)))
        target_roi = rgb[y0:y1, x0:x1]
        face_roi = match_colour(face_roi, target_roi, (alpha_roi > 0.5).astype(np.uint8))
        out = rgb.copy()
        out[y0:y1, x0:x1] = alpha_blend(face_roi, target_roi, alpha_roi)
        alpha = np.zeros((height, width), np.float32)
        alpha[y0:y1, x0:x1] = alpha_roi
        return out, alpha
