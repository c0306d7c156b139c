"""The face engine (inference/engines/faces.py) over a real model store and model cache, the face
payload rules, AIORCH_MAX_FACES, and EXIF orientation of inputs.

The adapters are called directly with an ``EngineCall``, as a worker calls them; the models are
tiny ones built here and registered in a real ``models.json``.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from marshmallow import ValidationError
from PIL import Image

from config import Settings
from config.settings import SettingsError
from inference import runtime
from inference.base import NullControl
from inference.engines import faces
from inference.registry import EngineCall
from tasks.inputs import decode_image
from tasks.payloads import faces as payloads
from tests.conftest import KEYS
from tests.inference.face_images import GREEN, colour_pixels, group, head, marked_source

ALICE = {"X-API-Key": KEYS[0][1]}
URL = "http://images.example.com/a.png"


def call_for(settings: Settings, task: str, payload: dict[str, Any], images: dict[str, Any]) -> EngineCall:
    schema = {
        "faceswap": payloads.FaceswapPayload,
        "faceswap_multi": payloads.FaceswapMultiPayload,
        "face_detect": payloads.FaceDetectPayload,
    }[task](max_faces=settings.max_faces)
    return EngineCall(task, schema.load(payload), images, NullControl(), 1, settings)


@pytest.fixture
def face_settings(base_settings: Settings, tmp_path: Path) -> Settings:
    return base_settings.with_overrides(models_dir=tmp_path / "models")


@pytest.fixture(scope="module")
def one_face() -> Image.Image:
    canvas, _ = group([(60, 40, 1.0)], size=(340, 320))
    return Image.fromarray(canvas)


# ---------------------------------------------------------------------------------------------
# AIORCH_MAX_FACES


def test_max_faces_setting_defaults_to_8_and_is_read_from_aiorch_max_faces(tmp_path: Path) -> None:
    env = {"AIORCH_VAR_DIR": str(tmp_path)}
    assert Settings.from_env(env).max_faces == 8
    assert Settings.from_env({**env, "AIORCH_MAX_FACES": "3"}).max_faces == 3
    for bad in ("0", "many", "65"):
        with pytest.raises(SettingsError, match="AIORCH_MAX_FACES"):
            Settings.from_env({**env, "AIORCH_MAX_FACES": bad})


def test_max_faces_over_the_limit_is_a_422_naming_the_field_not_a_silent_cap(settings: Settings) -> None:
    from app import create_app

    app = create_app(settings.with_overrides(max_faces=3))
    client = app.test_client()
    try:
        body = {"task": "faceswap", "payload": {"source_url": URL, "target_url": URL, "max_faces": 4}}
        response = client.post("/v1/jobs", json=body, headers=ALICE)
        assert response.status_code == 422, response.get_data(as_text=True)
        assert "max_faces" in response.get_json()["error"]["details"]["payload"]
        body["payload"]["max_faces"] = 3
        assert client.post("/v1/jobs", json=body, headers=ALICE).status_code == 202
        multi = {"task": "faceswap_multi", "payload": {"source_urls": [URL] * 4, "target_url": URL}}
        response = client.post("/v1/jobs", json=multi, headers=ALICE)
        assert response.status_code == 422
        assert "source_urls" in response.get_json()["error"]["details"]["payload"]
    finally:
        app.extensions["aiorch"].db.dispose()


def test_face_payloads_take_max_side_and_upscale_in_both_swap_modes() -> None:
    detect = payloads.FaceDetectPayload().load({"image_url": URL})
    assert detect["max_side"] == 1080
    assert payloads.FaceDetectPayload().load({"image_url": URL, "max_side": 640})["max_side"] == 640
    multi = payloads.FaceswapMultiPayload().load({"source_urls": [URL], "target_url": URL})
    assert multi["upscale"] == 1 and multi["max_side"] == 1080
    with pytest.raises(ValidationError) as excinfo:
        payloads.FaceswapMultiPayload().load({"source_urls": [URL], "target_url": URL, "upscale": 2})
    assert "upscale" in excinfo.value.messages
    # The index order is documented where clients read the parameters.
    field = payloads.FaceswapMultiPayload().fields["target_faces_index"]
    assert "left to right, then top to bottom" in field.metadata["description"]


def test_capabilities_document_the_face_index_order_and_list_faceswap_video(settings: Settings) -> None:
    from app import create_app

    app = create_app(settings)
    try:
        caps = app.test_client().get("/v1/capabilities", headers=ALICE).get_json()["tasks"]
    finally:
        app.extensions["aiorch"].db.dispose()
    tasks = {t["task"]: t for t in caps}
    params = {p["name"]: p for p in tasks["faceswap_multi"]["parameters"]}
    assert "left to right, then top to bottom" in params["target_faces_index"]["description"]
    assert {"upscale", "max_side"} <= set(params)
    detect = {p["name"]: p for p in tasks["face_detect"]["parameters"]}
    assert "max_side" in detect and "left to right" in detect["image_url"]["description"]
    video = tasks["faceswap_video"]
    assert video["installed"] is True and video["queue"] == "gpu.faceswap"
    assert {"source_url", "source_urls", "target_url", "max_side", "upscale"} <= {
        p["name"] for p in video["parameters"]
    }


# ---------------------------------------------------------------------------------------------
# Which engine runs


def test_face_engine_is_the_landmark_engine_until_all_three_insightface_models_are_installed(
    face_settings: Settings,
) -> None:
    pytest.importorskip("onnxruntime")
    from inference.faceswap import InsightFaceSwapper, LandmarkFaceSwapper, MeshFaceSwapper
    from inference.model_store import ModelStore
    from tests.inference.face_models import build_face_models, red_cells

    weight_free = (MeshFaceSwapper, LandmarkFaceSwapper)  # which one: the tests below

    root = face_settings.models_dir
    paths = build_face_models(root)
    store = ModelStore(root)
    # Unique ids: the model cache is per process, and another test may have used plain ones.
    suffix = root.parent.name[-12:].lower().replace("_", "-")
    store.add(paths["detector"], id=f"det-{suffix}")
    store.add(paths["recognition"], id=f"rec-{suffix}")

    first = faces.face_engine(call_for(face_settings, "face_detect", {"image_url": URL}, {}))
    assert isinstance(first, weight_free)
    # Kept per worker process: its models are not loaded again for the next job.
    assert faces.face_engine(call_for(face_settings, "face_detect", {"image_url": URL}, {})) is first

    store.add(paths["swapper"], id=f"swap-{suffix}")
    call = call_for(
        face_settings,
        "faceswap",
        {"source_url": URL, "target_url": URL, "upscale": 0},
        {
            "source_url": Image.fromarray(red_cells([(40, 30)])),
            "target_url": Image.fromarray(red_cells([(15, 20), (50, 30)])),
        },
    )
    engine = faces.face_engine(call)
    assert isinstance(engine, InsightFaceSwapper)
    assert engine.max_faces == face_settings.max_faces
    loaded = {m["id"]: m for m in runtime.model_cache().loaded()}
    key = f"face:insightface:det-{suffix}+rec-{suffix}+swap-{suffix}:{face_settings.max_faces}"
    assert loaded[key]["bytes"] == sum(Path(p).stat().st_size for p in paths.values())
    result = faces.run_faceswap(call)
    assert result.backend == "insightface:inswapper_128"
    assert result.images[0].meta["swapped_faces_index"] == [0, 1]
    assert 0 < result.images[0].meta["timing"]["engine_s"] < 60  # what the GPU bench's ratio (a) reads
    assert faces.face_engine(call) is engine

    # A broken swapper file: face jobs go on, on the landmark engine, and say so.
    Path(paths["swapper"]).write_bytes(b"not an onnx model")
    store.remove(f"swap-{suffix}")
    store.add(paths["detector"], id=f"det2-{suffix}")  # a fresh cache key for the broken set
    store.add(paths["recognition"], id=f"rec2-{suffix}")
    broken = root / "inswapper_128_broken.onnx"
    broken.write_bytes(b"not an onnx model")
    store.add(broken, id=f"swap2-{suffix}")
    store.remove(f"det-{suffix}")
    store.remove(f"rec-{suffix}")
    assert isinstance(faces.face_engine(call), weight_free)


def _weight_free_jobs(settings: Settings, target: Image.Image) -> tuple[Any, Any, Any]:
    """The engine face_engine picks with no InsightFace models, and a face_detect and a faceswap
    run through the adapters on ``target``."""
    detect = call_for(settings, "face_detect", {"image_url": URL}, {"image_url": target})
    swap = call_for(
        settings,
        "faceswap",
        {"source_url": URL, "target_url": URL, "upscale": 0},
        {"source_url": Image.fromarray(marked_source(GREEN)), "target_url": target},
    )
    return faces.face_engine(detect), faces.run_face_detect(detect), faces.run_faceswap(swap)


def test_face_engine_is_the_mediapipe_mesh_engine_when_mediapipe_imports(
    face_settings: Settings, one_face: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mediapipe")
    from inference.faceswap import MeshFaceSwapper

    monkeypatch.setattr(faces, "_landmark_engines", {})
    engine, detected, swapped = _weight_free_jobs(face_settings, one_face)
    assert isinstance(engine, MeshFaceSwapper)
    # face_detect and the swap ran on the same engine, so their face indices agree.
    assert detected.backend == swapped.backend == "landmark-mediapipe-mesh"
    assert len(detected.data["faces"]) == 1 and swapped.images[0].meta["swapped_faces_index"] == [0]


def test_face_engine_falls_back_to_the_haar_engine_when_mediapipe_cannot_be_imported(
    face_settings: Settings, one_face: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    from inference.faceswap import LandmarkFaceSwapper

    # None in sys.modules makes `import mediapipe` raise ImportError, as on a machine without it.
    monkeypatch.setitem(sys.modules, "mediapipe", None)
    monkeypatch.setattr(faces, "_landmark_engines", {})
    engine, detected, swapped = _weight_free_jobs(face_settings, one_face)
    assert isinstance(engine, LandmarkFaceSwapper)
    assert detected.backend == swapped.backend == "landmark-opencv-haar"
    assert len(detected.data["faces"]) == 1 and swapped.images[0].meta["swapped_faces_index"] == [0]


def test_face_engine_limit_follows_aiorch_max_faces(face_settings: Settings, one_face: Image.Image) -> None:
    settings = face_settings.with_overrides(max_faces=2)
    call = call_for(settings, "face_detect", {"image_url": URL}, {"image_url": one_face})
    assert faces.face_engine(call).max_faces == 2
    canvas, _ = group([(20, 60, 0.6), (300, 60, 0.7), (600, 60, 0.8)], size=(400, 900))
    call = call_for(settings, "face_detect", {"image_url": URL}, {"image_url": Image.fromarray(canvas)})
    assert len(faces.run_face_detect(call).data["faces"]) == 2


# ---------------------------------------------------------------------------------------------
# The upscaler of face swaps


@pytest.fixture(scope="module")
def sr_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good x4 model, an x2 model whose file was corrupted after it was added (it ranks first
    at scale 2), and an entry whose file was deleted: a manifest an operator can end up with."""
    import torch

    from inference.model_store import ModelStore
    from tests.inference.tiny_vision import TinyRRDBNet, save_sr_checkpoint

    root = tmp_path_factory.mktemp("sr_models")
    store = ModelStore(root)
    torch.manual_seed(0)
    # Ids a worker would rank: x2plus first at scale 2, then x4plus. Suffixed "-facetest" so
    # the process-wide model cache holds no other test's model under the same key.
    good = save_sr_checkpoint(TinyRRDBNet(scale=4), root / "RealESRGAN_x4plus.pth")
    store.add(good, id="realesrgan_x4plus")
    x2 = save_sr_checkpoint(TinyRRDBNet(scale=2), root / "RealESRGAN_x2plus.pth")
    store.add(x2, id="realesrgan_x2plus")
    x2.write_bytes(b"\x00" * 64)
    gone = save_sr_checkpoint(TinyRRDBNet(scale=4), root / "realesr-general-x4v3.pth")
    store.add(gone, id="realesr-general-x4v3")
    gone.unlink()
    return root


