"""A provider never drops what it cannot honour, end to end: the real API and workers, the provider
fakes in-process (issue 16, item 6).

- a field a provider cannot express (Volcengine's and Zhinian's negative prompt, several samples,
  our model id, ...) is refused like a range limit: the job runs on the next backend of its route,
  and a route with no other backend is a 422 at ``POST`` naming the field;
- a range that used to be checked while building the request (Volcengine's steps, Zhinian's video
  duration) is a limit too: checked before submit, so the job falls through instead of failing;
- a free outpaint (``left``/``right``/``top``/``bottom``) runs at SenseTime's ``imgen_free`` where it
  makes exactly the input plus the margins, and goes on to the next backend where it cannot.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from config import Settings
from models.db import Database
from tasks.celery_app import create_celery
from tasks.remote.submit import submit_to_route
from tasks.runtime import Runtime
from tests.conftest import KEYS
from tests.fakes.aiorch_upstream_fake import UpstreamFake
from tests.fakes.common import all_running
from tests.fakes.sensetime_fake import SenseTimeFake
from tests.fakes.volcengine_fake import VolcengineFake
from tests.fakes.zhinian_fake import ZhinianFake
from tests.support.factories import make_job
from tests.support.platform import Platform
from tests.support.platform_fixtures import routed_platform
from tests.support.remote_providers import providers
from tests.support.servers import ImageServer

ALICE = KEYS[0][1]
ST_AK, ST_SK = "st-ak", "st-sk-0123456789abcdef0123456789abcdef"
VOLC_AK, VOLC_SK = "AKLTvolc", "volc-secret-6b1d0f2e9a7c"
REQ_KEY = "img2img_anime_accelerated_maintain_id"
ZN_KEY = "zn-key-5c0d9e"
UP_KEY = "up-key-0d5e7a91b3"
VOLC = {"backend": "volc", "task": "generate", "options": {"req_key": REQ_KEY}}
UP = {"backend": "up", "task": "generate"}


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Any]]:
    found: dict[str, Any] = {
        "st": SenseTimeFake(keys={ST_AK: ST_SK}, clock=time.time),  # type: ignore[arg-type]
        "volc": VolcengineFake(keys={VOLC_AK: VOLC_SK}, req_keys=(REQ_KEY,), clock=time.time),  # type: ignore[arg-type]
        "zn": ZhinianFake(api_keys={"aiorch": ZN_KEY}, clock=time.time),  # type: ignore[arg-type]
        "up": UpstreamFake(api_keys={UP_KEY: "aiorch"}, clock=time.time),  # type: ignore[arg-type]
    }
    # SenseTime fetches its inputs itself, as the real service does: imgen_free then checks that
    # the image fits the output where free_x/free_y put it, and pastes it there.
    found["st"].fetch_inputs = True
    with all_running(found):
        yield found


@pytest.fixture(scope="module")
def platform(
    base_settings: Settings,
    worker_amqp_url: str,
    fakes: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Platform]:
    routes = {
        "poll_interval": 0.3,
        "max_poll_interval": 1,
        "providers": providers(fakes),
        "routes": {
            "ahv_image": [VOLC, UP],
            "cx_image": [VOLC],
            "generate": [{"backend": "zn"}, UP],
            "gg_image": [{"backend": "zn", "task": "generate"}],
            "ahv_video": [{"backend": "zn"}],
            "outpaint": [{"backend": "st", "options": {"model_id": "op"}}, {"backend": "up"}],
        },
    }
    with routed_platform(base_settings, worker_amqp_url, tmp_path_factory.mktemp("refusals"), routes) as plat:
        yield plat


def submit(platform: Platform, task: str, payload: dict[str, Any]) -> str:
    response = platform.submit(ALICE, task, payload)
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def submits(fake: Any) -> int:
    return sum(
        r.get("endpoint", r.get("action")) in ("submit", "CVSync2AsyncSubmitTask")
        for r in list(fake.requests)
    )


def sent_upstream(fakes: dict[str, Any], marker: str) -> list[dict[str, Any]]:
    return [j["_payload"] for j in list(fakes["up"].jobs.values()) if j["_payload"].get("prompt") == marker]


@pytest.mark.parametrize(
    ("task", "provider", "extra"),
    [
        ("ahv_image", "volc", {"negative_prompt": "blurry"}),
        ("ahv_image", "volc", {"samples": 2}),
        ("ahv_image", "volc", {"model": "sd15"}),
        ("ahv_image", "volc", {"scheduler": "euler"}),
        ("generate", "zn", {"negative_prompt": "blurry"}),
        ("generate", "zn", {"samples": 2}),
        ("generate", "zn", {"seed": 7}),
        ("generate", "zn", {"steps": 20, "cfg_scale": 6.5}),
    ],
)
def test_a_field_the_first_provider_cannot_express_runs_the_job_on_the_next_backend(
    platform: Platform, fakes: dict[str, Any], task: str, provider: str, extra: dict[str, Any]
) -> None:
    marker = f"a harbour ({task}, {sorted(extra)})"
    before = submits(fakes[provider])
    job = platform.wait(ALICE, submit(platform, task, {"prompt": marker, **extra}), timeout=60)
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["meta"]["backend"] == "upstream:up"
    # The field reached the backend that honours it, as the client gave it.
    [sent] = sent_upstream(fakes, marker)
    assert {name: sent[name] for name in extra} == extra
    assert submits(fakes[provider]) == before, "the provider that cannot express it was sent the job"


@pytest.mark.parametrize(
    ("task", "payload", "field", "words"),
    [
        (
            "cx_image",
            {"prompt": "x", "negative_prompt": "blurry"},
            "negative_prompt",
            "only a positive_prompt",
        ),
        ("cx_image", {"prompt": "x", "samples": 3}, "samples", "one image per task"),
        ("gg_image", {"prompt": "x", "seed": 7}, "seed", "take no seed"),
        ("gg_image", {"prompt": "x", "model": "sd15"}, "model", "capability is the model"),
        (
            "ahv_video",
            {"prompt": "x", "duration": 20},
            "duration",
            "Zhinian takes 'duration' in [4, 15], got 20",
        ),
    ],
)
def test_a_provider_only_route_refuses_at_post_a_field_its_provider_cannot_honour(
    platform: Platform, task: str, payload: dict, field: str, words: str
) -> None:
    response = platform.submit(ALICE, task, payload)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_payload"
    [reason] = error["details"]["payload"][field]
    assert words in reason


def test_a_range_once_checked_while_building_the_request_now_falls_through(
    platform: Platform, fakes: dict[str, Any]
) -> None:
    # Our schema keeps steps at 100 or less, so a job with 300 was accepted before the schemas
    # changed (or written by an older API): Volcengine's 1-200 is a limit, asked before submit, so
    # the upstream aiorch runs the job instead of Volcengine's request failing it.
    db = Database(platform.settings)
    try:
        job_id = make_job(
            db,
            task="ahv_image",
            engine_task="generate",
            queue="gpu.diffusion",
            payload={"prompt": "three hundred steps", "steps": 300},
        )
    finally:
        db.dispose()
    rt = Runtime(platform.settings)
    claim = rt.store.claim(job_id, redelivered=False, remote=True)
    job = rt.store.get(job_id)
    assert job is not None
    before = submits(fakes["volc"])
    submit_to_route(create_celery(platform.settings), rt, job, claim, 0)
    done = platform.wait(ALICE, job_id, timeout=60)
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["meta"]["backend"] == "upstream:up"
    assert submits(fakes["volc"]) == before


def test_a_free_outpaint_runs_at_sensetimes_imgen_free_with_the_input_plus_the_margins(
    platform: Platform, fakes: dict[str, Any], images: ImageServer
) -> None:
    st = fakes["st"]
    margins = {"left": 120, "right": 120, "top": 112, "bottom": 128}
    payload = {"image_url": images.url("img/big.png"), "format": "png", **margins}
    job = platform.wait(ALICE, submit(platform, "outpaint", payload), timeout=60)
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["meta"]["backend"] == "sensetime:st"
    [task] = [t for t in list(st.tasks.values()) if t["family"] == "outpaint.free"]
    body = task["body"]
    # 400 x 400 px in, 640 x 640 out, the picture's top-left corner at (left, top).
    assert (body["width"], body["height"], body["free_x"], body["free_y"]) == (640, 640, 120, 112)
    assert "outpaint_ratio" not in body and "align_position" not in body
    assert task["placed"] == (120, 112)
    response = requests.get(job["result"]["url"], timeout=10)
    assert response.status_code == 200
    served = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    assert served.shape == (640, 640, 3)
    original = np.asarray(Image.open(Path(images.folder) / "big.png").convert("RGB"))
    # What we sent is our checked copy of the client's image, and it sits where the client asked.
    assert np.array_equal(served[112:512, 120:520], original)


@pytest.mark.parametrize(
    "margins",
    [
        {"left": 96, "right": 104, "top": 120, "bottom": 120},  # 600 px wide: under imgen_free's 640
        {"left": 120, "right": 130, "top": 120, "bottom": 120},  # 650 px wide: not a multiple of 64
        {"left": 60, "right": 180, "top": 120, "bottom": 120},  # free_x must step by 8
    ],
)
def test_a_free_outpaint_sensetime_cannot_make_exactly_runs_on_the_next_backend(
    platform: Platform, fakes: dict[str, Any], images: ImageServer, margins: dict[str, int]
) -> None:
    before = submits(fakes["st"])
    payload = {"image_url": images.url("img/big.png"), **margins}
    job = platform.wait(ALICE, submit(platform, "outpaint", payload), timeout=60)
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["meta"]["backend"] == "upstream:up"
    assert submits(fakes["st"]) == before
    sent = [
        j["_payload"] for j in list(fakes["up"].jobs.values()) if j["_payload"].get("left") == margins["left"]
    ]
    assert any({name: p.get(name) for name in margins} == margins for p in sent)
