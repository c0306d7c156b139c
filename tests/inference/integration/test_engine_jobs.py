"""The engines wired into jobs: neural upscaling from the model store, background removal, faces."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from config import Settings
from tests.conftest import KEYS
from tests.support.platform import Platform
from tests.support.platform_fixtures import platform_settings, running_platform
from tests.support.servers import ImageServer

ALICE = KEYS[0][1]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from inference.model_store import ModelStore
    from tests.inference.tiny_vision import TinyRRDBNet, save_sr_checkpoint

    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    path = save_sr_checkpoint(TinyRRDBNet(scale=4), folder / "RealESRGAN_x4plus.pth")
    ModelStore(folder).add(path, id="realesrgan_x4plus")
    # A tiny SSDlite with random (but lively) weights and its label map, as an operator installs one.
    from torchvision.models import detection

    from tests.inference.tiny_vision import liven_detector, write_label_map

    detector = liven_detector(
        detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)
    ).eval()
    weights = folder / "ssdlite-tiny.pth"
    torch.save(detector.state_dict(), weights)
    write_label_map(folder / "ssdlite-tiny.labels.json", ["__background__", "cat", "dog", "kite"])
    ModelStore(folder).add(weights, id="ssdlite-tiny")
    return folder


@pytest.fixture(scope="module")
def platform(
    base_settings: Settings, worker_amqp_url: str, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp("engines")
    # Room for eight jobs beyond the worker's slot: the batching test sends several upscales to
    # gpu.superres while its worker is away, to find them all waiting there when it is back.
    settings = platform_settings(
        base_settings, tmp, broker_url=worker_amqp_url, models_dir=models_dir, dispatch_ahead=8
    )
    with running_platform(settings, tmp) as plat:
        yield plat


@pytest.fixture(scope="module")
def faces(images: ImageServer) -> ImageServer:
    from tests.inference.face_images import group, marked_source

    canvas, _rects = group([(60, 150, 1.0), (420, 140, 1.1), (760, 160, 0.9)])
    Image.fromarray(canvas).save(images.folder / "group.png")
    Image.fromarray(marked_source((0, 255, 0))).save(images.folder / "source.png")
    return images


def fetch(url: str) -> Image.Image:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.content))


def test_upscale_uses_the_installed_real_esrgan_model_and_says_so(
    platform: Platform, images: ImageServer
) -> None:
    job = platform.wait(
        ALICE,
        platform.submit(ALICE, "upscale", {"image_url": images.url("img/astronaut.png"), "scale": 2}).json()[
            "job_id"
        ],
        timeout=90,
    )
    assert job["status"] == "succeeded", job
    assert job["result"]["meta"]["backend"] == "realesrgan:realesrgan_x4plus"
    assert fetch(job["result"]["url"]).size == (192, 192)
    lanczos = platform.wait(
        ALICE,
        platform.submit(
            ALICE, "upscale", {"image_url": images.url("img/astronaut.png"), "model": "lanczos"}
        ).json()["job_id"],
    )
    assert lanczos["result"]["meta"]["backend"] == "lanczos"
    missing = platform.wait(
        ALICE,
        platform.submit(
            ALICE, "upscale", {"image_url": images.url("img/astronaut.png"), "model": "nope"}
        ).json()["job_id"],
    )
    assert missing["status"] == "failed" and missing["error"]["details"] == {"field": "model"}


def test_remove_background_returns_png_with_alpha_and_an_optional_mask(
    platform: Platform, images: ImageServer
) -> None:
    job = platform.wait(
        ALICE,
        platform.submit(
            ALICE, "remove_background", {"image_url": images.url("img/astronaut.png"), "return_mask": True}
        ).json()["job_id"],
        timeout=60,
    )
    assert job["status"] == "succeeded", job
    assert job["result"]["meta"]["backend"] == "opencv-grabcut"
    cutout = fetch(job["result"]["url"])
    assert cutout.format == "PNG" and cutout.mode == "RGBA"
    alpha = np.asarray(cutout.getchannel("A"))
    assert alpha.min() == 0 and alpha.max() == 255
    assert len(job["result"]["files"]) == 2


def test_face_detect_returns_indexed_faces_left_to_right(platform: Platform, faces: ImageServer) -> None:
    job = platform.wait(
        ALICE,
        platform.submit(ALICE, "face_detect", {"image_url": faces.url("img/group.png")}).json()["job_id"],
        timeout=60,
    )
    assert job["status"] == "succeeded", job
    found = job["result"]["faces"]
    assert [f["index"] for f in found] == [0, 1, 2]
    assert [f["box"]["x1"] for f in found] == sorted(f["box"]["x1"] for f in found)


def test_faceswap_and_multi_change_the_target_and_refuse_faceless_sources(
    platform: Platform, faces: ImageServer
) -> None:
    payload = {
        "source_url": faces.url("img/source.png"),
        "target_url": faces.url("img/group.png"),
        "upscale": 0,
    }
    job = platform.wait(ALICE, platform.submit(ALICE, "faceswap", payload).json()["job_id"], timeout=60)
    assert job["status"] == "succeeded", job
    assert job["result"]["meta"]["backend"].startswith("landmark-")  # mediapipe mesh or Haar
    swapped = np.asarray(fetch(job["result"]["url"]).convert("RGB")).astype(int)
    original = np.asarray(Image.open(faces.folder / "group.png").convert("RGB")).astype(int)
    assert swapped.shape == original.shape
    assert np.abs(swapped - original).sum() > 0

    multi = platform.wait(
        ALICE,
        platform.submit(
            ALICE,
            "faceswap_multi",
            {
                "source_urls": [faces.url("img/source.png")],
                "target_url": faces.url("img/group.png"),
                "swap_faces_index": [0],
                "target_faces_index": [2],
            },
        ).json()["job_id"],
        timeout=60,
    )
    assert multi["status"] == "succeeded", multi

    bad = platform.wait(
        ALICE,
        platform.submit(
            ALICE,
            "faceswap_multi",
            {
                "source_urls": [faces.url("img/source.png")],
                "target_url": faces.url("img/group.png"),
                "swap_faces_index": [0],
                "target_faces_index": [7],
            },
        ).json()["job_id"],
        timeout=60,
    )
    assert bad["status"] == "failed" and bad["error"]["code"] == "index_out_of_range"

    blank = Image.new("RGB", (200, 200), (120, 130, 140))
    blank.save(faces.folder / "blank.png")
    none = platform.wait(
        ALICE,
        platform.submit(
            ALICE,
            "faceswap",
            {"source_url": faces.url("img/blank.png"), "target_url": faces.url("img/group.png")},
        ).json()["job_id"],
        timeout=60,
    )
    assert none["status"] == "failed" and none["error"]["code"] == "no_face_in_source"


def test_scan_objects_returns_json_objects_from_the_installed_detector(
    platform: Platform, images: ImageServer
) -> None:
    response = requests.post(
        f"{platform.base_url}/scan-objects",
        headers={"X-API-Key": ALICE},
        timeout=90,
        json={"image_url": images.url("img/astronaut.png"), "min_score": 0.0, "max_objects": 5},
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded", job
    assert job["result"]["meta"]["backend"].endswith("ssdlite-tiny")
    objects = job["result"]["objects"]
    assert 0 < len(objects) <= 5
    assert {o["label"] for o in objects} <= {"cat", "dog", "kite"}
    assert all(set(o["box"]) == {"x1", "y1", "x2", "y2"} and 0 <= o["score"] <= 1 for o in objects)
    assert [o["score"] for o in objects] == sorted((o["score"] for o in objects), reverse=True)


def test_blocking_remove_background(platform: Platform, images: ImageServer) -> None:
    response = requests.post(
        f"{platform.base_url}/remove-background",
        headers={"X-API-Key": ALICE},
        json={"image_url": images.url("img/astronaut.png")},
        timeout=90,
    )
    assert response.status_code == 200 and response.json()["status"] == "succeeded"


def test_blocking_faceswap_and_diag_shows_the_loaded_model(platform: Platform, faces: ImageServer) -> None:
    response = requests.post(
        f"{platform.base_url}/faceswap",
        headers={"X-API-Key": ALICE},
        timeout=90,
        json={
            "source_url": faces.url("img/source.png"),
            "target_url": faces.url("img/group.png"),
            "upscale": 1,
        },
    )
    assert response.status_code == 200 and response.json()["status"] == "succeeded"
    diag = requests.get(f"{platform.base_url}/diag/backends", headers={"X-API-Key": ALICE}, timeout=10).json()
    gpu = next(w for w in diag["workers"] if w["name"] == "gpu@test")
    assert any(m["id"].startswith("sr:realesrgan_x4plus#") for m in gpu["loaded_models"]), gpu
    assert all(d["device"] == "cpu" and d["rss_bytes"] > 0 for d in gpu["devices"])


GPU_QUEUES = "gpu.diffusion,gpu.superres,gpu.faceswap,gpu.vision"


def wait_until_prepared(settings: Settings, job_ids: list[str], timeout: float = 60.0) -> None:
    """Until every job's inputs are fetched and it waits for a GPU worker (stage ``run``)."""
    import time

    from sqlalchemy import select

    from models.db import Database
    from models.jobs import Job

    db = Database(settings)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with db.session() as session:
                stages = set(session.scalars(select(Job.stage).where(Job.id.in_(job_ids))))
            if stages == {"run"}:
                return
            time.sleep(0.1)
        raise AssertionError(f"jobs not prepared: stages {stages}")
    finally:
        db.dispose()