def test_faceswap_passes_over_missing_and_broken_sr_files_and_names_the_one_used(
    base_settings: Settings, sr_models: Path, one_face: Image.Image
) -> None:
    settings = base_settings.with_overrides(models_dir=sr_models)
    source = Image.fromarray(marked_source(GREEN))
    for task, payload, images in [
        ("faceswap", {"source_url": URL, "target_url": URL}, {"source_url": source, "target_url": one_face}),
        (
            "faceswap_multi",
            {"source_urls": [URL], "target_url": URL, "upscale": 1},
            {"source_urls": [source], "target_url": one_face},
        ),
    ]:
        result = getattr(faces, f"run_{task}")(call_for(settings, task, payload, images))
        meta = result.images[0].meta
        assert meta["upscaled"] is True and meta["upscaler"] == "realesrgan_x4plus", task
        assert result.images[0].image.size == one_face.size
        off = getattr(faces, f"run_{task}")(call_for(settings, task, {**payload, "upscale": 0}, images))
        assert off.images[0].meta["upscaled"] is False and off.images[0].meta["upscaler"] is None


def test_faceswap_succeeds_without_upscaling_when_every_sr_file_is_broken(
    base_settings: Settings, tmp_path: Path, one_face: Image.Image
) -> None:
    import torch

    from inference.model_store import ModelStore
    from tests.inference.tiny_vision import TinyRRDBNet, save_sr_checkpoint

    store = ModelStore(tmp_path)
    torch.manual_seed(0)
    path = save_sr_checkpoint(TinyRRDBNet(scale=4), tmp_path / "RealESRGAN_x4plus.pth")
    store.add(path, id="broken-x4-facetest")
    path.write_bytes(b"garbage")
    missing = save_sr_checkpoint(TinyRRDBNet(scale=4), tmp_path / "other.pth")
    store.add(missing, id="missing-x4-facetest")
    missing.unlink()
    settings = base_settings.with_overrides(models_dir=tmp_path)
    call = call_for(
        settings,
        "faceswap",
        {"source_url": URL, "target_url": URL, "upscale": 1},
        {"source_url": Image.fromarray(marked_source(GREEN)), "target_url": one_face},
    )
    result = faces.run_faceswap(call)
    assert result.images[0].meta["upscaled"] is False and result.images[0].meta["upscaler"] is None
    assert colour_pixels(np.asarray(result.images[0].image), GREEN, (0, 0, 340, 320)) > 20


