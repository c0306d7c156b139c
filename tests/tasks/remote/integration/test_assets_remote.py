"""Assets on a remote route, end to end (the real API and workers, a SenseTime fake that downloads
the inputs it is sent): ``asset://`` is its owner's only there too, and the output is an asset.

A module of its own: its platform runs workers under the same names as the default one, so the two
cannot run at once."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from PIL import Image

from config import Settings
from models.db import Database
from models.keys import KeyRing
from tests.app.integration.test_assets_jobs import asset, upload_file
from tests.conftest import KEYS
from tests.fakes.common import all_running
from tests.fakes.sensetime_fake import SenseTimeFake
from tests.support.platform import Platform
from tests.support.platform_fixtures import routed_platform
from tests.support.remote_providers import providers

BOB = KEYS[1][1]
ST_AK, ST_SK = "st-ak", "st-sk-0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def sensetime() -> Iterator[SenseTimeFake]:
    fake = SenseTimeFake(keys={ST_AK: ST_SK}, clock=time.time)  # type: ignore[arg-type]
    fake.fetch_inputs = True  # it downloads the inputs it is sent, as the real one does
    with all_running({"st": fake}):
        yield fake


@pytest.fixture(scope="module")
def remote_platform(
    base_settings: Settings,
    worker_amqp_url: str,
    sensetime: SenseTimeFake,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Platform]:
    routes = {
        "poll_interval": 0.3,
        "max_poll_interval": 1,
        "providers": providers({"st": sensetime}),
        "routes": {"upscale": [{"backend": "st", "options": {"model_id": "sr"}}]},
    }
    tmp = tmp_path_factory.mktemp("assets-remote")
    with routed_platform(base_settings, worker_amqp_url, tmp, routes) as plat:
        yield plat


def test_a_remote_route_takes_the_owners_asset_only_and_its_output_is_an_asset(
    remote_platform: Platform, sensetime: SenseTimeFake, astronaut_png: Path
) -> None:
    platform = remote_platform
    # A client of its own, so its list holds exactly what this test made.
    db = Database(platform.settings)
    try:
        _row, carol = KeyRing(db, ()).create(f"carol-{uuid.uuid4().hex[:8]}")
    finally:
        db.dispose()
    upload_id = upload_file(platform, carol, astronaut_png.read_bytes())

    fetched_before = len(sensetime.fetched)
    job = platform.wait(
        carol, platform.submit(carol, "upscale", {"image_url": f"asset://{upload_id}"}).json()["job_id"]
    )
    assert job["status"] == "succeeded", job
    assert job["result"]["meta"]["backend"] == "sensetime:st"
    # The provider got our checked copy of carol's upload.
    [fetched] = sensetime.fetched[fetched_before:]
    assert Image.open(io.BytesIO(fetched["body"])).convert("RGB").tobytes() == (
        Image.open(astronaut_png).convert("RGB").tobytes()
    )
    output_id = job["result"]["asset_id"]
    assert asset(platform, carol, output_id).status_code == 200
    assert asset(platform, BOB, output_id).status_code == 404
    # The provider's public copy of the input is no asset of hers: only the upload and the output.
    listed = requests.get(
        f"{platform.base_url}/v1/assets", headers=platform.headers(carol), timeout=10
    ).json()
    assert {a["asset_id"] for a in listed["assets"]} == {upload_id, output_id}

    stolen = platform.wait(
        BOB, platform.submit(BOB, "upscale", {"image_url": f"asset://{upload_id}"}).json()["job_id"]
    )
    assert stolen["status"] == "failed" and stolen["error"]["code"] == "input_not_found"
    assert len(sensetime.fetched) == fetched_before + 1  # nothing of carol's went out for bob
