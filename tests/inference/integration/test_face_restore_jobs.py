"""Face restoration through the platform (issue 16): the API, a real cpu and gpu worker, Postgres
and RabbitMQ, and a GFPGAN file with random weights in the model store.

The store starts without a restorer (``face_enhance`` is then a 422 naming the field); the
GFPGAN file is added while the platform runs, as an operator would with ``aiorch models add``,
beside a broken one that ranks first, so every restoring job also proves it is passed over. Last,
the GFPGAN files make way for a CodeFormer file (spandrel_extra_arches, the dev extra), which
restores at the payload's ``face_fidelity``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from config import Settings
from inference.model_store import ModelStore
from tests.conftest import KEYS
from tests.inference.face_images import GREEN, astronaut, marked_source
from tests.inference.face_restorers import save_codeformer, save_gfpgan
from tests.support.platform import Platform
from tests.support.platform_fixtures import platform_settings, running_platform
from tests.support.servers import ImageServer

ALICE = KEYS[0][1]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("restore_models")


@pytest.fixture(scope="module")
def platform(
    base_settings: Settings, worker_amqp_url: str, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp("restore")
    settings = platform_settings(base_settings, tmp, broker_url=worker_amqp_url, models_dir=models_dir)
    with running_platform(settings, tmp) as plat:
        yield plat


@pytest.fixture(scope="module")
def portraits(images: ImageServer) -> ImageServer:
    # Half size: upscaled x2, the output is the photo's own size, her face ~100 px wide.
    Image.fromarray(astronaut()).resize((256, 256), Image.Resampling.LANCZOS).save(images.folder / "half.png")
    Image.fromarray(marked_source(GREEN)).save(images.folder / "source.png")
    return images


@pytest.fixture(scope="module")
def restorers(models_dir: Path) -> ModelStore:
    store = ModelStore(models_dir)
    broken = save_gfpgan(models_dir / "GFPGANv1.5.pth", seed=1)
    store.add(broken, id="gfpganv1.5")
    broken.write_bytes(b"\x00" * 128)  # broken after it was registered
    store.add(save_gfpgan(models_dir / "GFPGANv1.4.pth"), id="gfpganv1.4")
    return store


def fetch(url: str) -> np.ndarray:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def test_face_enhance_without_a_restorer_is_a_422_naming_the_field(
    platform: Platform, portraits: ImageServer
) -> None:
    for task, payload in (
        ("upscale", {"image_url": portraits.url("img/half.png")}),
        (
            "faceswap",
            {"source_url": portraits.url("img/source.png"), "target_url": portraits.url("img/half.png")},
        ),
    ):
        response = platform.submit(ALICE, task, {**payload, "face_enhance": True})
        assert response.status_code == 422, response.text
        assert "face-restoration model" in response.json()["error"]["details"]["payload"]["face_enhance"][0]


def test_upscale_with_face_enhance_restores_the_face_and_names_the_restorer(
    platform: Platform, portraits: ImageServer, restorers: ModelStore
) -> None:
    listed = requests.get(
        platform.base_url + "/v1/models?type=face_restorer", headers=platform.headers(ALICE), timeout=10
    ).json()
    assert sorted(m["id"] for m in listed["data"]) == ["gfpganv1.4", "gfpganv1.5"]
    url = portraits.url("img/half.png")
    plain = platform.wait(
        ALICE, platform.submit(ALICE, "upscale", {"image_url": url}).json()["job_id"], timeout=60
    )
    job = platform.wait(
        ALICE,
        platform.submit(ALICE, "upscale", {"image_url": url, "face_enhance": True}).json()["job_id"],
        timeout=180,
    )
    assert job["status"] == "succeeded", job
    meta = job["result"]["meta"]
    assert meta["backend"] == "lanczos+gfpgan:gfpganv1.4"
    assert meta["face_enhance"] == "gfpgan:gfpganv1.4" and meta["faces_restored"] == 1
    before, after = fetch(plain["result"]["url"]).astype(int), fetch(job["result"]["url"]).astype(int)
    assert after.shape == before.shape == (512, 512, 3)
    changed = np.abs(after - before).max(axis=2) > 0
    # Her face (around x 180-270, y 70-175 of the full photo) changed; the corners did not.
    assert changed[70:175, 180:270].mean() > 0.5
    assert not changed[:60, :60].any() and not changed[-60:, -60:].any()


def test_faceswap_with_face_enhance_names_the_restorer(
    platform: Platform, portraits: ImageServer, restorers: ModelStore
) -> None:
    payload = {
        "source_url": portraits.url("img/source.png"),
        "target_url": portraits.url("img/half.png"),
        "upscale": 0,
        "face_enhance": True,
    }
    job = platform.wait(ALICE, platform.submit(ALICE, "faceswap", payload).json()["job_id"], timeout=180)
    assert job["status"] == "succeeded", job
    meta = job["result"]["meta"]
    assert meta["face_enhance"] == "gfpgan:gfpganv1.4" and meta["faces_restored"] == 1


def test_a_broken_restorer_alone_fails_the_job_clearly(
    platform: Platform, portraits: ImageServer, restorers: ModelStore, models_dir: Path
) -> None:
    restorers.remove("gfpganv1.4")  # the broken gfpganv1.5 is left
    try:
        payload = {"image_url": portraits.url("img/half.png"), "face_enhance": True}
        job = platform.wait(ALICE, platform.submit(ALICE, "upscale", payload).json()["job_id"], timeout=60)
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "invalid_model"
        assert "not a readable face restoration model file" in job["error"]["message"]
        # The worker carries on: a plain upscale right after it succeeds.
        plain = platform.submit(ALICE, "upscale", {"image_url": portraits.url("img/half.png")}).json()
        assert platform.wait(ALICE, plain["job_id"], timeout=60)["status"] == "succeeded"
    finally:
        restorers.add(models_dir / "GFPGANv1.4.pth", id="gfpganv1.4")


def test_upscale_with_codeformer_restores_the_face_at_the_payloads_fidelity(
    platform: Platform, portraits: ImageServer, restorers: ModelStore, models_dir: Path
) -> None:
    # GFPGAN ranks first: with it gone, the CodeFormer file is the one installed restorer.
    for model_id in ("gfpganv1.4", "gfpganv1.5"):
        restorers.remove(model_id)
    restorers.add(save_codeformer(models_dir / "codeformer.pth"), id="codeformer")
    try:
        url = portraits.url("img/half.png")
        plain = platform.wait(
            ALICE, platform.submit(ALICE, "upscale", {"image_url": url}).json()["job_id"], timeout=60
        )
        payload = {"image_url": url, "face_enhance": True, "face_fidelity": 0.7}
        job = platform.wait(ALICE, platform.submit(ALICE, "upscale", payload).json()["job_id"], timeout=240)
        assert job["status"] == "succeeded", job
        meta = job["result"]["meta"]
        assert meta["backend"] == "lanczos+codeformer:codeformer"
        assert meta["face_enhance"] == "codeformer:codeformer" and meta["faces_restored"] == 1
        before, after = fetch(plain["result"]["url"]).astype(int), fetch(job["result"]["url"]).astype(int)
        changed = np.abs(after - before).max(axis=2) > 0
        assert changed[70:175, 180:270].mean() > 0.5
        assert not changed[:60, :60].any() and not changed[-60:, -60:].any()
    finally:
        restorers.remove("codeformer")
        restorers.add(models_dir / "GFPGANv1.4.pth", id="gfpganv1.4")