# ---------------------------------------------------------------------------------------------
# EXIF orientation


def _sideways_jpeg() -> bytes:
    """An upright face stored as pixels turned 90 degrees, with the EXIF tag that turns it back
    (Orientation 6: the viewer rotates 90 degrees clockwise), as a phone saves a portrait."""
    canvas, _ = group([(60, 40, 1.0)], size=(340, 320))
    stored = Image.fromarray(canvas).rotate(90, expand=True)  # counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def test_inputs_are_decoded_upright_by_their_exif_orientation(face_settings: Settings) -> None:
    data = _sideways_jpeg()
    raw = Image.open(io.BytesIO(data))
    assert raw.size == (340, 320)
    upright = decode_image(data)
    assert upright.size == (320, 340)
    assert np.abs(np.asarray(upright).astype(int)[40:300, 60:260] - head()).mean() < 12

    def detected(image: Image.Image) -> list[dict[str, Any]]:
        call = call_for(face_settings, "face_detect", {"image_url": URL}, {"image_url": image})
        return faces.run_face_detect(call).data["faces"]

    def level(face: dict[str, Any]) -> bool:
        marks = face["landmarks"]
        if "left_eye" not in marks:
            return False
        dx, dy = np.subtract(marks["right_eye"], marks["left_eye"])
        return abs(dy) < 0.3 * abs(dx)

    # Lying on its side the face is not found (the Haar cascade) or found with its eyes one above
    # the other (the mediapipe mesh); the decoded picture has it upright, eyes level.
    assert not any(level(face) for face in detected(raw))
    found = detected(upright)
    assert len(found) == 1 and (level(found[0]) or not found[0]["landmarks"])


