"""Face jobs through the platform: the API, a real cpu and gpu worker, Postgres and RabbitMQ.

The model store holds a good Real-ESRGAN x4 model beside a broken x2 one (which ranks first for
the face enhancer), so every swap with ``upscale=1`` also proves the broken file is passed over.
The InsightFace test installs tiny ONNX models into the same store while the workers run.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from config import Settings
from tests.conftest import KEYS
from tests.inference.face_images import GREEN, colour_pixels, group, marked_source
from tests.support.platform import Platform
from tests.support.platform_fixtures import platform_settings, running_platform
from tests.support.servers import ImageServer

ALICE = KEYS[0][1]
PLACES = [(60, 150, 1.0), (420, 140, 1.1), (760, 160, 0.9)]
# The weight-free engine the workers pick: the mediapipe mesh where mediapipe is installed (the
# Makefile installs it), else the Haar fallback (inference.engines.faces.face_engine).
WEIGHT_FREE = "landmark-mediapipe-mesh" if importlib.util.find_spec("mediapipe") else "landmark-opencv-haar"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from inference.model_store import ModelStore
    from tests.inference.tiny_vision import TinyRRDBNet, save_sr_checkpoint

    folder = tmp_path_factory.mktemp("face_models")
    store = ModelStore(folder)
    torch.manual_seed(0)
    store.add(
        save_sr_checkpoint(TinyRRDBNet(scale=4), folder / "RealESRGAN_x4plus.pth"), id="realesrgan_x4plus"
    )
    x2 = save_sr_checkpoint(TinyRRDBNet(scale=2), folder / "RealESRGAN_x2plus.pth")
    store.add(x2, id="realesrgan_x2plus")
    x2.write_bytes(b"\x00" * 128)  # broken after it was registered
    return folder


@pytest.fixture(scope="module")
def platform(
    base_settings: Settings, worker_amqp_url: str, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp("faces")
    settings = platform_settings(base_settings, tmp, broker_url=worker_amqp_url, models_dir=models_dir)
    with running_platform(settings, tmp) as plat:
        yield plat


@pytest.fixture(scope="module")
def faces(images: ImageServer) -> ImageServer:
    canvas, _ = group(PLACES)
    Image.fromarray(canvas).save(images.folder / "group.png")
    Image.fromarray(canvas).resize((2000, 1200), Image.Resampling.LANCZOS).save(images.folder / "group2x.png")
    Image.fromarray(marked_source(GREEN)).save(images.folder / "source.png")
    # A phone-style portrait: the pixels lie on their side, EXIF Orientation 6 turns them upright.
    one, _ = group([(60, 40, 1.0)], size=(340, 320))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(one).rotate(90, expand=True).save(images.folder / "sideways.jpg", "JPEG", exif=exif)
    return images


def fetch(url: str) -> np.ndarray:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def run(platform: Platform, task: str, payload: dict, timeout: float = 90) -> dict:
    response = platform.submit(ALICE, task, payload)
    assert response.status_code == 202, response.text
    return platform.wait(ALICE, response.json()["job_id"], timeout=timeout)


def test_seed_style_blocking_faceswap_with_source_urls_and_upscale_succeeds(
    platform: Platform, faces: ImageServer
) -> None:
    response = requests.post(
        f"{platform.base_url}/faceswap",
        headers={"X-API-Key": ALICE},
        timeout=120,
        json={
            "source_urls": [faces.url("img/source.png")],
            "target_url": faces.url("img/group.png"),
            "target_faces_index": [1],
            "upscale": 1,
            "format": "png",
        },
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded", job
    assert job["task"] == "faceswap_multi"
    meta = job["result"]["meta"]
    assert meta["backend"] == WEIGHT_FREE
    # The broken x2 file ranks first for faces; it is passed over for the x4 model.
    assert meta["upscaled"] is True and meta["upscaler"] == "realesrgan_x4plus"
    assert meta["swapped_faces_index"] == [1]
    # The tiny SR model's weights are random, so the enhanced face is noise: check where the
    # pixels changed, not what they show. PNG out: untouched pixels are exact.
    out = fetch(job["result"]["url"]).astype(int)
    original, rects = group(PLACES)
    for i, (x0, y0, x1, y1) in enumerate(rects):
        changed = np.abs(out[y0:y1, x0:x1] - original[y0:y1, x0:x1]).mean()
        assert (changed > 2) if i == 1 else (changed == 0), (i, changed)

    plain = run(
        platform,
        "faceswap",
        {"source_url": faces.url("img/source.png"), "target_url": faces.url("img/group.png"), "upscale": 0},
    )
    assert plain["status"] == "succeeded", plain
    assert plain["result"]["meta"]["upscaler"] is None and plain["result"]["meta"]["upscaled"] is False


def test_face_detect_indices_are_the_ones_faceswap_multi_uses_at_the_same_max_side(
    platform: Platform, faces: ImageServer
) -> None:
    detect = run(platform, "face_detect", {"image_url": faces.url("img/group2x.png"), "max_side": 1000})
    assert detect["status"] == "succeeded", detect
    found = detect["result"]["faces"]
    assert [f["index"] for f in found] == [0, 1, 2]
    # Boxes are in the input's own pixels (2000 wide), ordered left to right.
    assert detect["result"]["width"] == 2000
    assert [f["box"]["x1"] for f in found] == sorted(f["box"]["x1"] for f in found)
    assert found[2]["box"]["x1"] > 1400

    swap = run(
        platform,
        "faceswap_multi",
        {
            "source_urls": [faces.url("img/source.png")],
            "target_url": faces.url("img/group2x.png"),
            "target_faces_index": [2],
            "max_side": 1000,
            "upscale": 0,
        },
    )
    assert swap["status"] == "succeeded", swap
    out = fetch(swap["result"]["url"])
    assert out.shape[:2] == (600, 1000)
    # Face 2 of face_detect, scaled to the 1000 px output, is the face that changed.
    half = [{k: v / 2 for k, v in f["box"].items()} for f in found]
    boxes = [(b["x1"], b["y1"], b["x2"], b["y2"]) for b in half]
    assert colour_pixels(out, GREEN, boxes[2]) > 20
    assert colour_pixels(out, GREEN, boxes[0]) == 0 and colour_pixels(out, GREEN, boxes[1]) == 0


def test_face_detect_sees_a_phone_portrait_upright_by_its_exif_orientation(
    platform: Platform, faces: ImageServer
) -> None:
    job = run(platform, "face_detect", {"image_url": faces.url("img/sideways.jpg")})
    assert job["status"] == "succeeded", job
    assert (job["result"]["width"], job["result"]["height"]) == (320, 340)
    assert len(job["result"]["faces"]) == 1


def test_max_faces_over_aiorch_max_faces_is_a_422_naming_the_field(
    platform: Platform, faces: ImageServer
) -> None:
    payload = {"source_url": faces.url("img/source.png"), "target_url": faces.url("img/group.png")}
    response = platform.submit(ALICE, "faceswap", {**payload, "max_faces": 9})
    assert response.status_code == 422
    assert "max_faces" in response.json()["error"]["details"]["payload"]
    job = run(platform, "faceswap", {**payload, "max_faces": 1, "upscale": 0})
    assert job["status"] == "succeeded", job
    assert len(job["result"]["meta"]["swapped_faces_index"]) == 1


def test_faceswap_video_swaps_every_frame_and_keeps_the_audio(
    platform: Platform, faces: ImageServer, tmp_path: Path
) -> None:
    pytest.importorskip("av")
    from tests.inference.face_video import face_video, read_video

    rects = face_video(faces.folder / "clip.mp4", frames=8)
    response = requests.post(
        f"{platform.base_url}/faceswap/video",
        headers={"X-API-Key": ALICE},
        timeout=180,
        json={
            "source_url": faces.url("img/source.png"),
            "target_url": faces.url("img/clip.mp4"),
            "upscale": 0,
        },
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded", job
    assert job["progress"] == 100
    result = job["result"]
    assert result["filename"].endswith(".mp4")
    assert result["meta"]["backend"] == f"{WEIGHT_FREE}+video"
    assert result["meta"]["frames"] == 8 and result["meta"]["audio"] is True
    download = requests.get(result["url"], timeout=10)
    assert download.status_code == 200 and download.headers["Content-Type"] == "video/mp4"
    (tmp_path / "out.mp4").write_bytes(download.content)
    before, _ = read_video(faces.folder / "clip.mp4")
    after, kinds = read_video(tmp_path / "out.mp4")
    assert len(after) == len(before) == 8 and sorted(kinds) == ["audio", "video"]
    for frame_in, frame_out, rect in zip(before, after, rects, strict=True):
        assert colour_pixels(frame_out, GREEN, rect) > 20
        assert colour_pixels(frame_in, GREEN, rect) == 0

    # A picture is not a video: refused while the inputs are checked, naming the field.
    bad = run(
        platform,
        "faceswap_video",
        {"source_url": faces.url("img/source.png"), "target_url": faces.url("img/group.png")},
    )
    assert bad["status"] == "failed" and bad["error"]["code"] == "input_not_video"
    assert bad["error"]["details"] == {"field": "target_url"}


def test_insightface_engine_serves_face_jobs_once_its_three_models_are_installed(
    platform: Platform, faces: ImageServer, models_dir: Path
) -> None:
    pytest.importorskip("onnxruntime")
    from inference.model_store import ModelStore
    from tests.inference.face_models import build_face_models, red_cells

    Image.fromarray(red_cells([(40, 30)])).save(faces.folder / "red_source.png")
    Image.fromarray(red_cells([(15, 20), (50, 30)])).save(faces.folder / "red_target.png")
    store = ModelStore(models_dir)
    paths = build_face_models(models_dir / "insightface")
    ids = [store.add(path).id for path in paths.values()]  # roles from the file names
    try:
        assert {store.get(i).extra["role"] for i in ids} == {
            "face_detector",
            "face_recognizer",
            "face_swapper",
        }
        job = run(
            platform,
            "faceswap",
            {"source_url": faces.url("img/red_source.png"), "target_url": faces.url("img/red_target.png")},
        )
        assert job["status"] == "succeeded", job
        meta = job["result"]["meta"]
        assert meta["backend"] == "insightface:inswapper_128"
        # The worker's onnxruntime providers, CUDA first where the build has it; CPU alone here.
        ort = pytest.importorskip("onnxruntime")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            assert meta["providers"] == ["CPUExecutionProvider"]
        assert meta["providers"][-1] == "CPUExecutionProvider"
        assert meta["swapped_faces_index"] == [0, 1] and meta["upscaler"] == "realesrgan_x4plus"
        before = np.asarray(Image.open(faces.folder / "red_target.png").convert("RGB")).astype(int)
        after = fetch(job["result"]["url"]).astype(int)
        assert np.abs(after[210:270, 370:430] - before[210:270, 370:430]).mean() > 5

        detect = run(platform, "face_detect", {"image_url": faces.url("img/red_target.png")})
        assert detect["status"] == "succeeded", detect
        assert detect["result"]["meta"]["backend"] == "insightface:inswapper_128"
        assert [f["index"] for f in detect["result"]["faces"]] == [0, 1]
        diag = requests.get(f"{platform.base_url}/diag/backends", headers={"X-API-Key": ALICE}, timeout=10)
        gpu = next(w for w in diag.json()["workers"] if w["name"] == "gpu@test")
        assert any(m["id"].startswith("face:insightface:") for m in gpu["loaded_models"]), gpu
        # Where its ONNX sessions run, for an operator to see a GPU worker quietly on the CPU.
        onnx = [d["onnx"] for d in gpu["devices"] if "onnx" in d]
        assert onnx and onnx[0]["sessions_on"] == ["CPUExecutionProvider"], gpu["devices"]
        assert "CPUExecutionProvider" in onnx[0]["available"]
    finally:
        for model_id in ids:
            store.remove(model_id)
