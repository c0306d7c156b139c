"""A route's backends and their providers' own limits (tasks/remote/backend_limits.py), and what the
API makes of them: a payload that some backend of its route can take is accepted, one that none can
take is a 422 naming the field and each provider's limit, and ``loras`` items are checked at the API
whatever the route."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from app import create_app
from config import Settings
from config.routes import parse_routes
from tasks.remote.backend_limits import backend_refusal, route_refusals
from tests.conftest import KEYS

ALICE = {"X-API-Key": KEYS[0][1]}
PROVIDERS = {
    "st": {"kind": "sensetime", "base_url": "https://st.example.com", "access_key": "a", "secret_key": "s"},
    "volc": {
        "kind": "volcengine",
        "base_url": "https://volc.example.com",
        "access_key": "a",
        "secret_key": "s",
    },
    "up": {"kind": "upstream", "base_url": "https://up.example.com", "api_key": "k"},
    "zn": {"kind": "zhinian", "base_url": "https://zn.example.com", "api_key": "k"},
}
ST = {"backend": "st", "task": "generate", "options": {"model_id": "model001"}}
VOLC = {"backend": "volc", "task": "generate", "options": {"req_key": "rk"}}
ROUTES = {
    "gg_image": [ST],
    "cx_image": [VOLC],
    "ahv_image": [VOLC, {"backend": "up", "task": "generate"}],
    "upscale": [{"backend": "st", "options": {"model_id": "sr"}}, {"backend": "local"}],
    "remove_object": [{"backend": "st", "options": {"model_id": "erase"}}, VOLC],
    "generate": [{"backend": "zn"}],
    "ahv_video": [{"backend": "zn"}],
    "outpaint": [{"backend": "st", "options": {"model_id": "op"}}],
}


def routes() -> Any:
    return parse_routes({"providers": PROVIDERS, "routes": ROUTES})


def test_a_local_backend_takes_anything_and_a_provider_refuses_what_its_limits_refuse() -> None:
    found = routes()
    local, st = found.routes["upscale"].steps[1], found.routes["upscale"].steps[0]
    assert backend_refusal(found, local, "upscale", {"scale": 4}) is None
    refusal = backend_refusal(found, st, "upscale", {"scale": 4})
    assert refusal is not None and refusal.field == "scale" and "(1, 3]" in str(refusal)
    assert backend_refusal(found, st, "upscale", {"scale": 2}) is None


def test_a_route_refuses_only_when_no_backend_can_take_the_payload() -> None:
    found = routes()
    # SenseTime refuses a scale of 4, the local engine takes it.
    assert route_refusals(found, "upscale", "upscale", {"scale": 4}) == {}
    # Volcengine refuses 2000 px, the upstream aiorch takes it.
    assert route_refusals(found, "ahv_image", "generate", {"prompt": "x", "width": 2000}) == {}
    assert route_refusals(found, "gg_image", "generate", {"prompt": "x", "width": 512}) == {
        "width": ["SenseTime takes 'width' in [640, 6000], got 512"]
    }
    # Both backends refuse, each for its own reason: every reason is told.
    both = route_refusals(found, "remove_object", "remove_object", {"samples": 9, "loras": [{"model": "l"}]})
    assert both == {
        "samples": ["SenseTime takes 'samples' in [1, 8], got 9"],
        "loras": ["Volcengine takes no LoRAs"],
    }
    # No route, or one that starts locally: the local engine's limits are the schema's.
    assert route_refusals(found, "inpaint", "inpaint", {"samples": 64}) == {}


@pytest.fixture
def client(settings: Settings, tmp_path: Path) -> Iterator[FlaskClient]:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"providers": PROVIDERS, "routes": ROUTES}))
    app = create_app(settings.with_overrides(routes_file=path))
    yield app.test_client()
    app.extensions["aiorch"].db.dispose()


def submit(client: FlaskClient, task: str, payload: dict[str, Any]) -> Any:
    return client.post("/v1/jobs", json={"task": task, "payload": payload}, headers=ALICE)


def refused(response: Any) -> dict[str, Any]:
    assert response.status_code == 422, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == "invalid_payload"
    return error["details"]["payload"]


@pytest.mark.parametrize(
    ("task", "payload", "field", "message"),
    [
        (
            "gg_image",
            {"prompt": "x", "width": 512},
            "width",
            "SenseTime takes 'width' in [640, 6000], got 512",
        ),
        ("gg_image", {"prompt": "x", "steps": 80}, "steps", "SenseTime takes 'steps' in (0, 70], got 80"),
        (
            "gg_image",
            {"prompt": "x", "loras": [{"model": "l1", "weight": 2}]},
            "loras[0].weight",
            "SenseTime takes 'loras[0].weight' in (0, 2), got 2",
        ),
        (
            "cx_image",
            {"prompt": "x", "width": 2000},
            "width",
            "Volcengine takes 'width' in [600, 1500], got 2000",
        ),
        ("cx_image", {"prompt": "x", "loras": [{"model": "l1"}]}, "loras", "Volcengine takes no LoRAs"),
        # Fields a provider cannot express are refused like its ranges, never dropped.
        (
            "cx_image",
            {"prompt": "x", "negative_prompt": "blur"},
            "negative_prompt",
            "Volcengine cannot take generate's 'negative_prompt': its body has only a positive_prompt",
        ),
        (
            "cx_image",
            {"prompt": "x", "samples": 2},
            "samples",
            "Volcengine cannot take generate's 'samples': it makes one image per task",
        ),
        (
            "cx_image",
            {"prompt": "x", "model": "sd15"},
            "model",
            "Volcengine cannot take generate's 'model': the route's req_key is the model",
        ),
        (
            "generate",
            {"prompt": "x", "negative_prompt": "blur"},
            "negative_prompt",
            "Zhinian cannot take generate's 'negative_prompt': its jobs take a prompt only",
        ),
        (
            "generate",
            {"prompt": "x", "samples": 4},
            "samples",
            "Zhinian cannot take generate's 'samples': it makes one image per job",
        ),
        (
            "generate",
            {"prompt": "x", "seed": 7},
            "seed",
            "Zhinian cannot take generate's 'seed': its jobs take no seed",
        ),
        # Zhinian's duration: a limit now (it failed the job at submit before).
        (
            "ahv_video",
            {"prompt": "x", "duration": 20},
            "duration",
            "Zhinian takes 'duration' in [4, 15], got 20",
        ),
        (
            "ahv_video",
            {"prompt": "x", "duration": 2},
            "duration",
            "Zhinian takes 'duration' in [4, 15], got 2",
        ),
        # A free outpaint's placement is known at POST (its output size only once the input is).
        (
            "outpaint",
            {"image_url": "http://images.example.com/a.png", "left": 60, "right": 68},
            "left",
            "SenseTime's free outpaint places the image by multiples of 8 px ('left' is its free_x), got 60",
        ),
        (
            "outpaint",
            {"image_url": "http://images.example.com/a.png", "ratio": 2, "prompt": "the sea"},
            "prompt",
            "SenseTime cannot take outpaint's 'prompt': its outpaint fills from the image alone",
        ),
    ],
)
def test_a_payload_no_backend_of_its_route_takes_is_a_422_naming_the_field_and_the_limit(
    client: FlaskClient, task: str, payload: dict, field: str, message: str
) -> None:
    assert refused(submit(client, task, payload)) == {field: [message]}


@pytest.mark.parametrize(
    ("loras", "path", "words"),
    [
        ([{"model": "l1", "weight": 0}], ("0", "weight"), "greater than 0"),
        ([{"model": "l1", "weight": 2.5}], ("0", "weight"), "2.0"),
        ([{"model": "l1"}, {"weight": 1}], ("1", "model"), "Missing data"),
        ([{"model": "", "weight": 1}], ("0", "model"), "Length"),
        ([{"model": "l1", "merge_weight": 1}], ("0", "merge_weight"), "Unknown field"),
        (["l1"], ("0", "_schema"), "Invalid input type"),
    ],
)
def test_loras_items_are_checked_at_the_api_naming_the_item_and_its_field(
    client: FlaskClient, loras: list, path: tuple[str, str], words: str
) -> None:
    # ahv_image's route ends at an upstream aiorch, which takes any LoRA: only the schema refuses.
    details = refused(submit(client, "ahv_image", {"prompt": "x", "loras": loras}))
    index, name = path
    assert list(details) == ["loras"] and list(details["loras"]) == [index]
    assert words.lower() in " ".join(details["loras"][index][name]).lower()


def test_a_payload_inside_every_promise_is_accepted_at_provider_only_routes(client: FlaskClient) -> None:
    assert submit(client, "cx_image", {"prompt": "x", "samples": 1, "steps": 100}).status_code == 202
    assert submit(client, "generate", {"prompt": "x", "width": 1024, "height": 1024}).status_code == 202
    assert submit(client, "ahv_video", {"prompt": "x", "duration": 15}).status_code == 202
    free = {"image_url": "http://images.example.com/a.png", "left": 120, "right": 7, "top": 8}
    assert submit(client, "outpaint", free).status_code == 202


def test_a_payload_one_backend_of_the_route_takes_is_accepted(client: FlaskClient) -> None:
    # Volcengine cannot take 2000 px or a LoRA; the upstream aiorch after it can.
    payload = {"prompt": "x", "width": 2000, "loras": [{"model": "l1", "weight": 2}]}
    assert submit(client, "ahv_image", payload).status_code == 202
    assert (
        submit(client, "upscale", {"image_url": "http://images.example.com/a.png", "scale": 4}).status_code
        == 202
    )