# ---------------------------------------------------------------------------------------------
# Video inputs


def test_video_inputs_are_probed_for_container_size_and_frame_count(
    settings: Settings, tmp_path: Path
) -> None:
    pytest.importorskip("av")
    from tasks.inputs import InputProblem, check_video
    from tests.inference.face_video import face_video

    path = tmp_path / "clip.mp4"
    face_video(path, frames=6)
    data = path.read_bytes()
    checked = check_video(data, "target_url", settings)
    assert (checked.ext, checked.width, checked.height, checked.frames) == ("mp4", 480, 360, 6)
    assert checked.has_audio
    for limits, code in [
        ({"max_video_frames": 5}, "input_too_long"),
        ({"max_video_bytes": len(data) - 1}, "input_too_large"),
        ({"max_input_pixels": 480 * 360 - 1}, "input_too_many_pixels"),
    ]:
        with pytest.raises(InputProblem) as excinfo:
            check_video(data, "target_url", settings.with_overrides(**limits))
        assert (excinfo.value.code, excinfo.value.field) == (code, "target_url"), limits
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, "PNG")
    for not_video in (b"not a video", png.getvalue()):
        with pytest.raises(InputProblem) as excinfo:
            check_video(not_video, "target_url", settings)
        assert excinfo.value.code == "input_not_video"


