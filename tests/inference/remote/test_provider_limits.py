"""Each provider's own limits on our payload, checked before any request (inference.remote.limits):
a refusal names our field and the provider's documented limit; what a provider cannot take at all
(LoRAs at Volcengine and Zhinian, a negative prompt or several samples at Volcengine, ...) is
refused naming the field, never dropped; a route's ``models`` option maps our model ids onto the
provider's; a free outpaint is SenseTime's ``imgen_free`` where it makes exactly the input plus the
margins, and refused naming the field where it cannot."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from inference.base import InvalidInput
from inference.remote import INPUT_SIZES, RemoteStatus, SenseTimeClient, check_limits
from inference.remote.limits import Bound, mapped_model
from inference.remote.sensetime.bodies import build_request
from inference.remote.volcengine import build_request as build_volcengine
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


def test_one_range_check_names_the_field_the_range_and_the_value() -> None:
    # Bound.check is every client's range check (base.check_range, its twin, is gone).
    with pytest.raises(InvalidInput) as info:
        Bound("steps", 1, 200).check("Volcengine", 300)
    assert (info.value.field, str(info.value)) == ("steps", "Volcengine takes 'steps' in [1, 200], got 300")
    with pytest.raises(InvalidInput) as info:
        Bound("steps", 1, 200).check("Volcengine", "many")
    assert (info.value.field, str(info.value)) == ("steps", "'steps' must be a number")


@pytest.mark.parametrize(
    ("payload", "field", "why"),
    [
        ({"negative_prompt": "blur"}, "negative_prompt", "only a positive_prompt"),
        ({"samples": 2}, "samples", "one image per task"),
        ({"model": "sd15"}, "model", "req_key is the model"),
        ({"scheduler": "euler"}, "scheduler", "no sampler choice"),
        ({"image_url": "https://e.com/a.png", "image_strength": 0.5}, "image_strength", "no strength"),
    ],
)
def test_volcengine_refuses_the_fields_its_body_cannot_express_instead_of_dropping_them(
    payload: dict, field: str, why: str
) -> None:
    refused = refusal("volcengine", "generate", {"prompt": "x", **payload}, {"req_key": "rk"})
    assert refused.field == field
    assert str(refused).startswith(f"Volcengine cannot take generate's {field!r}: ") and why in str(refused)


def test_volcengine_takes_one_sample_and_checks_steps_before_any_body_is_built() -> None:
    check_limits("volcengine", "generate", {"prompt": "x", "samples": 1, "steps": 200, "seed": 7}, {})
    steps = refusal("volcengine", "generate", {"prompt": "x", "steps": 300})
    assert (steps.field, str(steps)) == ("steps", "Volcengine takes 'steps' in [1, 200], got 300")
    # The body builder no longer refuses: a value out of range never reaches it (submit checks first).
    assert build_volcengine("rk", {"prompt": "x", "steps": 18}, {})["step"] == 18


@pytest.mark.parametrize(
    ("task", "payload", "field"),
    [
        ("generate", {"prompt": "x", "negative_prompt": "blur"}, "negative_prompt"),
        ("generate", {"prompt": "x", "seed": 7}, "seed"),
        ("generate", {"prompt": "x", "steps": 20}, "steps"),
        ("generate", {"prompt": "x", "cfg_scale": 7}, "cfg_scale"),
        ("generate", {"prompt": "x", "samples": 3}, "samples"),
        ("generate", {"prompt": "x", "model": "sd15"}, "model"),
        ("inpaint", {"prompt": "x", "strength": 0.5}, "strength"),
        ("upscale", {"image_url": "https://e.com/a.png", "scale": 2}, "scale"),
        ("ahv_video", {"prompt": "x", "seed": 1}, "seed"),
        ("outpaint", {"image_url": "https://e.com/a.png", "ratio": 2}, "task"),  # no capability for it
    ],
)
def test_zhinian_refuses_the_fields_its_capability_cannot_express(
    task: str, payload: dict, field: str
) -> None:
    assert refusal("zhinian", task, payload).field == field


@pytest.mark.parametrize(
    ("task", "payload", "field", "message"),
    [
        ("generate", {"prompt": "x", "width": 9000}, "width", "Zhinian takes 'width' in [1, 8192], got 9000"),
        ("generate", {"prompt": "x", "height": 0}, "height", "Zhinian takes 'height' in [1, 8192], got 0"),
        (
            "ahv_video",
            {"prompt": "x", "duration": 20},
            "duration",
            "Zhinian takes 'duration' in [4, 15], got 20",
        ),
        (
            "ahv_video",
            {"prompt": "x", "duration": 3},
            "duration",
            "Zhinian takes 'duration' in [4, 15], got 3",
        ),
    ],
)
def test_zhinians_sides_and_duration_are_limits_checked_before_any_body_is_built(
    task: str, payload: dict, field: str, message: str
) -> None:
    refused = refusal("zhinian", task, payload)
    assert (refused.field, str(refused)) == (field, message)
    check_limits("zhinian", "generate", {"prompt": "x", "width": 8192, "samples": 1}, {})
    check_limits("zhinian", "ahv_video", {"prompt": "x", "duration": 15}, {})


FREE = {"image_url": "https://e.com/a.png", "left": 120, "right": 120, "top": 112, "bottom": 128}
SIZED = {**ST_OPTIONS, INPUT_SIZES: {"image_url": [400, 400]}}


def test_sensetime_free_outpaint_is_imgen_free_with_the_input_plus_the_margins() -> None:
    check_limits("sensetime", "outpaint", FREE, SIZED)
    family, body = build_request("outpaint", FREE, SIZED)
    assert family == "outpaint.free"
    assert body == {
        "model_id": "model001",
        "img_url": "https://e.com/a.png",
        "width": 640,
        "height": 640,
        "free_x": 120,
        "free_y": 112,
    }


@pytest.mark.parametrize(
    ("payload", "size", "field", "words"),
    [
        # At POST (no input size yet) only the placement can be checked: free_x/free_y step by 8.
        ({"left": 60, "right": 4}, None, "left", "multiples of 8 px ('left' is its free_x), got 60"),
        ({"top": 4}, None, "top", "('top' is its free_y), got 4"),
        # 400 + 100 + 100 = 600 px: under imgen_free's 640.
        ({"left": 96, "right": 104}, [400, 640], "right", "make 600 px wide"),
        # 400 + 120 + 130 = 650 px: not a multiple of 64.
        ({"left": 120, "right": 130}, [400, 640], "right", "make 650 px wide"),
        ({"top": 112}, [640, 400], "top", "make 512 px high"),
        # Margins on x only: the input's own height must already be a multiple of 64.
        ({"left": 120, "right": 120}, [400, 400], "image_url", "make 400 px high"),
        ({"left": 512, "right": 512}, [128, 640], "image_url", "an input [256, 6000) px wide, got 128"),
    ],
)
def test_sensetime_refuses_a_free_outpaint_it_cannot_make_exactly_naming_the_field(
    payload: dict, size: list | None, field: str, words: str
) -> None:
    options = {**ST_OPTIONS, INPUT_SIZES: {"image_url": size}} if size else ST_OPTIONS
    refused = refusal("sensetime", "outpaint", {"image_url": "https://e.com/a.png", **payload}, options)
    assert refused.field == field and words in str(refused), str(refused)


def test_the_sensetime_fake_serves_imgen_free_as_seed_001_says() -> None:
    secret = "sk-0123456789abcdef0123456789abcdef"
    fake = SenseTimeFake(keys={"ak": secret})
    with fake.running(), SenseTimeClient(base_url=fake.url, access_key="ak", secret_key=secret) as client:
        remote_id = client.submit("outpaint", {**FREE, "samples": 2, "format": "png"}, options=SIZED)
        [task] = fake.tasks.values()
        assert task["family"] == "outpaint.free" and fake.requests[-1]["path"] == "/v1/outpaint/imgen_free"
        for _ in range(5):
            result = client.poll(remote_id)
            if result.final:
                break
        assert result.status == RemoteStatus.SUCCEEDED and len(result.outputs) == 2
        image = Image.open(io.BytesIO(client.fetch_output(result.outputs[0])))
        assert image.size == (640, 640) and image.format == "PNG"
        # The seed's own rules, checked by the fake for any caller: sides step by 64 in [640, 6000].
        for width in (600, 650):
            answer = client.session.post(
                f"{fake.url}/v1/outpaint/imgen_free",
                json={"model_id": "m", "img_url": "https://e.com/a.png", "width": width, "height": 640},
                headers={"Authorization": f"Bearer {client.token()}"},
                timeout=5,
            )
            assert answer.status_code == 400 and answer.json()["error"]["code"] == 3
