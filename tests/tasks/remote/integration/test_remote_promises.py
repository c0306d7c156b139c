"""Remote routes keep the promises a local job keeps, end to end: the real API and workers, the
provider fakes in-process (issue 16, item 6).

- the ``watermark`` is the same visible label wherever the job ran: drawn by us on the provider's
  downloaded output, at every one of our positions, never asked of the provider;
- ``AIORCH_PROMPT_BLOCKLIST`` refuses a prompt before any provider sees it (``rejected``,
  ``prompt_blocked``, as locally);
- a payload outside a provider's own limits goes to the next backend of the route (``local``
  included), and a route with no backend for it is a 422 at ``POST`` naming the field and the limit;
- a route [SenseTime, local] serves the same payload on both, our model ids mapped by its ``models``.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from config import Settings
from inference.watermark import add_label
from models.db import Database
from tasks.celery_app import create_celery
from tasks.payloads.base import WATERMARK_POSITIONS
from tasks.remote.submit import submit_to_route
from tasks.runtime import Runtime
from tests.conftest import KEYS
from tests.fakes.aiorch_upstream_fake import UpstreamFake
from tests.fakes.common import all_running, image_bytes
from tests.fakes.sensetime_fake import SenseTimeFake
from tests.fakes.volcengine_fake import VolcengineFake
from tests.support.factories import make_job
from tests.support.platform import Platform
from tests.support.platform_fixtures import routed_platform
from tests.support.remote_providers import providers
from tests.support.servers import ImageServer

ALICE = KEYS[0][1]
ST_AK, ST_SK = "st-ak", "st-sk-0123456789abcdef0123456789abcdef"
VOLC_AK, VOLC_SK = "AKLTvolc", "volc-secret-6b1d0f2e9a7c"
REQ_KEY = "img2img_anime_accelerated_maintain_id"
UP_KEY = "up-key-0d5e7a91b3"
BLOCKED = "forbidden"
VOLC = {"backend": "volc", "task": "generate", "options": {"req_key": REQ_KEY}}


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Any]]:
    found: dict[str, Any] = {
        "st": SenseTimeFake(keys={ST_AK: ST_SK}, clock=time.time),  # type: ignore[arg-type]
        "volc": VolcengineFake(keys={VOLC_AK: VOLC_SK}, req_keys=(REQ_KEY,), clock=time.time),  # type: ignore[arg-type]
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
    routes = {
        "poll_interval": 0.3,
        "max_poll_interval": 1,
        "providers": providers(fakes),
        "routes": {
            "upscale": [
                {"backend": "st", "options": {"model_id": "sr", "models": {"esrgan-x4": "sr_v2"}}},
                {"backend": "local"},
            ],
            "gg_image": [{"backend": "st", "task": "generate", "options": {"model_id": "model001"}}],
            "cx_image": [VOLC],
            "ahv_image": [VOLC, {"backend": "up", "task": "generate"}],
        },
    }
    tmp = tmp_path_factory.mktemp("promises")
    settings = base_settings.with_overrides(prompt_blocklist=(BLOCKED,))
    with routed_platform(settings, worker_amqp_url, tmp, routes) as plat:
        yield plat


def submit(platform: Platform, task: str, payload: dict[str, Any]) -> str:
    response = platform.submit(ALICE, task, payload)
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def finished(platform: Platform, job_id: str) -> dict[str, Any]:
    return platform.wait(ALICE, job_id, timeout=60)


def served(job: dict[str, Any]) -> Image.Image:
    response = requests.get(job["result"]["url"], timeout=10)
    assert response.status_code == 200
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG"  # lossless, so the label's pixels are compared exactly
    return image.convert("RGB")


def submits(fake: Any) -> int:
    return sum(
        r.get("endpoint", r.get("action")) in ("submit", "CVSync2AsyncSubmitTask")
        for r in list(fake.requests)
    )


def third(fraction: float) -> str:
    return "low" if fraction < 1 / 3 else "high" if fraction > 2 / 3 else "mid"


def assert_label(image: Image.Image, watermark: dict[str, Any]) -> None:
    """The label's text is where ``watermark`` puts it, as our code draws it: the text's core (the
    pixels it lights over 200 when the same label is drawn on black) is at least as bright in
    ``image`` (a label composited over any picture is never darker than over black), and it sits
    in the position's third of the picture."""
    drawn = np.asarray(add_label(Image.new("RGB", image.size), **watermark)).astype(int)
    text = (drawn > 200).all(axis=-1)
    assert text.sum() >= 8
    pixels = np.asarray(image).astype(int)
    assert (pixels[text] >= drawn[text] - 1).all(), "the label's text is missing or elsewhere"
    ys, xs = np.nonzero(text)
    position = watermark["position"]
    vertical = "low" if position.startswith("top") else "high" if position.startswith("bottom") else "mid"
    horizontal = "low" if position.endswith("left") else "high" if position.endswith("right") else "mid"
    assert third(ys.mean() / image.height) == vertical, position
    assert third(xs.mean() / image.width) == horizontal, position


