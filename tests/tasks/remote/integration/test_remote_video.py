"""ahv_video end to end: routed to a provider that can generate video, stored as our own MP4.

No local engine generates video, so ``ahv_video`` exists only through a route; the route skips
backends that cannot make video (SenseTime here), falls through between those that can (Zhinian's
``video.generate``, an upstream aiorch), and the provider's file is downloaded and probed like a
video input before it is served from ``/files/``.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from app import create_app
from config import Settings
from models.db import Database
from tasks.celery_app import create_celery
from tasks.remote.submit import submit_to_route
from tasks.runtime import Runtime
from tests.fakes.aiorch_upstream_fake import UpstreamFake
from tests.fakes.common import VIDEO_FRAMES, all_running
from tests.fakes.sensetime_fake import SenseTimeFake
from tests.fakes.zhinian_fake import ZhinianFake
from tests.support.platform import Platform
from tests.support.platform_fixtures import routed_platform
from tests.support.remote_providers import providers
from tests.support.servers import ImageServer
from tests.tasks.remote.integration.test_remote_jobs import (
    ALICE,
    ST_AK,
    ST_SK,
    UP_KEY,
    ZN_KEY,
    insert_job,
    run,
    submits,
    wait_for_remote_id,
)

av = pytest.importorskip("av")


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Any]]:
    found: dict[str, Any] = {
        "st": SenseTimeFake(keys={ST_AK: ST_SK}, clock=time.time),  # type: ignore[arg-type]
        "zn": ZhinianFake(api_keys={"aiorch": ZN_KEY}, clock=time.time),  # type: ignore[arg-type]
        "up": UpstreamFake(api_keys={UP_KEY: "aiorch"}, clock=time.time),  # type: ignore[arg-type]
    }
    with all_running(found):
        yield found


@pytest.fixture(scope="module")
def platform(
    base_settings: Settings,
    worker_amqp_url: str,
    fakes: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Platform]:
    # SenseTime first: it cannot make video, so the route must skip it, never try it.
    routes = {
        "poll_interval": 0.3,
        "max_poll_interval": 1,
        "providers": providers(fakes),
        "routes": {"ahv_video": [{"backend": "st"}, {"backend": "zn"}, {"backend": "up"}]},
    }
    with routed_platform(base_settings, worker_amqp_url, tmp_path_factory.mktemp("video"), routes) as plat:
        yield plat


@pytest.fixture(scope="module")
def db(platform: Platform) -> Iterator[Database]:
    database = Database(platform.settings)
    yield database
    database.dispose()


def served_frames(platform: Platform, url: str) -> int:
    """Download one of our outputs and decode it: the number of frames a player would show."""
    assert url.startswith(platform.base_url + "/files/") and url.endswith(".mp4"), url
    response = requests.get(url, timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"] == "video/mp4"
    with av.open(io.BytesIO(response.content)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_ahv_video_routed_to_zhinian_succeeds_with_our_own_playable_mp4(
    platform: Platform, fakes: dict[str, Any], images: ImageServer, db: Database
) -> None:
    payload = {
        "prompt": "a lighthouse at dusk, slow pan",
        "image_url": images.url("img/astronaut.png"),
        "aspect_ratio": "16:9",
        "duration": 5,
        "resolution": "720p",
    }
    job = run(platform, "ahv_video", payload)
    assert job["status"] == "succeeded", job
    result = job["result"]
    meta = result["meta"]
    assert meta["backend"] == "zhinian:zn" and meta["format"] == "mp4"
    assert (meta["width"], meta["height"], meta["frames"]) == (64, 48, VIDEO_FRAMES)
    assert meta["duration"] > 0 and result["filename"].endswith(".mp4")
    assert served_frames(platform, result["url"]) == VIDEO_FRAMES
    # Zhinian got seed 003's video.generate body, and our checked copy of the image, not the
    # client's URL.
    body = fakes["zn"].jobs[wait_for_remote_id(db, job["job_id"])]["_body"]
    assert body["capability"] == "video.generate" and body["prompt"] == payload["prompt"]
    assert body["settings"] == {"ratio": "16:9", "duration": 5, "resolution": "720p"}
    [material] = body["materials"]
    assert material["type"] == "image"
    assert material["url"].startswith(platform.settings.public_url + "/files/")
    assert submits(fakes["st"]) == 0, "a provider that cannot make video was sent the job"


def test_ahv_video_falls_through_to_the_upstream_when_zhinian_is_down(
    platform: Platform, fakes: dict[str, Any], db: Database
) -> None:
    fakes["zn"].faults.add("server_error", on="submit")
    job = run(platform, "ahv_video", {"prompt": "waves on rocks", "seed": 7})
    assert job["status"] == "succeeded", job
    meta = job["result"]["meta"]
    assert meta["backend"] == "upstream:up"
    assert (meta["width"], meta["height"], meta["frames"]) == (64, 48, VIDEO_FRAMES)
    assert served_frames(platform, job["result"]["url"]) == VIDEO_FRAMES
    upstream_job = fakes["up"].jobs[wait_for_remote_id(db, job["job_id"])]
    assert upstream_job["task"] == "ahv_video"
    assert upstream_job["_payload"] == {"prompt": "waves on rocks", "seed": 7}


def test_blocking_post_ahv_video_returns_the_final_job(platform: Platform) -> None:
    response = requests.post(
        platform.base_url + "/ahv/video",
        json={"prompt": "a paper boat", "aspect_ratio": "9:16"},
        headers=platform.headers(ALICE),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["task"] == "ahv_video" and job["status"] == "succeeded", job
    assert served_frames(platform, job["result"]["url"]) == VIDEO_FRAMES


def test_a_provider_returning_a_picture_for_a_video_fails_the_job_with_a_clear_code(
    platform: Platform,
) -> None:
    job = run(platform, "ahv_video", {"prompt": "NOT-VIDEO please"})
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "remote_output_invalid"
    assert job["error"]["details"]["problem"] == "input_not_video"
    assert "zn" in job["error"]["message"] and job["result"] is None
    # A real video, but not the MP4 that ahv_video promises and /files/ serves.
    mkv = run(platform, "ahv_video", {"prompt": "MKV-VIDEO please"})
    assert mkv["status"] == "failed", mkv
    assert mkv["error"]["code"] == "remote_output_invalid"
    assert mkv["error"]["details"]["problem"] == "output_not_mp4"


def test_ahv_video_payloads_are_checked_and_its_parameters_listed(platform: Platform) -> None:
    for bad, field in [
        ({}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"prompt": "x", "duration": 21}, "duration"),
        ({"prompt": "x", "aspect_ratio": "4:3"}, "aspect_ratio"),
        ({"prompt": "x", "format": "png"}, "format"),
        ({"prompt": "x", "image_url": "ftp://example.com/a.png"}, "image_url"),
    ]:
        response = platform.submit(ALICE, "ahv_video", bad)
        assert response.status_code == 422, (bad, response.text)
        assert field in response.json()["error"]["details"]["payload"], bad
    caps = requests.get(platform.base_url + "/v1/capabilities", headers=platform.headers(ALICE), timeout=10)
    [video] = [t for t in caps.json()["tasks"] if t["task"] == "ahv_video"]
    assert video["installed"] is True and video["queue"] == "cpu" and video["inputs"] == ["image_url"]
    assert {"prompt", "image_url", "negative_prompt", "duration", "aspect_ratio", "resolution", "seed"} <= {
        p["name"] for p in video["parameters"]
    }


def test_a_route_with_no_provider_that_can_make_video_fails_the_job_by_name(
    platform: Platform, fakes: dict[str, Any], db: Database, tmp_path: Path
) -> None:
    routes = tmp_path / "routes.json"
    routes.write_text(
        json.dumps({"providers": providers(fakes), "routes": {"ahv_video": [{"backend": "st"}]}})
    )
    settings = platform.settings.with_overrides(routes_file=routes)
    rt = Runtime(settings)
    job_id = insert_job(db, task="ahv_video", engine_task="ahv_video", queue="cpu", payload={"prompt": "x"})
    claim = rt.store.claim(job_id, redelivered=False)
    job = rt.store.get(job_id)
    assert job is not None
    submit_to_route(create_celery(settings), rt, job, claim, 0)
    done = platform.wait(ALICE, job_id, timeout=10)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "no_video_provider"
    assert "ahv_video" in done["error"]["message"] and "st" in done["error"]["message"]
    assert submits(fakes["st"]) == 0


def test_without_a_route_ahv_video_is_a_501_naming_the_task(base_settings: Settings) -> None:
    app = create_app(base_settings)
    try:
        client = app.test_client()
        headers = {"X-API-Key": ALICE}
        for response in (
            client.post("/v1/jobs", json={"task": "ahv_video", "payload": {"prompt": "x"}}, headers=headers),
            client.post("/ahv/video", json={"prompt": "x"}, headers=headers),
        ):
            assert response.status_code == 501, response.get_data(as_text=True)
            error = response.get_json()["error"]
            assert error["code"] == "task_not_installed" and "ahv_video" in error["message"]
    finally:
        app.extensions["aiorch"].db.dispose()
