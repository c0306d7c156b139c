"""stylize (and remove_object by prompt, free outpaint) at the providers: SenseTime's stylization
(seed 001 "风格化", a model per style) and Volcengine's portrait img2img (seed 002, restyled by its
prompt), against the fakes that follow the seeds; what a provider cannot take is refused naming
our field before any request, so a route goes on to its next backend."""

from __future__ import annotations

import pytest

from inference.base import InvalidInput
from inference.remote import RemoteStatus, SenseTimeClient, VolcengineClient, check_limits
from inference.styles import BUILTIN_STYLES
from tests.fakes.common import FakeClock
from tests.fakes.sensetime_fake import SenseTimeFake
from tests.fakes.volcengine_fake import VolcengineFake

ST_AK, ST_SK = "test-ak", "test-sk-0123456789abcdef0123456789abcdef"
VE_AK, VE_SK = "AKLTtest-access", "c2VjcmV0LXRlc3QtdmFsdWU="
REQ_KEY = "img2img_anime_accelerated_maintain_id"
ST_ROUTE = {"styles": {"anime": "st-anime", "my-lora": "st-cute-blindbox"}}
VE_ROUTE = {
    "req_key": REQ_KEY,
    "params": {"facestyle_switch": True, "face_image": "uri://binary_data?index=0"},
}
IMAGE = "https://e.com/portrait.jpg"


@pytest.fixture(scope="module")
def sensetime():
    fake = SenseTimeFake(keys={ST_AK: ST_SK})
    with fake.running():
        yield fake


@pytest.fixture(scope="module")
def volcengine():
    fake = VolcengineFake(keys={VE_AK: VE_SK}, req_keys=(REQ_KEY,))
    with fake.running():
        yield fake


def final(client, remote_id):
    for _ in range(10):
        result = client.poll(remote_id)
        if result.final:
            return result
    raise AssertionError("never final")


def test_sensetime_stylizes_with_the_stylization_model_the_route_maps_the_style_to(sensetime) -> None:
    sensetime.reset()
    sensetime.clock = clock = FakeClock()
    with SenseTimeClient(base_url=sensetime.url, access_key=ST_AK, secret_key=ST_SK, clock=clock) as client:
        for style, model_id in ST_ROUTE["styles"].items():
            remote_id = client.submit(
                "stylize", {"image_url": IMAGE, "style": style, "samples": 2}, options=ST_ROUTE
            )
            task = list(sensetime.tasks.values())[-1]
            assert task["family"] == "stylization"
            assert task["body"] == {"model_id": model_id, "img_url": IMAGE, "samples": 2}
            result = final(client, remote_id)
            assert result.status == RemoteStatus.SUCCEEDED and len(result.outputs) == 2


@pytest.mark.parametrize(
    ("task", "payload", "field"),
    [
        ("stylize", {"image_url": IMAGE, "style": "watercolor"}, "style"),  # not in the route's styles
        ("stylize", {"image_url": IMAGE, "style": "anime", "prompt": "a cat"}, "prompt"),
        ("stylize", {"image_url": IMAGE, "style": "anime", "strength": 0.5}, "strength"),
        ("remove_object", {"image_url": IMAGE, "prompt": "the dog"}, "prompt"),
        ("remove_object", {"image_url": IMAGE, "mask_url": IMAGE, "fill_prompt": "grass"}, "fill_prompt"),
        # imgen_free places the image at multiples of 8 px (free outpaint itself is taken).
        ("outpaint", {"image_url": IMAGE, "left": 60}, "left"),
        ("outpaint", {"image_url": IMAGE, "ratio": 1.5, "prompt": "sea"}, "prompt"),
    ],
)
def test_what_sensetime_cannot_take_is_refused_naming_the_field(task: str, payload: dict, field: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        check_limits("sensetime", task, payload, ST_ROUTE)
    assert refused.value.field == field


def test_volcengine_restyles_a_portrait_with_the_presets_prompt(volcengine) -> None:
    volcengine.reset()
    volcengine.clock = clock = FakeClock()
    with VolcengineClient(base_url=volcengine.url, access_key=VE_AK, secret_key=VE_SK, clock=clock) as client:
        remote_id = client.submit(
            "stylize", {"image_url": IMAGE, "style": "anime", "prompt": "a girl"}, options=VE_ROUTE
        )
        sent = next(iter(volcengine.tasks.values()))["body"]
        assert sent["positive_prompt"] == BUILTIN_STYLES["anime"].compose("a girl")
        assert sent["image_urls"] == [IMAGE] and sent["facestyle_switch"] is True
        assert "style" not in sent and "strength" not in sent
        assert final(client, remote_id).status == RemoteStatus.SUCCEEDED


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"image_url": IMAGE, "style": "my-lora"}, "style"),  # a LoRA: no field for it in seed 002
        ({"image_url": IMAGE, "style": "anime", "strength": 0.4}, "strength"),
    ],
)
def test_what_volcengine_cannot_take_is_refused_naming_the_field(
    volcengine, payload: dict, field: str
) -> None:
    volcengine.reset()
    with pytest.raises(InvalidInput) as refused:
        check_limits("volcengine", "stylize", payload, VE_ROUTE)
    assert refused.value.field == field
    client = VolcengineClient(base_url=volcengine.url, access_key=VE_AK, secret_key=VE_SK)
    with client, pytest.raises(InvalidInput):
        client.submit("stylize", payload, options=VE_ROUTE)
    assert not volcengine.tasks  # refused before any request