def test_every_watermark_position_is_the_same_label_at_sensetime_volcengine_and_locally(
    platform: Platform, fakes: dict[str, Any], images: ImageServer
) -> None:
    st, volc = fakes["st"], fakes["volc"]
    st_before, volc_results = len(st.tasks), len(volc.result_bodies)
    image_url = images.url("img/astronaut.png")
    jobs = {}
    for position in WATERMARK_POSITIONS:
        mark = {"text": "AI", "position": position, "opacity": 1.0}
        common = {"format": "png", "watermark": mark}
        jobs[position] = {
            "sensetime": submit(platform, "upscale", {"image_url": image_url, "scale": 2, **common}),
            "volcengine": submit(
                platform, "cx_image", {"prompt": "a cat", "width": 1440, "height": 1200, **common}
            ),
            # SenseTime's hd_ratio stops at 3: this one falls through to the local engine.
            "local": submit(platform, "upscale", {"image_url": image_url, "scale": 3.5, **common}),
        }
    # What each fake returns (its outputs are made from fixed colours), before any label.
    raw = {
        "sensetime": Image.open(io.BytesIO(image_bytes(fmt="PNG", size=(64, 48)))).convert("RGB"),
        "volcengine": Image.open(io.BytesIO(image_bytes(fmt="JPEG", size=(144, 120)))).convert("RGB"),
    }
    for position, by_backend in jobs.items():
        mark = {"text": "AI", "position": position, "opacity": 1.0}
        for backend, job_id in by_backend.items():
            job = finished(platform, job_id)
            assert job["status"] == "succeeded", (position, backend, job["error"])
            assert job["result"]["meta"]["backend"].startswith(backend if backend != "local" else "lanczos")
            image = served(job)
            assert_label(image, mark)
            if backend in raw:
                # Drawn once, by our code, on the provider's output: exactly a local job's label.
                assert np.array_equal(np.asarray(image), np.asarray(add_label(raw[backend], **mark)))
    # No provider was asked to draw a label of its own.
    assert not any("watermark_config" in task["body"] for task in list(st.tasks.values())[st_before:])
    assert not any("req_json" in body for body in volc.result_bodies[volc_results:])


def test_a_blocked_prompt_is_rejected_before_any_provider_sees_it(
    platform: Platform, fakes: dict[str, Any]
) -> None:
    before = {name: submits(fake) for name, fake in fakes.items()}
    for task in ("gg_image", "cx_image", "ahv_image"):
        job = finished(platform, submit(platform, task, {"prompt": f"a {BLOCKED.upper()} fox"}))
        assert job["status"] == "rejected", job
        assert job["error"]["code"] == "prompt_blocked" and job["error"]["details"] == {"field": "prompt"}
    assert {name: submits(fake) for name, fake in fakes.items()} == before
    assert not any(BLOCKED in str(job["_payload"]).lower() for job in list(fakes["up"].jobs.values()))


