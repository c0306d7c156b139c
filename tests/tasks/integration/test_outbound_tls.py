"""https inputs and webhooks through the real API and workers, with the SSRF guard on.

The platform is configured as an operator with an internal image server would: the guard on,
``AIORCH_ALLOW_PRIVATE_NETWORKS=127.0.0.0/8,::1/128`` and the servers' CA in
``AIORCH_CA_BUNDLE``. The servers have certificates for the name ``localhost`` only.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from config import Settings
from tests.conftest import KEYS
from tests.support.platform import Platform
from tests.support.platform_fixtures import platform_settings, running_platform
from tests.support.servers import ImageServer, TlsSite, WebhookReceiver

ALICE = KEYS[0][1]


@pytest.fixture(scope="module")
def site() -> TlsSite:
    return TlsSite("localhost")


@pytest.fixture(scope="module")
def tls_images(
    site: TlsSite, tmp_path_factory: pytest.TempPathFactory, astronaut_png: Path
) -> Iterator[ImageServer]:
    folder = tmp_path_factory.mktemp("tls-served")
    shutil.copy(astronaut_png, folder / "astronaut.png")
    server = ImageServer(folder, tls=site, host="localhost").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_platform(
    site: TlsSite, base_settings: Settings, worker_amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp("tls-platform")
    settings = platform_settings(
        base_settings,
        tmp,
        broker_url=worker_amqp_url,
        allow_private_urls=False,
        allow_private_networks=("127.0.0.0/8", "::1/128"),
        ca_bundle=site.ca_file(tmp),
        webhook_retry_base=0.5,
    )
    with running_platform(settings, tmp) as plat:
        yield plat


def test_an_https_input_and_an_https_webhook_work_with_the_guard_on(
    tls_platform: Platform, tls_images: ImageServer, site: TlsSite
) -> None:
    receiver = WebhookReceiver(tls=site, host="localhost").start()
    try:
        response = tls_platform.submit(
            ALICE, "upscale", {"image_url": tls_images.url("img/astronaut.png")}, webhook_url=receiver.url
        )
        assert response.status_code == 202, response.text
        job = tls_platform.wait(ALICE, response.json()["job_id"])
        assert job["status"] == "succeeded", job
        hit = receiver.wait_for(1)[0]
        assert hit.json()["job_id"] == job["job_id"]
        assert hit.headers["Host"] == f"localhost:{receiver.port}"
        assert tls_images.headers[-1]["Host"] == f"localhost:{tls_images.port}"
        assert set(site.sni) == {"localhost"}
    finally:
        receiver.stop()


def test_a_redirect_to_the_metadata_address_fails_the_job_at_once_without_retries(
    tls_platform: Platform, tls_images: ImageServer
) -> None:
    url = tls_images.url("goto/http://169.254.169.254/latest/meta-data")
    started = time.monotonic()
    job = tls_platform.wait(ALICE, tls_platform.submit(ALICE, "upscale", {"image_url": url}).json()["job_id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "private_address"
    assert job["error"]["message"] == "refused: the host of image_url is a private or reserved address"
    assert time.monotonic() - started < 10  # final: not retried with back-off


@pytest.mark.parametrize("host", ["[64:ff9b::a9fe:a9fe]", "169.254.169.254", "0xa9fea9fe"])
def test_refused_hosts_are_a_422_at_the_api(tls_platform: Platform, host: str) -> None:
    response = tls_platform.submit(ALICE, "upscale", {"image_url": f"http://{host}/a.png"})
    assert response.status_code == 422
    assert "image_url" in response.json()["error"]["details"]["payload"]
