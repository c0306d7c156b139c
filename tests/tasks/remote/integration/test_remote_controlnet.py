"""A ``generate`` job with ControlNets routed to SenseTime, end to end: each ControlNet's image
reaches the provider as our public copy of the checked input, inside seed 001's
``controlnet_configs``, and a ControlNet the seed cannot take fails the job naming the field."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator

import pytest
import requests
from PIL import Image
from skimage import data

from config import Settings
from tests.conftest import KEYS
from tests.fakes.sensetime_fake import SenseTimeFake
from tests.support.platform import Platform
from tests.support.platform_fixtures import routed_platform
from tests.support.remote_providers import providers

ALICE = KEYS[0][1]
AK, SK = "st-ak", "st-sk-0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def st() -> Iterator[SenseTimeFake]:
    fake = SenseTimeFake(keys={AK: SK}, clock=time.time)  # type: ignore[arg-type]
    with fake.running():
        yield fake


@pytest.fixture(scope="module")
def platform(
    base_settings: Settings, worker_amqp_url: str, st: SenseTimeFake, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    routes = {
        "poll_interval": 0.3,
        "max_poll_interval": 1,
        "providers": providers({"st": st}),
        "routes": {"gg_image": [{"backend": "st", "task": "generate", "options": {"model_id": "model040"}}]},
    }
    tmp = tmp_path_factory.mktemp("remote-controlnet")
    with routed_platform(base_settings, worker_amqp_url, tmp, routes) as plat:
        yield plat


def photo_uri() -> str:
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((96, 96)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def run(platform: Platform, payload: dict) -> dict:
    response = platform.submit(ALICE, "gg_image", payload)
    assert response.status_code == 202, response.text
    return platform.wait(ALICE, response.json()["job_id"], timeout=60)


def test_controlnet_images_reach_sensetime_as_our_public_copies_in_controlnet_configs(
    platform: Platform, st: SenseTimeFake
) -> None:
    st.fetch_inputs = True
    fetched_before = len(st.fetched)
    try:
        job = run(
            platform,
            {
                "prompt": "an astronaut",
                "controlnets": [
                    {"type": "openpose", "image_url": photo_uri(), "scale": 0.8},
                    {"type": "canny", "image_url": photo_uri(), "preprocessed": True},
                ],
            },
        )
    finally:
        st.fetch_inputs = False
    assert job["status"] == "succeeded", job
    assert job["result"]["meta"]["backend"] == "sensetime:st"
    body = next(t["body"] for t in st.tasks.values() if t["body"].get("controlnet_configs"))
    configs = body["controlnet_configs"]
    assert [(c["type"], c.get("weight"), c.get("pre_processor")) for c in configs] == [
        ("openpose", 0.8, None),
        ("canny", None, "pass"),
    ]
    urls = [c["img_url"] for c in configs]
    assert all(url.startswith(platform.settings.public_url + "/files/") for url in urls)
    assert len(set(urls)) == 2
    assert [f["url"] for f in st.fetched[fetched_before:]] == urls
    assert all(f["status"] == 200 for f in st.fetched[fetched_before:])
    # The public copies are withdrawn once the job is over.
    assert all(requests.get(url, timeout=5).status_code == 404 for url in urls)


def test_a_controlnet_sensetime_cannot_take_fails_the_job_naming_the_field(platform: Platform) -> None:
    job = run(
        platform, {"prompt": "x", "controlnets": [{"type": "canny", "image_url": photo_uri(), "scale": 0}]}
    )
    assert job["status"] == "failed", job
    assert job["error"]["details"]["field"] == "controlnets[0].scale"