def test_a_payload_outside_a_providers_limits_runs_on_the_next_backend_of_the_route(
    platform: Platform, fakes: dict[str, Any], images: ImageServer
) -> None:
    volc_before = submits(fakes["volc"])
    # Volcengine takes 600-1500 px and no LoRA; the upstream aiorch after it takes both.
    payload = {"prompt": "a wide harbour", "width": 2000, "loras": [{"model": "lora-1", "weight": 2.0}]}
    job = finished(platform, submit(platform, "ahv_image", payload))
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["meta"]["backend"] == "upstream:up"
    sent = [
        j["_payload"]
        for j in list(fakes["up"].jobs.values())
        if j["_payload"].get("prompt") == "a wide harbour"
    ]
    assert sent == [payload]
    assert submits(fakes["volc"]) == volc_before

    # A scale over SenseTime's hd_ratio runs locally, at once (no SenseTime submit at all).
    st_before = submits(fakes["st"])
    local = finished(
        platform, submit(platform, "upscale", {"image_url": images.url("img/astronaut.png"), "scale": 4})
    )
    assert local["status"] == "succeeded", local["error"]
    assert local["result"]["meta"]["backend"] == "lanczos"
    assert (local["result"]["meta"]["width"], local["result"]["meta"]["height"]) == (384, 384)
    assert submits(fakes["st"]) == st_before


@pytest.mark.parametrize(
    ("task", "payload", "field", "limit"),
    [
        ("gg_image", {"prompt": "x", "width": 512, "height": 512}, "width", "[640, 6000]"),
        ("gg_image", {"prompt": "x", "loras": [{"model": "l1", "weight": 2}]}, "loras[0].weight", "(0, 2)"),
        ("cx_image", {"prompt": "x", "width": 2000}, "width", "[600, 1500]"),
    ],
)
def test_a_provider_only_route_refuses_at_post_a_payload_outside_its_limits(
    platform: Platform, task: str, payload: dict, field: str, limit: str
) -> None:
    response = platform.submit(ALICE, task, payload)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_payload"
    [reason] = error["details"]["payload"][field]
    assert limit in reason


def test_a_sensetime_then_local_route_serves_our_model_ids_on_both(
    platform: Platform, fakes: dict[str, Any], images: ImageServer
) -> None:
    st = fakes["st"]
    image_url = images.url("img/astronaut.png")
    # Mapped by the route's `models`: SenseTime runs it under its own id.
    mapped = finished(platform, submit(platform, "upscale", {"image_url": image_url, "model": "esrgan-x4"}))
    assert mapped["status"] == "succeeded", mapped["error"]
    assert mapped["result"]["meta"]["backend"] == "sensetime:st"
    assert list(st.tasks.values())[-1]["body"]["model_id"] == "sr_v2"
    # Our own engine's id, which the route does not map: SenseTime is skipped, the local engine runs it.
    before = submits(st)
    local = finished(platform, submit(platform, "upscale", {"image_url": image_url, "model": "lanczos"}))
    assert local["status"] == "succeeded", local["error"]
    assert local["result"]["meta"]["backend"] == "lanczos"
    assert submits(st) == before


def test_a_job_no_backend_can_take_any_more_fails_naming_the_field_without_any_submit(
    platform: Platform, fakes: dict[str, Any]
) -> None:
    # Accepted before the routes changed (or written by an older API): the submit step checks the
    # limits again, and with no backend left to try the job fails naming the field, never sent.
    db = Database(platform.settings)
    try:
        job_id = make_job(
            db,
            task="gg_image",
            engine_task="generate",
            queue="gpu.diffusion",
            payload={"prompt": "x", "width": 512},
        )
    finally:
        db.dispose()
    rt = Runtime(platform.settings)
    claim = rt.store.claim(job_id, redelivered=False, remote=True)
    job = rt.store.get(job_id)
    assert job is not None
    before = submits(fakes["st"])
    submit_to_route(create_celery(platform.settings), rt, job, claim, 0)
    done = platform.job(ALICE, job_id)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "invalid_input" and done["error"]["details"] == {"field": "width"}
    assert "[640, 6000]" in done["error"]["message"]
    assert submits(fakes["st"]) == before
