"""Face detection and face swap engines (issue 6), on real faces and tiny ONNX models.

The weight-free engine runs on the astronaut photo scikit-image ships. The InsightFace path
runs on tiny ONNX models built here with the real input/output names and shapes: the detector's
weights are set by hand so it fires on red squares (which checks the SCRFD decoding exactly),
the recognition and swapper weights are random, so the swapped pixels mean nothing; those
tests check that the real loading, alignment and paste-back code runs and touches only the
named faces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.base import Cancelled, EngineError, InvalidInput
from inference.faceswap import Face, FaceDetector, InsightFaceSwapper, LandmarkFaceSwapper, order_faces
from inference.faceswap.faces import similarity_transform
from inference.faceswap.insight import ARCFACE_TEMPLATE_112, arcface_template
from tests.inference.face_images import (
    CANVAS,
    GREEN,
    colour_pixels,
    group,
    marked_source,
    swap_named_faces,
)
from tests.inference.face_models import BOX_DISTANCE, KPS_OFFSETS, build_face_models, red_cells

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
    swap_named_faces(engine, canvas, rects)


def test_faceswap_max_faces_swaps_only_the_largest(engine, trio):
    canvas, rects = trio
    # Up to the engine's cap (8) n means "at most n"; above it, the request is refused.
    many = engine.faceswap(Image.fromarray(marked_source(GREEN)), Image.fromarray(canvas), max_faces=8)
    assert many.images[0].meta["swapped_faces_index"] == [0, 1, 2]
    with pytest.raises(InvalidInput) as excinfo:
        engine.faceswap(Image.fromarray(marked_source(GREEN)), Image.fromarray(canvas), max_faces=9)
    assert excinfo.value.field == "max_faces"
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


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory) -> dict[str, str]:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    return build_face_models(tmp_path_factory.mktemp("face_models"))


@pytest.fixture(scope="module")
def insight(onnx_models) -> InsightFaceSwapper:
    return InsightFaceSwapper(
        onnx_models["detector"],
        onnx_models["recognition"],
        onnx_models["swapper"],
        providers=["CPUExecutionProvider"],
    )


def test_insightface_detector_decodes_boxes_and_landmarks_exactly(insight):
    # 640x480 letterboxes into 640x640 at scale 1, so cells map to pixels one to one.
    result = insight.face_detect(Image.fromarray(red_cells([(50, 30), (15, 20)])))
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
    source = Image.fromarray(red_cells([(40, 30)]))
    target_rgb = red_cells([(15, 20), (50, 30)])
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
    target = Image.fromarray(red_cells([(15, 20), (50, 30)])).resize((1280, 960), Image.Resampling.NEAREST)
    calls = []

    def upscaler(image: Image.Image) -> Image.Image:
        calls.append(image.size)
        return image.resize((image.width * 4, image.height * 4))

    result = insight.faceswap(
        Image.fromarray(red_cells([(40, 30)])), target, max_side=640, sharpen=0.3, upscaler=upscaler
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


def test_insightface_sessions_use_the_platform_provider_choice_cuda_first_when_offered():
    ort = pytest.importorskip("onnxruntime")
    from inference.faceswap.insight import default_providers
    from inference.runtime import onnx_providers

    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers(gpu_build) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    # The engine's default is that choice for the onnxruntime installed here: the CPU build.
    assert default_providers() == onnx_providers(ort.get_available_providers())
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert default_providers() == ["CPUExecutionProvider"]


def test_insightface_result_names_the_providers_it_ran_on(insight):
    result = insight.faceswap_multi(
        [Image.fromarray(red_cells([(40, 30)]))], Image.fromarray(red_cells([(15, 20)])), [0], [0]
    )
    assert result.images[0].meta["providers"] == ["CPUExecutionProvider"]


def test_model_store_records_the_face_role_of_each_onnx_file(tmp_path):
    from inference.model_store import ModelStore, ModelStoreError

    paths = build_face_models(tmp_path / "m")
    store = ModelStore(tmp_path / "m")
    det = store.add(paths["detector"])
    rec = store.add(paths["recognition"])
    swap = store.add(paths["swapper"])
    assert (det.extra["role"], rec.extra["role"], swap.extra["role"]) == (
        "face_detector",
        "face_recognizer",
        "face_swapper",
    )
    assert "face_detect" in det.tasks and "faceswap" in rec.tasks and "faceswap_multi" in swap.tasks
    # The other packs' names are recognised too, and a file named otherwise takes --role.
    for name, role in [("scrfd_10g_bnkps", "face_detector"), ("glintr100", "face_recognizer")]:
        other = tmp_path / f"{name}.onnx"
        other.write_bytes(Path(paths["recognition"]).read_bytes())
        assert store.add(other).extra["role"] == role
    plain = tmp_path / "model.onnx"
    plain.write_bytes(Path(paths["recognition"]).read_bytes())
    assert store.add(plain, id="unnamed").extra == {} and store.get("unnamed").tasks == ()
    entry = store.add(plain, id="my-arcface", role="face_recognizer")
    assert store.get("my-arcface").extra["role"] == "face_recognizer" == entry.extra["role"]
    with pytest.raises(ModelStoreError):
        store.add(plain, id="bad-role", role="face_painter")


def test_face_detect_and_faceswap_multi_count_faces_alike_at_the_same_max_side(engine):
    # Two faces side by side, then the same canvas at 3x: at max_side 600 both pictures are
    # detected at the same size, so the indices face_detect reports are the ones multi uses.
    canvas, rects = group([(40, 40, 0.9), (330, 60, 1.0)], size=(400, 600))
    big = Image.fromarray(canvas).resize((1800, 1200), Image.Resampling.LANCZOS)
    faces = engine.face_detect(big, max_side=600).data["faces"]
    assert len(faces) == 2
    assert faces[0]["box"]["x1"] < faces[1]["box"]["x1"]
    result = engine.faceswap_multi([Image.fromarray(marked_source(GREEN))], big, [0], [1], max_side=600)
    out = np.asarray(result.images[0].image)
    assert out.shape[:2] == (400, 600)
    assert colour_pixels(out, GREEN, rects[1]) > 20
    assert colour_pixels(out, GREEN, rects[0]) == 0
