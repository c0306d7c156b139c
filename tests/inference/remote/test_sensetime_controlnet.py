"""``generate``'s ``controlnets`` sent to SenseTime as seed 001's ``controlnet_configs``, against
the fake that checks them as the seed's table does; providers with no ControlNet parameter
(Volcengine, Zhinian) refuse them."""

from __future__ import annotations

import pytest

from inference.base import InvalidInput
from inference.remote import ProviderError, RemoteStatus, SenseTimeClient
from tests.fakes.common import FakeClock
from tests.fakes.sensetime_fake import SenseTimeFake

AK, SK = "test-ak", "test-sk-0123456789abcdef0123456789abcdef"
PHOTO = "https://images.example.com/pose.jpg"


@pytest.fixture(scope="module")
def server():
    fake = SenseTimeFake(keys={AK: SK})
    with fake.running():
        yield fake


@pytest.fixture
def fake(server):
    server.reset()
    server.clock = FakeClock()
    return server


@pytest.fixture
def client(fake):
    with SenseTimeClient(
        base_url=fake.url, access_key=AK, secret_key=SK, clock=fake.clock, read_timeout=2
    ) as c:
        yield c


def sent_body(fake: SenseTimeFake) -> dict:
    return next(iter(fake.tasks.values()))["body"]


def test_controlnets_become_controlnet_configs_with_the_seeds_names(client, fake) -> None:
    client.submit(
        "generate",
        {
            "prompt": "a dancer",
            "controlnets": [
                {"type": "openpose", "image_url": PHOTO, "scale": 1.2, "start": 0.1, "end": 0.9},
                {"type": "canny", "image_url": PHOTO, "preprocessed": True},
            ],
        },
        options={"model_id": "model040"},
    )
    assert sent_body(fake)["controlnet_configs"] == [
        {"type": "openpose", "img_url": PHOTO, "weight": 1.2, "guidance_start": 0.1, "guidance_end": 0.9},
        # preprocessed: the seed's "pass" pre-processor takes the image as the control image.
        {"type": "canny", "img_url": PHOTO, "pre_processor": "pass"},
    ]


def test_the_jobs_controlnets_replace_a_routes_default_configs_and_finish(client, fake) -> None:
    default = [{"type": "depth", "img_url": "https://images.example.com/default.jpg"}]
    remote_id = client.submit(
        "generate",
        {"prompt": "a house", "controlnets": [{"type": "depth", "image_url": PHOTO}]},
        options={"model_id": "model040", "controlnet_configs": default},
    )
    assert sent_body(fake)["controlnet_configs"] == [{"type": "depth", "img_url": PHOTO}]
    statuses = [client.poll(remote_id).status for _ in range(3)]
    assert statuses[-1] == RemoteStatus.SUCCEEDED


def test_the_fake_fetches_each_controlnet_image_as_the_service_does(client, fake) -> None:
    fake.fetch_inputs = True
    url = f"{fake.url}/files/{fake.store_image(fmt='PNG')}"
    client.submit(
        "generate",
        {"prompt": "a cat", "controlnets": [{"type": "lineart", "image_url": url}]},
        options={"model_id": "model040"},
    )
    assert [f["url"] for f in fake.fetched] == [url]


@pytest.mark.parametrize(
    ("controlnets", "field"),
    [
        ([{"type": "canny", "image_url": PHOTO}] * 4, "controlnets"),
        ([{"type": "sketchy", "image_url": PHOTO}], "controlnets[0].type"),
        ([{"type": "canny", "image_url": PHOTO, "scale": 0}], "controlnets[0].scale"),
        ([{"type": "canny", "image_url": PHOTO}, {"type": "tile", "image_url": "data:image/png;base64,AA"}],
         "controlnets[1].image_url"),
        ([{"type": "canny", "image_url": PHOTO, "model": "my-canny"}], "controlnets[0].model"),
        ([{"type": "canny", "image_url": PHOTO, "start": 0.5, "end": 0.4}], "controlnets[0].start"),
    ],
)  # fmt: skip
def test_what_seed_001_cannot_take_is_refused_naming_the_field_before_any_request(
    client, fake, controlnets, field
) -> None:
    with pytest.raises(InvalidInput) as info:
        client.submit("generate", {"prompt": "x", "controlnets": controlnets}, options={"model_id": "m"})
    assert info.value.field == field
    assert fake.requests == []


def test_the_fake_refuses_configs_outside_the_seeds_table(client, fake) -> None:
    bad = [{"type": "canny", "img_url": PHOTO, "weight": 3}]
    with pytest.raises(ProviderError, match="weight"):
        client.submit("generate", {"prompt": "x"}, options={"model_id": "m", "controlnet_configs": bad})
    wrong = [{"type": "depth", "img_url": PHOTO, "pre_processor": "canny"}]
    with pytest.raises(ProviderError, match="pre_processor"):
        client.submit("generate", {"prompt": "x"}, options={"model_id": "m", "controlnet_configs": wrong})


@pytest.mark.parametrize("provider", ["volcengine", "zhinian"])
def test_providers_without_a_controlnet_parameter_refuse_controlnets_rather_than_drop_them(provider) -> None:
    from inference.remote import volcengine
    from inference.remote.zhinian import ZhinianClient

    check = volcengine.check_limits if provider == "volcengine" else ZhinianClient.check_limits
    payload = {"prompt": "x", "controlnets": [{"type": "canny", "image_url": PHOTO}]}
    with pytest.raises(InvalidInput) as info:
        check("generate", payload, {})
    assert info.value.field == "controlnets"
    check("generate", {"prompt": "x"}, {})