def test_faceswap_video_payload_takes_one_source_or_a_mapping_and_no_image_fields() -> None:
    schema = payloads.FaceswapVideoPayload
    loaded = schema().load({"source_url": URL, "target_url": URL})
    assert loaded["max_side"] == 1080 and loaded["upscale"] == 1
    multi = schema().load({"source_urls": [URL, URL], "target_url": URL, "target_faces_index": [1, 0]})
    assert multi["target_faces_index"] == [1, 0]
    for bad, field in [
        ({"target_url": URL}, "source_url"),
        ({"source_url": URL, "source_urls": [URL], "target_url": URL}, "source_url"),
        ({"source_url": URL, "target_url": URL, "format": "png"}, "format"),
        ({"source_url": URL, "target_url": URL, "max_faces": 9}, "max_faces"),
        ({"source_urls": [URL], "target_url": URL, "target_faces_index": [0, 1]}, "target_faces_index"),
    ]:
        with pytest.raises(ValidationError) as excinfo:
            schema(max_faces=8).load(bad)
        assert field in excinfo.value.messages, bad


def test_models_add_takes_a_role_for_an_onnx_file_its_name_does_not_explain(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from click.testing import CliRunner

    from app.cli import main
    from inference.model_store import ModelStore
    from tests.inference.face_models import build_face_models

    paths = build_face_models(tmp_path / "built")
    renamed = tmp_path / "my_recognizer.onnx"
    renamed.write_bytes(Path(paths["recognition"]).read_bytes())
    models = tmp_path / "models"
    env = {"AIORCH_MODELS_DIR": str(models), "AIORCH_VAR_DIR": str(tmp_path)}

    def add(*args: str):
        return CliRunner().invoke(main, ["models", "add", *args], env=env)

    added = add(str(renamed), "--role", "face_recognizer")
    assert added.exit_code == 0, added.output
    assert "faceswap" in added.output
    assert ModelStore(models).get("my_recognizer").extra == {"role": "face_recognizer"}
    assert add(str(paths["swapper"])).exit_code == 0  # named inswapper_128: role from the name
    assert ModelStore(models).get("inswapper_128").extra["role"] == "face_swapper"
    refused = add(str(renamed), "--id", "other", "--role", "face_painter")
    assert refused.exit_code != 0 and "face_painter" in refused.output
