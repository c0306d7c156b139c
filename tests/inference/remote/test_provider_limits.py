"""Each provider's own limits on our payload, checked before any request (inference.remote.limits):
a refusal names our field and the provider's documented limit; what a provider cannot take at all
(LoRAs at Volcengine and Zhinian) is refused naming the field; a route's ``models`` option maps our
model ids onto the provider's."""

from __future__ import annotations

import pytest

from inference.base import InvalidInput
from inference.remote import SenseTimeClient, check_limits
from inference.remote.limits import Bound, mapped_model
from inference.remote.sensetime.bodies import build_request
from tests.fakes.sensetime_fake import SenseTimeFake

ST_OPTIONS = {"model_id": "model001"}


def refusal(kind: str, task: str, payload: dict, options: dict | None = None) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        check_limits(kind, task, payload, options or {})
    return info.value


def test_a_bound_prints_the_providers_interval_and_honours_open_ends() -> None:
    bound = Bound("scale", 1, 3, low_open=True)
    assert str(bound) == "(1, 3]" and str(Bound("w", 640, 6000)) == "[640, 6000]"
    assert not bound.holds(1) and bound.holds(1.01) and bound.holds(3) and not bound.holds(3.5)
    assert str(Bound("weight", 0, 2, low_open=True, high_open=True)) == "(0, 2)"


@pytest.mark.parametrize(
    ("task", "payload", "field", "limit"),
    [
        ("generate", {"prompt": "x", "width": 512}, "width", "[640, 6000]"),
        ("generate", {"prompt": "x", "height": 6008}, "height", "[640, 6000]"),
        ("generate", {"prompt": "x", "steps": 90}, "steps", "(0, 70]"),
        ("generate", {"prompt": "x", "cfg_scale": 0.5}, "cfg_scale", "[1, 20]"),
        ("generate", {"prompt": "x", "seed": 99999999}, "seed", "[0, 99999999)"),
        ("inpaint", {"prompt": "x", "strength": 0.05}, "strength", "[0.1, 1]"),
        ("inpaint", {"prompt": "x", "seed": 9999999}, "seed", "[0, 9999999)"),
        ("upscale", {"scale": 3.5}, "scale", "(1, 3]"),
        ("outpaint", {"ratio": 1.5, "width": 512, "height": 512}, "width", "[640, 6000]"),
        ("generate", {"prompt": "x", "loras": [{"model": "l1", "weight": 2.0}]}, "loras[0].weight", "(0, 2)"),
    ],
)
def test_sensetime_refuses_what_its_seed_limits_refuse_naming_the_field_and_the_limit(
    task: str, payload: dict, field: str, limit: str
) -> None:
    refused = refusal("sensetime", task, payload, ST_OPTIONS)
    assert refused.field == field
    assert str(refused).startswith(f"SenseTime takes '{field}' in {limit}, got ")


def test_sensetime_takes_what_is_inside_its_limits() -> None:
    payload = {
        "prompt": "x",
        "width": 640,
        "height": 6000,
        "steps": 70,
        "loras": [{"model": "l1", "weight": 1.99}],
    }
    check_limits("sensetime", "generate", payload, ST_OPTIONS)
    check_limits("sensetime", "upscale", {"scale": 3}, ST_OPTIONS)


def test_sensetime_takes_loras_on_generation_only_and_at_most_four_faces() -> None:
    inpaint = refusal("sensetime", "inpaint", {"prompt": "x", "loras": [{"model": "l1"}]})
    assert inpaint.field == "loras" and "generate only" in str(inpaint)
    faces = refusal("sensetime", "faceswap_multi", {"source_urls": ["a"] * 5})
    assert faces.field == "source_urls" and "at most 4 faces" in str(faces)
    check_limits("sensetime", "faceswap_multi", {"source_urls": ["a"] * 5, "target_faces_index": [0, 1]}, {})


@pytest.mark.parametrize(
    ("payload", "field", "message"),
    [
        ({"prompt": "x", "width": 2000}, "width", "Volcengine takes 'width' in [600, 1500], got 2000"),
        ({"prompt": "x", "height": 512}, "height", "Volcengine takes 'height' in [600, 1500], got 512"),
        ({"prompt": "x", "loras": [{"model": "l1"}]}, "loras", "Volcengine takes no LoRAs"),
    ],
)
def test_volcengine_refuses_sizes_outside_600_1500_and_any_lora(
    payload: dict, field: str, message: str
) -> None:
    refused = refusal("volcengine", "generate", payload)
    assert (refused.field, str(refused)) == (field, message)


def test_zhinian_refuses_loras_and_an_upstream_aiorch_takes_our_payload_as_it_is() -> None:
    loras = {"prompt": "x", "loras": [{"model": "l1", "weight": 2.0}], "width": 64}
    assert refusal("zhinian", "generate", loras).field == "loras"
    check_limits("upstream", "generate", loras, {})
    with pytest.raises(ValueError, match="unknown remote provider"):
        check_limits("nowhere", "generate", loras, {})


def test_a_routes_models_option_maps_our_ids_and_refuses_the_ones_it_does_not_map() -> None:
    options = {"model_id": "model001", "models": {"sd15": "model007", "our-style": "lora-st-1"}}
    assert mapped_model("SenseTime", "sd15", options, "model") == "model007"
    assert mapped_model("SenseTime", "theirs", {"model_id": "m"}, "model") == "theirs"  # no option
    unknown = refusal("sensetime", "generate", {"prompt": "x", "model": "sdxl"}, options)
    assert unknown.field == "model" and "sd15" in str(unknown)
    lora = refusal("sensetime", "generate", {"prompt": "x", "loras": [{"model": "lora-local"}]}, options)
    assert lora.field == "loras[0].model"
    payload = {"prompt": "x", "model": "sd15", "loras": [{"model": "our-style", "weight": 0.5}]}
    family, body = build_request("generate", payload, options)
    assert body["model_id"] == "model007"
    assert body["lora_configs"] == [{"model_id": "lora-st-1", "merge_weight": 0.5}]


def test_sensetime_never_draws_the_payloads_watermark_only_a_routes_own_watermark_type() -> None:
    payload = {"prompt": "x", "watermark": {"text": "AI", "position": "topleft", "opacity": 1.0}}
    _, body = build_request("generate", payload, ST_OPTIONS)
    assert "watermark_config" not in body
    _, body = build_request("generate", payload, {**ST_OPTIONS, "watermark_type": "MakaLogo"})
    assert body["watermark_config"] == {"type": "MakaLogo"}


def test_the_sensetime_client_checks_its_limits_before_any_request() -> None:
    fake = SenseTimeFake(keys={"ak": "sk"})
    with fake.running(), SenseTimeClient(base_url=fake.url, access_key="ak", secret_key="sk") as client:
        assert SenseTimeClient.check_limits is not None
        with pytest.raises(InvalidInput) as info:
            client.submit(
                "upscale", {"image_url": "https://e.com/a.png", "scale": 4}, options={"model_id": "sr"}
            )
        assert info.value.field == "scale"
        assert fake.requests == []
