"""Jobs through the real API, RabbitMQ, Celery workers and Postgres."""

from __future__ import annotations

import io

import pytest
import requests
from PIL import Image

from tests.conftest import KEYS
from tests.support.platform import Platform
from tests.support.servers import ImageServer

ALICE = KEYS[0][1]
BOB = KEYS[1][1]


def test_upscale_job_runs_to_succeeded_and_serves_its_output(platform: Platform, images: ImageServer) -> None:
    response = platform.submit(ALICE, "upscale", {"image_url": images.url("img/astronaut.png"), "scale": 2})
    assert response.status_code == 202, response.text
    created = response.json()
    assert len(created["job_id"]) == 32 and created["status"] == "queued"
    job = platform.wait(ALICE, created["job_id"])
    assert job["status"] == "succeeded", job
    assert job["ok"] is True and job["progress"] == 100 and job["attempts"] == 1
    result = job["result"]
    assert result["ok"] is True and result["status"] == "succeeded"
    assert result["meta"]["backend"] == "lanczos"
    assert (result["meta"]["width"], result["meta"]["height"]) == (192, 192)
    assert job["duration"] is not None and job["duration"] >= 0
    assert job["started_at_ms"] <= job["finished_at_ms"]
    served = requests.get(result["url"], timeout=10)  # no key needed for files
    assert served.status_code == 200
    assert Image.open(io.BytesIO(served.content)).size == (192, 192)
    assert len(result["filename"].split(".")[0]) == 32  # 128 random bits


def test_format_and_watermark_are_applied(platform: Platform, images: ImageServer) -> None:
    payload = {
        "image_url": images.url("img/astronaut.png"),
        "scale": 1.5,
        "format": "webp",
        "watermark": {"text": "AI generated", "position": "bottomleft"},
    }
    job = platform.wait(ALICE, platform.submit(ALICE, "upscale", payload).json()["job_id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["filename"].endswith(".webp")
    image = Image.open(io.BytesIO(requests.get(job["result"]["url"], timeout=10).content))
    assert image.format == "WEBP" and image.size == (144, 144)


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("text", "input_not_image"),
        ("status/404", "input_not_found"),
        ("bomb.png", "input_too_many_pixels"),
        ("status/403", "input_http_error"),
    ],
)
def test_bad_input_fails_the_job_clearly_and_the_next_job_succeeds(
    platform: Platform, images: ImageServer, path: str, code: str
) -> None:
    bad = platform.submit(ALICE, "upscale", {"image_url": images.url(path), "scale": 2})
    assert bad.status_code == 202
    job = platform.wait(ALICE, bad.json()["job_id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == code and job["error"]["message"]
    assert job["error"]["details"] == {"field": "image_url"}
    good = platform.submit(ALICE, "upscale", {"image_url": images.url("img/astronaut.png"), "scale": 2})
    assert platform.wait(ALICE, good.json()["job_id"])["status"] == "succeeded"


def test_redirects_are_followed_and_data_uris_accepted(
    platform: Platform, images: ImageServer, astronaut_png
) -> None:
    import base64

    redirected = platform.submit(ALICE, "upscale", {"image_url": images.url("redirect/astronaut.png")})
    data_uri = "data:image/png;base64," + base64.b64encode(astronaut_png.read_bytes()).decode()
    inline = platform.submit(ALICE, "upscale", {"image_url": data_uri, "scale": 3})
    assert platform.wait(ALICE, redirected.json()["job_id"])["status"] == "succeeded"
    job = platform.wait(ALICE, inline.json()["job_id"])
    assert job["status"] == "succeeded" and job["result"]["meta"]["width"] == 288


def test_an_output_can_feed_another_job_as_an_asset(platform: Platform, images: ImageServer) -> None:
    first = platform.wait(
        ALICE,
        platform.submit(ALICE, "upscale", {"image_url": images.url("img/astronaut.png")}).json()["job_id"],
    )
    asset = "asset://" + first["result"]["asset_id"]  # its asset id, not its public file name
    second = platform.wait(ALICE, platform.submit(ALICE, "upscale", {"image_url": asset}).json()["job_id"])
    assert second["status"] == "succeeded" and second["result"]["meta"]["width"] == 384


def test_another_clients_job_is_not_found(platform: Platform, images: ImageServer) -> None:
    job_id = platform.submit(ALICE, "upscale", {"image_url": images.url("img/astronaut.png")}).json()[
        "job_id"
    ]
    response = requests.get(f"{platform.base_url}/v1/jobs/{job_id}", headers={"X-API-Key": BOB}, timeout=5)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"
    listed = requests.get(f"{platform.base_url}/v1/jobs?ids={job_id}", headers={"X-API-Key": BOB}, timeout=5)
    assert listed.json()["jobs"] == []


def test_cancel_while_input_downloads_ends_cancelled_and_stays(
    platform: Platform, images: ImageServer
) -> None:
    job_id = platform.submit(ALICE, "upscale", {"image_url": images.url("slow/big.png")}).json()["job_id"]
    # Wait until the cpu worker is actually downloading.
    import time

    deadline = time.monotonic() + 10
    while not any(hit.startswith("/slow/") for hit in images.hits) and time.monotonic() < deadline:
        time.sleep(0.05)
    cancelled = requests.post(
        f"{platform.base_url}/v1/jobs/{job_id}/cancel", headers={"X-API-Key": ALICE}, timeout=5
    )
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    time.sleep(2.0)  # long enough for the download loop to notice and stop
    job = platform.job(ALICE, job_id)
    assert job["status"] == "cancelled" and job["result"] is None and job["started_at"] is None
    again = requests.post(
        f"{platform.base_url}/v1/jobs/{job_id}/cancel", headers={"X-API-Key": ALICE}, timeout=5
    )
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"


def test_cancel_a_running_job_stops_it(platform: Platform) -> None:
    job_id = platform.submit(ALICE, "debug_sleep", {"seconds": 20}).json()["job_id"]
    platform.wait(ALICE, job_id, {"running"})
    response = requests.post(
        f"{platform.base_url}/v1/jobs/{job_id}/cancel", headers={"X-API-Key": ALICE}, timeout=5
    )
    assert response.status_code == 200
    job = platform.wait(ALICE, job_id, timeout=10)
    assert job["status"] == "cancelled"
    assert job["duration"] < 10


def test_delete_removes_job_and_output_files(platform: Platform, images: ImageServer) -> None:
    job = platform.wait(
        ALICE,
        platform.submit(ALICE, "upscale", {"image_url": images.url("img/astronaut.png")}).json()["job_id"],
    )
    url = job["result"]["url"]
    assert requests.get(url, timeout=5).status_code == 200
    gone = requests.delete(
        f"{platform.base_url}/tasks/{job['job_id']}", headers={"X-API-Key": ALICE}, timeout=5
    )
    assert gone.status_code == 204
    assert (
        requests.get(
            f"{platform.base_url}/v1/jobs/{job['job_id']}", headers={"X-API-Key": ALICE}, timeout=5
        ).status_code
        == 404
    )
    missing = requests.get(url, timeout=5)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "file_not_found"


def test_progress_is_reported_while_running(platform: Platform) -> None:
    job_id = platform.submit(ALICE, "debug_sleep", {"seconds": 2.5}).json()["job_id"]
    import time

    seen = set()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        job = platform.job(ALICE, job_id)
        seen.add(job["progress"])
        if job["status"] == "succeeded":
            break
        time.sleep(0.1)
    assert job["status"] == "succeeded"
    assert any(0 < p < 100 for p in seen), seen
