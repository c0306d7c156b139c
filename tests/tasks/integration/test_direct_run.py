"""Jobs whose inputs need no network skip the prepare queue: the run queue checks them itself.

The platform here runs its API and its GPU worker only, with no cpu worker at all, so a job that
still went through the prepare task would never leave ``queued``.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from config import Settings
from tests.conftest import KEYS, _vhost
from tests.support.platform import Platform
from tests.support.platform_fixtures import platform_settings
from tests.support.servers import ImageServer

ALICE = KEYS[0][1]


@pytest.fixture(scope="module")
def gpu_only(base_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp("direct")
    with _vhost("direct") as broker_url:
        plat = Platform(platform_settings(base_settings, tmp, broker_url=broker_url), tmp / "logs")
        try:
            plat.start_api()
            plat.start_worker("gpu", "gpu.diffusion,gpu.superres,gpu.faceswap,gpu.vision", 1)
            yield plat
        finally:
            plat.stop()


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_data_and_asset_inputs_run_without_the_prepare_queue(
    gpu_only: Platform, images: ImageServer, astronaut_png: Path
) -> None:
    fetched = gpu_only.submit(ALICE, "upscale", {"image_url": images.url("img/astronaut.png")}).json()
    inline = gpu_only.submit(ALICE, "upscale", {"image_url": data_uri(astronaut_png), "scale": 2}).json()

    first = gpu_only.wait(ALICE, inline["job_id"])
    assert first["status"] == "succeeded", first
    assert first["result"]["meta"]["width"] == 192
    asset = gpu_only.submit(ALICE, "upscale", {"image_url": "asset://" + first["result"]["asset_id"]}).json()
    second = gpu_only.wait(ALICE, asset["job_id"])
    assert second["status"] == "succeeded" and second["result"]["meta"]["width"] == 384
    # The http job needs the prepare task, and no cpu worker runs: it waits, untouched.
    time.sleep(0.5)
    assert gpu_only.job(ALICE, fetched["job_id"])["status"] == "queued"

    # A cpu worker arrives: the waiting job is fetched and run as usual.
    gpu_only.start_worker("cpu", "cpu", 2)
    assert gpu_only.wait(ALICE, fetched["job_id"])["status"] == "succeeded"


def test_a_bad_inline_input_fails_its_job_with_the_field_named_and_the_worker_goes_on(
    gpu_only: Platform, astronaut_png: Path
) -> None:
    not_an_image = "data:image/png;base64," + base64.b64encode(b"hello, not a picture").decode()
    bad = gpu_only.submit(ALICE, "upscale", {"image_url": not_an_image}).json()
    missing = gpu_only.submit(ALICE, "upscale", {"image_url": "asset://" + "0" * 32}).json()
    good = gpu_only.submit(ALICE, "upscale", {"image_url": data_uri(astronaut_png)}).json()

    failed = gpu_only.wait(ALICE, bad["job_id"])
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "input_not_image"
    assert failed["error"]["details"] == {"field": "image_url"}
    lost = gpu_only.wait(ALICE, missing["job_id"])
    assert (lost["status"], lost["error"]["code"]) == ("failed", "input_not_found")
    assert gpu_only.wait(ALICE, good["job_id"])["status"] == "succeeded"
