"""Face detection and face swap engines (issue 6), on real faces and tiny ONNX models.

The weight-free engine runs on the astronaut photo scikit-image ships. The InsightFace path
runs on tiny ONNX models built here with the real input/output names and shapes: the detector's
weights are set by hand so it fires on red squares (which checks the SCRFD decoding exactly),
the recognition and swapper weights are random, so the swapped pixels mean nothing; those
tests check that the real loading, alignment and paste-back code runs and touches only the
named faces.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from inference.base import Cancelled, EngineError, InvalidInput
from inference.faceswap import Face, FaceDetector, InsightFaceSwapper, LandmarkFaceSwapper, order_faces
from inference.faceswap.common import similarity_transform
from inference.faceswap.insight import ARCFACE_TEMPLATE_112, arcface_template
from tests.inference.face_images import BLUE, CANVAS, GREEN, colour_pixels, group, marked_source

PLACES = [(60, 60, 1.0), (420, 300, 0.8), (720, 50, 1.1)]


@pytest.fixture(scope="module")
def engine() -> LandmarkFaceSwapper:
    return LandmarkFaceSwapper()


@pytest.fixture(scope="module")
def trio() -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    return group(PLACES)


def _unchanged_outside(before: np.ndarray, after: np.ndarray, boxes: list[tuple[int, int, int, int]]) -> bool:
    keep = np.ones(before.shape[:2], bool)
    for x0, y0, x1, y1 in boxes:
        keep[max(0, y0) : y1, max(0, x0) : x1] = False
    return bool(np.array_equal(before[keep], after[keep]))


def _grown(box: dict[str, int] | tuple[int, ...], factor: float = 2.0) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (box["x1"], box["y1"], box["x2"], box["y2"]) if isinstance(box, dict) else box
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * factor / 2, (y1 - y0) * factor / 2
    return int(cx - hw), int(cy - hh), int(cx + hw) + 1, int(cy + hh) + 1


class _StopAfter:
    def __init__(self, calls: int):
        self.calls = calls

    def progress(self, percent: float) -> None:
        pass

    def should_stop(self) -> bool:
        self.calls -= 1
        return self.calls < 0


# ---------------------------------------------------------------------------------------------
# Detection and index order


def test_face_detect_finds_each_pasted_face_left_to_right(engine, trio):
    canvas, rects = trio
    result = engine.face_detect(Image.fromarray(canvas))
    faces = result.data["faces"]
    assert result.backend == "landmark-opencv-haar"
    assert [f["index"] for f in faces] == [0, 1, 2]
    for face, (x0, y0, x1, y1) in zip(faces, rects, strict=True):
        box = face["box"]
        cx, cy = (box["x1"] + box["x2"]) / 2, (box["y1"] + box["y2"]) / 2
        assert x0 < cx < x1 and y0 < cy < y1, (face, (x0, y0, x1, y1))
        assert 0 < face["score"] < 1
        left, right = face["landmarks"]["left_eye"], face["landmarks"]["right_eye"]
        assert box["x1"] < left[0] < right[0] < box["x2"]


def test_face_detect_reports_boxes_in_input_pixels_when_shrunk(engine, trio):
    canvas, _ = trio
    small = engine.face_detect(Image.fromarray(canvas)).data["faces"]
    # The same picture at twice the size, detected at max_side 1000 (so on a copy like `canvas`).
    big = Image.fromarray(canvas).resize((2000, 1200), Image.Resampling.LANCZOS)
    result = engine.face_detect(big, max_side=1000)
    assert (result.data["width"], result.data["height"]) == (2000, 1200)
    faces = result.data["faces"]
    assert len(faces) == len(small)
    for a, b in zip(small, faces, strict=True):
        for key in ("x1", "y1", "x2", "y2"):
            assert abs(2 * a["box"][key] - b["box"][key]) <= 12


def test_index_order_groups_stacked_faces_into_a_column_top_to_bottom():
    def at(cx: float, cy: float) -> Face:
        return Face((cx - 50, cy - 50, cx + 50, cy + 50), 0.9)

    # Two faces stacked in a column, the lower one a few pixels further left (detector jitter):
    # the top one must still come first, and the column before the face to its right.
    lower, upper, right = at(200, 400), at(206, 100), at(500, 250)
    assert order_faces([right, lower, upper]) == [upper, lower, right]
    assert order_faces([upper, right, lower]) == [upper, lower, right]


def test_detector_keeps_the_largest_faces_up_to_max_faces(trio):
    canvas, _ = trio
    faces = FaceDetector(max_faces=2).detect(canvas)
    # PLACES scales 1.0, 0.8, 1.1: the 0.8 face (the middle one) is the one dropped.
    assert len(faces) == 2
    assert faces[0].center[0] < 300 and faces[1].center[0] > 700


def test_face_detect_on_a_blank_image_returns_no_faces(engine):
    blank = Image.new("RGB", (320, 240), CANVAS)
    assert engine.face_detect(blank).data["faces"] == []


# ---------------------------------------------------------------------------------------------
# Landmark engine swaps


def test_faceswap_puts_the_source_face_on_every_target_face_and_nothing_else(engine, trio):
    canvas, rects = trio
    result = engine.faceswap(Image.fromarray(marked_source(GREEN)), Image.fromarray(canvas))
    out = np.asarray(result.images[0].image)
    meta = result.images[0].meta
    assert result.backend == "landmark-opencv-haar"
    assert out.shape == canvas.shape
    assert meta["swapped_faces_index"] == [0, 1, 2] and meta["faces_in_target"] == 3
    assert colour_pixels(canvas, GREEN, (0, 0, 1000, 600)) == 0
    for rect in rects:
        assert colour_pixels(out, GREEN, rect) > 40, rect
    faces = engine.face_detect(Image.fromarray(canvas)).data["faces"]
    assert _unchanged_outside(canvas, out, [_grown(f["box"]) for f in faces])


def test_faceswap_multi_swaps_exactly_the_named_faces(engine, trio):
    canvas, rects = trio
    result = engine.faceswap_multi(
        [Image.fromarray(marked_source(GREEN)), Image.fromarray(marked_source(BLUE))],
        Image.fromarray(canvas),
        swap_faces_index=[0, 0],
        target_faces_index=[2, 0],
    )
    out = np.asarray(result.images[0].image)
    assert result.images[0].meta["swapped_faces_index"] == [2, 0]
    assert colour_pixels(out, GREEN, rects[2]) > 40 and colour_pixels(out, BLUE, rects[2]) == 0
    assert colour_pixels(out, BLUE, rects[0]) > 40 and colour_pixels(out, GREEN, rects[0]) == 0
    # Face 1 was not named: every pixel of its picture is as it was.
    x0, y0, x1, y1 = rects[1]
    assert np.array_equal(out[y0:y1, x0:x1], canvas[y0:y1, x0:x1])


def test_faceswap_max_faces_swaps_only_the_largest(engine, trio):
    canvas, rects = trio
    # Above the engine's cap of 8 it means "all of them".
    many = engine.faceswap(Image.fromarray(marked_source(GREEN)), Image.fromarray(canvas), max_faces=20)
    assert many.images[0].meta["swapped_faces_index"] == [0, 1, 2]
    result = engine.faceswap(Image.fromarray(marked_source(GREEN)), Image.fromarray(canvas), max_faces=1)
    out = np.asarray(result.images[0].image)
    assert result.images[0].meta["swapped_faces_index"] == [2]
    assert colour_pixels(out, GREEN, rects[2]) > 40
    for rect in rects[:2]:
        x0, y0, x1, y1 = rect
        assert np.array_equal(out[y0:y1, x0:x1], canvas[y0:y1, x0:x1])


def test_faceswap_shrinks_the_target_to_max_side(engine, trio):
    canvas, _ = trio
    big = Image.fromarray(canvas).resize((1500, 900), Image.Resampling.LANCZOS)
    result = engine.faceswap(Image.fromarray(marked_source(GREEN)), big, max_side=700)
    image = result.images[0].image
    assert image.size == (700, 420)
    assert (result.images[0].meta["width"], result.images[0].meta["height"]) == (700, 420)
    # A target already within max_side keeps its size: max_side never enlarges.
    result = engine.faceswap(Image.fromarray(marked_source(GREEN)), Image.fromarray(canvas), max_side=4000)
    assert result.images[0].image.size == (1000, 600)


def test_upscaler_runs_on_each_swapped_face_and_keeps_the_size(engine, trio):
    canvas, _ = trio
    seen = []

    def double(image: Image.Image) -> Image.Image:
        seen.append(image.size)
        return image.resize((image.width * 2, image.height * 2), Image.Resampling.LANCZOS)

    result = engine.faceswap(Image.fromarray(marked_source(GREEN)), Image.fromarray(canvas), upscaler=double)
    out = np.asarray(result.images[0].image)
    assert len(seen) == 3 and result.images[0].meta["upscaled"] is True
    assert out.shape == canvas.shape
    faces = engine.face_detect(Image.fromarray(canvas)).data["faces"]
    assert _unchanged_outside(canvas, out, [_grown(f["box"]) for f in faces])


def test_sharpen_raises_detail_inside_swapped_faces_only(engine, trio):
    canvas, _ = trio
    source = Image.fromarray(marked_source(GREEN))
    plain = np.asarray(engine.faceswap(source, Image.fromarray(canvas)).images[0].image)
    sharp = np.asarray(engine.faceswap(source, Image.fromarray(canvas), sharpen=0.8).images[0].image)
    faces = engine.face_detect(Image.fromarray(canvas)).data["faces"]
    assert _unchanged_outside(canvas, sharp, [_grown(f["box"]) for f in faces])

    def detail(rgb: np.ndarray, box: dict[str, int]) -> float:
        # The middle of the face box, where the feathered face mask is fully on.
        x0, y0, x1, y1 = _grown(box, 0.5)
        gray = rgb[y0:y1, x0:x1].astype(np.float32).mean(axis=2)
        return float(np.abs(np.diff(gray, axis=1)).mean())

    for face in faces:
        assert detail(sharp, face["box"]) > detail(plain, face["box"]) * 1.2


def test_transparent_target_keeps_its_alpha(engine, trio):
    canvas, _ = trio
    rgba = Image.fromarray(canvas).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 128))
    image = engine.faceswap(Image.fromarray(marked_source(GREEN)), rgba).images[0].image
    assert image.mode == "RGBA" and image.getchannel("A").getextrema() == (128, 128)


# ---------------------------------------------------------------------------------------------
# Errors


def _code(excinfo: pytest.ExceptionInfo) -> tuple[str, str | None]:
    return excinfo.value.code, excinfo.value.field


def test_no_face_in_source_or_target_is_a_named_error(engine, trio):
    canvas, _ = trio
    blank = Image.new("RGB", (400, 300), CANVAS)
    with pytest.raises(InvalidInput) as excinfo:
        engine.faceswap(blank, Image.fromarray(canvas))
    assert _code(excinfo) == ("no_face_in_source", "source_url")
    with pytest.raises(InvalidInput) as excinfo:
        engine.faceswap(Image.fromarray(marked_source(GREEN)), blank)
    assert _code(excinfo) == ("no_face_in_target", "target_url")
    with pytest.raises(InvalidInput) as excinfo:
        engine.faceswap_multi(
            [Image.fromarray(marked_source(GREEN)), blank], Image.fromarray(canvas), [0, 0], [0, 1]
        )
    assert _code(excinfo) == ("no_face_in_source", "source_urls[1]")


def test_bad_indices_and_lengths_are_named_errors(engine, trio):
    canvas, _ = trio
    source, target = Image.fromarray(marked_source(GREEN)), Image.fromarray(canvas)
    cases = [
        (([source], [0], [3]), ("index_out_of_range", "target_faces_index[0]")),
        (([source], [1], [0]), ("index_out_of_range", "swap_faces_index[0]")),
        (([source, source], [0], [0, 1]), ("length_mismatch", "swap_faces_index")),
        (([source, source], [0, 0], [1]), ("length_mismatch", "target_faces_index")),
        (([source, source], [0, 0], [1, 1]), ("duplicate_index", "target_faces_index")),
        (([source], [-1], [0]), ("invalid_input", "swap_faces_index[0]")),
        (([], [], []), ("invalid_input", "source_urls")),
    ]
    for (sources, swap_index, target_index), expected in cases:
        with pytest.raises(InvalidInput) as excinfo:
            engine.faceswap_multi(sources, target, swap_index, target_index)
        assert _code(excinfo) == expected, (swap_index, target_index)


def test_out_of_range_parameters_are_refused(engine, trio):
    canvas, _ = trio
    source, target = Image.fromarray(marked_source(GREEN)), Image.fromarray(canvas)
    for kwargs, field in [
        ({"max_side": 10}, "max_side"),
        ({"max_side": 1080.5}, "max_side"),
        ({"sharpen": 1.5}, "sharpen"),
        ({"max_faces": -1}, "max_faces"),
    ]:
        with pytest.raises(InvalidInput) as excinfo:
            engine.faceswap(source, target, **kwargs)
        assert excinfo.value.field == field, kwargs


def test_a_cancelled_job_stops_before_the_swap(engine, trio):
    canvas, _ = trio
    with pytest.raises(Cancelled):
        engine.faceswap(Image.fromarray(marked_source(GREEN)), Image.fromarray(canvas), control=_StopAfter(2))


# ---------------------------------------------------------------------------------------------
# InsightFace path with tiny ONNX models

# Landmark offsets (in stride units) the hand-set detector emits around each anchor centre.
KPS_OFFSETS = np.array([[-1.5, -1.2], [1.5, -1.2], [0.0, 0.3], [-1.2, 1.8], [1.2, 1.8]], np.float32)
BOX_DISTANCE = 4.0  # stride units on every side: a 64 px box at stride 8


def _save(graph, path) -> str:
    onnx = pytest.importorskip("onnx")  # skips only the tests that build ONNX models
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    # onnx 1.23 writes IR 14, which this onnxruntime refuses (max 13); 10 covers opset 13.
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _scrfd(path) -> str:
    """SCRFD layout, 3 strides x 2 anchors: scores, boxes, landmarks, each (N, k).

    Stride 8 scores red cells: logit = 40 * (mean R - mean G) - 20 on the normalised input, so
    an all-red 8x8 cell scores ~1 and anything grey, black or skin-free scores ~0. The box and
    landmark heads are constant (bias only). Strides 16 and 32 never fire.
    """
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outputs = [], [], []
    heads = {"score": 1, "bbox": 4, "kps": 10}
    for head, width in heads.items():
        for stride in (8, 16, 32):
            name = f"{head}_{stride}"
            weight = np.zeros((2 * width, 3, stride, stride), np.float32)
            bias = np.zeros(2 * width, np.float32)
            if head == "score":
                bias[:] = -20.0
                if stride == 8:
                    weight[:, 0] = 40.0 / (stride * stride)
                    weight[:, 1] = -40.0 / (stride * stride)
            elif head == "bbox":
                bias[:] = BOX_DISTANCE
            else:
                bias[:] = np.tile(KPS_OFFSETS.reshape(-1), 2)
            inits += [
                numpy_helper.from_array(weight, f"{name}_w"),
                numpy_helper.from_array(bias, f"{name}_b"),
                numpy_helper.from_array(np.array([-1, width], np.int64), f"{name}_shape"),
            ]
            nodes += [
                helper.make_node(
                    "Conv", ["input.1", f"{name}_w", f"{name}_b"], [f"{name}_conv"], strides=[stride, stride]
                ),
                helper.make_node("Transpose", [f"{name}_conv"], [f"{name}_t"], perm=[0, 2, 3, 1]),
                helper.make_node("Reshape", [f"{name}_t", f"{name}_shape"], [f"{name}_r"]),
            ]
            if head == "score":
                nodes.append(helper.make_node("Sigmoid", [f"{name}_r"], [name]))
            else:
                nodes.append(helper.make_node("Identity", [f"{name}_r"], [name]))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", width]))
    graph = helper.make_graph(
        nodes,
        "scrfd_tiny",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "h", "w"])],
        outputs,
        inits,
    )
    return _save(graph, path)


def _arcface(path, rng) -> str:
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(rng.normal(size=(3, 512)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=512).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("GlobalAveragePool", ["input.1"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["683"]),
    ]
    graph = helper.make_graph(
        nodes,
        "arcface_tiny",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, [1, 512])],
        inits,
    )
    return _save(graph, path)


def _inswapper(path, rng) -> str:
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(rng.normal(size=(3, 3, 1, 1)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(size=(512, 3)).astype(np.float32), "style_w"),
        numpy_helper.from_array(np.array([1, 3, 1, 1], np.int64), "style_shape"),
        # Last initializer, unused by the graph, as in the released model: the identity projection.
        numpy_helper.from_array(rng.normal(size=(512, 512)).astype(np.float32), "emap"),
    ]
    nodes = [
        helper.make_node("Conv", ["target", "conv_w"], ["conv"]),
        helper.make_node("MatMul", ["source", "style_w"], ["style"]),
        helper.make_node("Reshape", ["style", "style_shape"], ["style4"]),
        helper.make_node("Add", ["conv", "style4"], ["mix"]),
        helper.make_node("Sigmoid", ["mix"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "inswapper_tiny",
        [
            helper.make_tensor_value_info("target", TensorProto.FLOAT, [1, 3, 128, 128]),
            helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, 512]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 128, 128])],
        inits,
    )
    return _save(graph, path)


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory) -> dict[str, str]:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("face_models")
    rng = np.random.default_rng(6)
    return {
        "detector": _scrfd(root / "det_10g.onnx"),
        "recognition": _arcface(root / "w600k_r50.onnx", rng),
        "swapper": _inswapper(root / "inswapper_128.onnx", rng),
    }


@pytest.fixture(scope="module")
def insight(onnx_models) -> InsightFaceSwapper:
    return InsightFaceSwapper(
        onnx_models["detector"],
        onnx_models["recognition"],
        onnx_models["swapper"],
        providers=["CPUExecutionProvider"],
    )


def _red_cells(cells: list[tuple[int, int]], size=(480, 640)) -> np.ndarray:
    """A grey-and-texture picture with one red 8x8 block on each given stride-8 cell (col, row)."""
    rng = np.random.default_rng(1)
    image = np.clip(rng.normal(128, 30, (*size, 3)), 0, 255).astype(np.uint8)
    image[..., 0] = image[..., 1]  # no red dominance anywhere but in the blocks
    for col, row in cells:
        image[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] = (255, 0, 0)
    return image


def test_insightface_detector_decodes_boxes_and_landmarks_exactly(insight):
    # 640x480 letterboxes into 640x640 at scale 1, so cells map to pixels one to one.
    result = insight.face_detect(Image.fromarray(_red_cells([(50, 30), (15, 20)])))
    faces = result.data["faces"]
    assert result.backend == "insightface:inswapper_128"
    assert [f["index"] for f in faces] == [0, 1]
    for face, (col, row) in zip(faces, [(15, 20), (50, 30)], strict=True):
        cx, cy = col * 8, row * 8  # SCRFD anchor centres sit on the cell's top-left corner
        d = int(BOX_DISTANCE * 8)
        assert face["box"] == {"x1": cx - d, "y1": cy - d, "x2": cx + d, "y2": cy + d}
        assert face["score"] > 0.99
        expected = {
            name: [cx + 8 * dx, cy + 8 * dy]
            for name, (dx, dy) in zip(
                ["left_eye", "right_eye", "nose", "mouth_left", "mouth_right"],
                KPS_OFFSETS.tolist(),
                strict=True,
            )
        }
        assert set(face["landmarks"]) == set(expected)
        for name, point in expected.items():
            assert face["landmarks"][name] == pytest.approx(point, abs=0.06), name


def test_insightface_pipeline_swaps_only_the_named_face(insight):
    source = Image.fromarray(_red_cells([(40, 30)]))
    target_rgb = _red_cells([(15, 20), (50, 30)])
    result = insight.faceswap_multi([source], Image.fromarray(target_rgb), [0], [1])
    out = np.asarray(result.images[0].image)
    assert result.backend == "insightface:inswapper_128"
    assert out.shape == target_rgb.shape and out.dtype == np.uint8
    assert result.images[0].meta["swapped_faces_index"] == [1]
    # Random weights: the face is not meaningful, but it must land on face 1 (box 368..432,
    # 208..272) and nowhere else.
    assert np.abs(out[210:270, 370:430].astype(int) - target_rgb[210:270, 370:430]).mean() > 5
    assert _unchanged_outside(target_rgb, out, [(330, 170, 470, 310)])


def test_insightface_faceswap_respects_max_side_and_upscaler(insight):
    target = Image.fromarray(_red_cells([(15, 20), (50, 30)])).resize((1280, 960), Image.Resampling.NEAREST)
    calls = []

    def upscaler(image: Image.Image) -> Image.Image:
        calls.append(image.size)
        return image.resize((image.width * 4, image.height * 4))

    result = insight.faceswap(
        Image.fromarray(_red_cells([(40, 30)])), target, max_side=640, sharpen=0.3, upscaler=upscaler
    )
    assert result.images[0].image.size == (640, 480)
    assert result.images[0].meta["swapped_faces_index"] == [0, 1] and len(calls) == 2


def test_insightface_engine_names_missing_and_wrong_models(onnx_models, tmp_path):
    with pytest.raises(EngineError) as excinfo:
        InsightFaceSwapper(tmp_path / "nope.onnx", onnx_models["recognition"], onnx_models["swapper"])
    assert excinfo.value.code == "model_missing"
    with pytest.raises(EngineError) as excinfo:
        # A recognition model has one output, not SCRFD's nine.
        InsightFaceSwapper(onnx_models["recognition"], onnx_models["recognition"], onnx_models["swapper"])
    assert excinfo.value.code == "model_invalid"


def test_similarity_alignment_is_the_least_squares_fit_skimage_computes():
    transform = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(3)
    angle, scale, shift = 0.3, 2.5, np.array([40.0, -12.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = ARCFACE_TEMPLATE_112 @ (scale * rotation).T + shift + rng.normal(0, 1.5, (5, 2))
    ours = similarity_transform(points, arcface_template(128))
    if hasattr(transform.SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        reference = transform.SimilarityTransform.from_estimate(points, arcface_template(128))
    else:
        reference = transform.SimilarityTransform()
        reference.estimate(points, arcface_template(128))
    assert ours == pytest.approx(reference.params[:2], abs=1e-6)
    # The 128 px template is the 112 one shifted 8 px right, as inswapper was trained.
    assert arcface_template(128) == pytest.approx(ARCFACE_TEMPLATE_112 + [8.0, 0.0])
    assert arcface_template(224) == pytest.approx(ARCFACE_TEMPLATE_112 * 2)