def test_small_upscale_jobs_waiting_together_run_as_one_batch(
    platform: Platform, images: ImageServer
) -> None:
    import signal

    Image.open(images.folder / "astronaut.png").convert("RGB").resize((64, 48)).save(
        images.folder / "wide.png"
    )
    # The GPU worker is away while the jobs are accepted and their inputs fetched, so they all wait
    # on gpu.superres at once; the worker that comes back claims one and takes the others along.
    platform.kill("gpu", signal.SIGTERM)
    try:
        same = [
            platform.submit(
                ALICE, "upscale", {"image_url": images.url("img/astronaut.png"), "scale": s}
            ).json()["job_id"]
            for s in (2, 2, 1.5, 2)
        ]
        other_size = platform.submit(ALICE, "upscale", {"image_url": images.url("img/wide.png")}).json()[
            "job_id"
        ]
        wait_until_prepared(platform.settings, [*same, other_size])
    finally:
        platform.start_worker("gpu", GPU_QUEUES, 1)

    jobs = [platform.wait(ALICE, job_id, timeout=120) for job_id in same]
    assert [j["status"] for j in jobs] == ["succeeded"] * 4, jobs
    metas = [j["result"]["meta"] for j in jobs]
    assert [m["batch_size"] for m in metas] == [4, 4, 4, 4]
    assert len({m["batch_id"] for m in metas}) == 1 and metas[0]["batch_id"] in same
    assert all(m["backend"] == "realesrgan:realesrgan_x4plus" for m in metas)
    assert [fetch(j["result"]["url"]).size for j in jobs] == [(192, 192), (192, 192), (144, 144), (192, 192)]
    # Each job of the batch kept its own run: its own start, finish and single attempt.
    assert all(j["attempts"] == 1 and j["started_at"] and j["finished_at"] for j in jobs)
    # The partners' own messages reach the worker afterwards and are dropped, not run again.
    import time

    partners = set(same) - {metas[0]["batch_id"]}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        log = (platform.logs / "gpu.log").read_text(errors="replace")
        dropped = {job_id for job_id in partners if f"not running {job_id}: " in log}
        if dropped == partners:
            break
        time.sleep(0.2)
    assert dropped == partners

    alone = platform.wait(ALICE, other_size, timeout=60)
    assert alone["status"] == "succeeded", alone
    assert alone["result"]["meta"]["batch_size"] == 1 and "batch_id" not in alone["result"]["meta"]
    assert fetch(alone["result"]["url"]).size == (128, 96)


def test_sixteen_bit_png_upscales_to_jpeg_and_under_a_watermark_without_clipping(
    platform: Platform, images: ImageServer
) -> None:
    row = np.linspace(0, 65535, 96)
    ramp = np.tile(row, (64, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(images.folder / "ramp16.png")
    url = images.url("img/ramp16.png")
    as_jpeg = platform.submit(ALICE, "upscale", {"image_url": url, "model": "lanczos", "format": "jpg"})
    marked = platform.submit(
        ALICE, "upscale", {"image_url": url, "model": "lanczos", "watermark": {"position": "bottomright"}}
    )
    expected = np.tile(np.linspace(0, 255, 192), (128, 1))
    for response, fmt in ((as_jpeg, "JPEG"), (marked, "PNG")):
        job = platform.wait(ALICE, response.json()["job_id"], timeout=60)
        assert job["status"] == "succeeded", job
        out = fetch(job["result"]["url"])
        assert out.format == fmt and out.size == (192, 128)
        top = np.asarray(out.convert("L")).astype(float)[:40]  # away from the label
        # Clipping would turn everything but the darkest columns white (mean near 255).
        assert np.abs(top - expected[:40]).mean() < 4
