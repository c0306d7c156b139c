"""Input fetching and image checks: the SSRF guard, byte and pixel caps, formats."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from config import Settings
from tasks.inputs import Fetcher, InputProblem, check_image
from tests.support.servers import ImageServer, bomb_png


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, astronaut_png: Path) -> Iterator[ImageServer]:
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "a.png").write_bytes(astronaut_png.read_bytes())
    srv = ImageServer(folder).start()
    yield srv
    srv.stop()


def problem(call) -> InputProblem:
    with pytest.raises(InputProblem) as caught:
        call()
    return caught.value


# The production guard with the test servers' loopback let through (tests/conftest.py does the same).
LOOPBACK = Settings(allow_private_networks=("127.0.0.0/8", "::1/128"))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_private_addresses_are_refused_by_default_even_through_dns(server: ImageServer, host: str) -> None:
    fetcher = Fetcher(Settings(allow_private_urls=False))
    url = f"http://{host}:{server.port}/img/a.png"
    err = problem(lambda: fetcher.load(url, "image_url"))
    assert err.code == "private_address" and err.field == "image_url"
    assert err.message == "refused: the host of image_url is a private or reserved address"
    assert server.hits == []


@pytest.mark.parametrize(
    "settings", [LOOPBACK, Settings(allow_private_urls=True)], ids=["allowed-network", "guard-off"]
)
def test_private_addresses_are_fetched_when_allowed(server: ImageServer, settings: Settings) -> None:
    checked = Fetcher(settings).load(server.url("img/a.png"), "image_url")
    assert (checked.width, checked.height, checked.ext) == (96, 96, "png")


def test_an_allowed_network_lets_only_itself_through(server: ImageServer) -> None:
    fetcher = Fetcher(Settings(allow_private_networks=("10.0.0.0/8",)))
    err = problem(lambda: fetcher.load(server.url("img/a.png"), "image_url"))
    assert err.code == "private_address"


def test_byte_cap_applies_while_streaming(server: ImageServer) -> None:
    fetcher = Fetcher(LOOPBACK.with_overrides(max_input_bytes=2048))
    assert problem(lambda: fetcher.load(server.url("img/a.png"), "image_url")).code == "input_too_large"


def test_the_next_input_is_fetched_after_an_unread_error_answer(server: ImageServer) -> None:
    # The servers keep connections alive: the 404's connection must not spoil the next request.
    fetcher = Fetcher(LOOPBACK)
    assert problem(lambda: fetcher.load(server.url("status/404"), "image_url")).code == "input_not_found"
    assert fetcher.load(server.url("img/a.png"), "image_url").width == 96


def test_redirects_are_checked_at_every_hop(server: ImageServer) -> None:
    fetcher = Fetcher(LOOPBACK)
    assert fetcher.load(server.url("redirect/a.png"), "image_url").width == 96
    err = problem(lambda: fetcher.load(server.url("goto/http://169.254.169.254/latest"), "image_url"))
    assert err.code == "private_address" and "169.254" not in err.message


def test_data_uri_and_bad_base64(astronaut_png: Path) -> None:
    fetcher = Fetcher(Settings())
    good = "data:image/png;base64," + base64.b64encode(astronaut_png.read_bytes()).decode()
    assert fetcher.load(good, "image_url").width == 96
    assert problem(lambda: fetcher.load("data:image/png;base64,@@@", "image_url")).code == "invalid_input"


def test_decompression_bomb_is_refused_from_its_header() -> None:
    err = problem(lambda: check_image(bomb_png(), "image_url", Settings()))
    assert err.code == "input_too_many_pixels"


def test_pixel_limit_is_configurable() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (200, 200)).save(buffer, "PNG")
    assert (
        problem(lambda: check_image(buffer.getvalue(), "f", Settings(max_input_pixels=100 * 100))).code
        == "input_too_many_pixels"
    )


def test_tiny_truncated_and_non_images_are_refused() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    assert problem(lambda: check_image(buffer.getvalue(), "f", Settings())).code == "input_too_small"
    big = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(big, "JPEG")
    assert problem(lambda: check_image(big.getvalue()[:200], "f", Settings())).code == "input_not_image"
    assert problem(lambda: check_image(b"%PDF-1.4 hello", "f", Settings())).code == "input_not_image"
    assert problem(lambda: check_image(b"", "f", Settings())).code == "input_not_image"


def test_unknown_asset_is_not_found() -> None:
    fetcher = Fetcher(Settings(), resolve_asset=lambda _id: None)
    assert problem(lambda: fetcher.load("asset://nope", "image_url")).code == "input_not_found"
