"""Assets through the real API, RabbitMQ, Celery workers and Postgres: an upload feeds a job, an
output is an asset of its job's client, and ``asset://`` works for the asset's owner only."""

from __future__ import annotations

import base64
import io
import os

import requests
from PIL import Image

from tests.conftest import KEYS
from tests.support.platform import Platform
from tests.support.servers import ImageServer

ALICE = KEYS[0][1]
BOB = KEYS[1][1]


def upload_file(platform: Platform, key: str, content: bytes, name: str = "in.png") -> str:
    response = requests.post(
        f"{platform.base_url}/v1/assets",
        files=[("file", (name, content, "image/png"))],
        headers=platform.headers(key),
        timeout=15,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["assets"][0]["asset_id"])


def asset(platform: Platform, key: str, asset_id: str) -> requests.Response:
    return requests.get(
        f"{platform.base_url}/v1/assets/{asset_id}", headers=platform.headers(key), timeout=10
    )


def test_an_upload_feeds_a_job_whose_output_is_an_asset_of_the_same_client_only(
    platform: Platform, images: ImageServer, astronaut_png
) -> None:
    uploaded = requests.post(
        f"{platform.base_url}/v1/assets",
        files=[("file", ("astronaut.png", astronaut_png.read_bytes(), "image/png"))],
        headers=platform.headers(ALICE),
        timeout=15,
    )
    assert uploaded.status_code == 201, uploaded.text
    upload_id = uploaded.json()["assets"][0]["asset_id"]

    job = platform.wait(
        ALICE,
        platform.submit(ALICE, "upscale", {"image_url": f"asset://{upload_id}", "scale": 2}).json()["job_id"],
    )
    assert job["status"] == "succeeded", job
    result = job["result"]
    output_id = result["asset_id"]
    assert len(output_id) == 32 and output_id != upload_id
    assert not result["filename"].startswith(output_id)  # the id is not the public file name
    # The output is an asset of alice: listed, described, and its bytes are the /files bytes.
    described = asset(platform, ALICE, output_id)
    assert described.status_code == 200, described.text
    body = described.json()
    assert (body["width"], body["height"]) == (192, 192) and body["filename"] == result["filename"]
    content = requests.get(
        f"{platform.base_url}/v1/assets/{output_id}/content", headers=platform.headers(ALICE), timeout=10
    )
    served = requests.get(result["url"], timeout=10)
    assert content.content == served.content and served.headers["Cache-Control"] == "private"
    listed = requests.get(
        f"{platform.base_url}/v1/assets", headers=platform.headers(ALICE), timeout=10
    ).json()
    assert output_id in [a["asset_id"] for a in listed["assets"]]

    # Bob cannot read it, nor use either of alice's assets as an input: exactly like no asset at all.
    assert asset(platform, BOB, output_id).status_code == 404
    stolen = [
        platform.submit(BOB, "upscale", {"image_url": f"asset://{asset_id}"}).json()["job_id"]
        for asset_id in (upload_id, output_id, "0" * 32)
    ]
    errors = [platform.wait(BOB, job_id)["error"] for job_id in stolen]
    assert [e["code"] for e in errors] == ["input_not_found"] * 3
    assert [e["details"] for e in errors] == [{"field": "image_url"}] * 3
    assert errors[0]["message"].replace(upload_id, "0" * 32) == errors[2]["message"]

    # Alice can: her output feeds her next job.
    again = platform.wait(
        ALICE,
        platform.submit(ALICE, "upscale", {"image_url": f"asset://{output_id}", "scale": 2}).json()["job_id"],
    )
    assert again["status"] == "succeeded", again
    assert again["result"]["meta"]["width"] == 384 and again["result"]["asset_id"] != output_id


def test_a_url_registered_asset_and_a_large_data_input_both_run(
    platform: Platform, images: ImageServer
) -> None:
    registered = requests.post(
        f"{platform.base_url}/v1/assets",
        json={"url": images.url("img/astronaut.png")},
        headers=platform.headers(ALICE),
        timeout=15,
    )
    assert registered.status_code == 201, registered.text
    asset_id = registered.json()["assets"][0]["asset_id"]
    job = platform.wait(
        ALICE, platform.submit(ALICE, "upscale", {"image_url": f"asset://{asset_id}"}).json()["job_id"]
    )
    assert job["status"] == "succeeded", job

    # ~100 KB of base64: stored as an asset at POST, run from it by the worker.
    buffer = io.BytesIO()
    Image.frombytes("RGB", (150, 150), os.urandom(150 * 150 * 3)).save(buffer, "PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    inline = platform.wait(
        ALICE, platform.submit(ALICE, "upscale", {"image_url": data_uri, "scale": 2}).json()["job_id"]
    )
    assert inline["status"] == "succeeded", inline
    assert (inline["result"]["meta"]["width"], inline["result"]["meta"]["height"]) == (300, 300)
