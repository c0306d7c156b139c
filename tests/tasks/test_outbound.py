"""The SSRF guard with https that works: real TLS servers with certificates for a host name.

The servers listen on 127.0.0.1 and are reached by the name ``localhost`` (which resolves there
without any DNS server), through the guarded, pinned path: ``127.0.0.0/8`` is let through
``AIORCH_ALLOW_PRIVATE_NETWORKS`` and the throwaway CA through ``AIORCH_CA_BUNDLE``, as an
operator would configure an internal image server. Every refusal the security review found is a
case below, checked at the API (no DNS) and again where the worker connects.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from marshmallow import ValidationError

from app import create_app
from app.schemas import check_webhook_url
from config import Settings
from inference.remote.base import HttpClient
from tasks import catalog
from tasks.inputs import Fetcher, InputProblem
from tasks.outbound import PrivateAddressError, http_pool, tls_context
from tests.conftest import KEYS
from tests.support.servers import ImageServer, TlsSite, WebhookReceiver

LOOPBACK = ("127.0.0.0/8", "::1/128")
# Every spelling the review got past the API's check, plus the other reserved IPv6 ranges: each
# is refused by the production guard (no allow-list) wherever it is checked.
REFUSED_HOSTS = [
    "[64:ff9b::a9fe:a9fe]",  # NAT64 of 169.254.169.254
    "[64:ff9b::7f00:1]",  # NAT64 of 127.0.0.1
    "[2002:a9fe:a9fe::1]",  # 6to4 of 169.254.169.254
    "[2002:c0a8:101::1]",  # 6to4 of 192.168.1.1
    "[::127.0.0.1]",  # IPv4-compatible
    "[::ffff:0:127.0.0.1]",  # IPv4-translated (SIIT)
    "[::ffff:169.254.169.254]",  # IPv4-mapped
    "[fec0::1]",  # site-local
    "[2001::a9fe:a9fe]",  # Teredo
    "[ff02::1]",  # multicast
    "LOCALHOST.",
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "127.1",
    "0",
    "\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11",  # full-width 127.0.0.1 (IDNA maps it)
]
IPV4 = re.compile(r"\b\d{1,3}(\.\d{1,3}){3}\b")


def guarded(**changes) -> Settings:
    """The production guard with nothing allowed, as an operator gets it by default."""
    return Settings(allow_private_urls=False, **changes)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, astronaut_png: Path) -> Path:
    path = tmp_path_factory.mktemp("outbound")
    (path / "a.png").write_bytes(astronaut_png.read_bytes())
    return path


@pytest.fixture
def site() -> TlsSite:
    return TlsSite("localhost")


@pytest.fixture
def https_server(folder: Path, site: TlsSite) -> Iterator[ImageServer]:
    server = ImageServer(folder, tls=site, host="localhost").start()
    yield server
    server.stop()


@pytest.fixture
def trusted(site: TlsSite, tmp_path: Path) -> Settings:
    """The guard on, loopback let through its allow-list, the test CA trusted."""
    return guarded(allow_private_networks=LOOPBACK, ca_bundle=site.ca_file(tmp_path))


# -- https through the guard ----------------------------------------------------------------------


def test_https_input_is_fetched_with_sni_and_host_naming_the_host_on_fresh_and_reused_connections(
    https_server: ImageServer, site: TlsSite, trusted: Settings
) -> None:
    fetcher = Fetcher(trusted)
    url = https_server.url("img/a.png")
    assert fetcher.load(url, "image_url").width == 96
    assert fetcher.load(url, "image_url").width == 96  # the same kept-alive connection
    assert site.sni == ["localhost"]  # one handshake for two requests: the connection was reused
    fetcher.pool.clear()  # a fresh connection: the name again, never the checked address
    assert fetcher.load(url, "image_url").width == 96
    assert site.sni == ["localhost", "localhost"]
    assert [h["Host"] for h in https_server.headers] == [f"localhost:{https_server.port}"] * 3


def test_plain_http_keeps_the_host_header_on_a_reused_connection(folder: Path) -> None:
    server = ImageServer(folder, host="localhost").start()
    try:
        fetcher = Fetcher(guarded(allow_private_networks=LOOPBACK))
        for _ in range(3):
            fetcher.load(server.url("img/a.png"), "image_url")
        assert [h["Host"] for h in server.headers] == [f"localhost:{server.port}"] * 3
    finally:
        server.stop()


def test_a_certificate_for_another_name_fails_verification_as_a_final_error(
    folder: Path, site: TlsSite, trusted: Settings
) -> None:
    other = TlsSite("images.test", ca=site.ca)  # the trusted CA, but not this host's name
    server = ImageServer(folder, tls=other, host="localhost").start()
    try:
        with pytest.raises(InputProblem) as caught:
            Fetcher(trusted).load(server.url("img/a.png"), "image_url")
        assert caught.value.code == "input_tls_error" and caught.value.field == "image_url"
        assert "certificate verify failed" in caught.value.message
        assert "localhost" in caught.value.message
        assert server.hits == []
    finally:
        server.stop()


def test_without_the_ca_bundle_the_private_ca_is_not_trusted(
    https_server: ImageServer, site: TlsSite
) -> None:
    with pytest.raises(InputProblem) as caught:
        Fetcher(guarded(allow_private_networks=LOOPBACK)).load(https_server.url("img/a.png"), "image_url")
    assert caught.value.code == "input_tls_error"
    assert https_server.hits == []


def test_an_https_webhook_post_goes_through_the_guarded_pool(site: TlsSite, trusted: Settings) -> None:
    receiver = WebhookReceiver(tls=site, host="localhost").start()
    try:
        pool = http_pool(trusted)
        for n in range(2):
            body = json.dumps({"n": n}).encode()
            response = pool.request(
                "POST", receiver.url, body=body, headers={"Content-Type": "application/json"}
            )
            assert response.status == 200
        received = receiver.wait_for(2)
        assert [r.json() for r in received] == [{"n": 0}, {"n": 1}]
        assert [r.headers["Host"] for r in received] == [f"localhost:{receiver.port}"] * 2
        assert site.sni == ["localhost"]
    finally:
        receiver.stop()


def test_remote_providers_trust_the_ca_bundle_too(https_server: ImageServer, trusted: Settings) -> None:
    url = https_server.url("img/a.png")
    with HttpClient("https://localhost", ssl_context=tls_context(trusted)) as client:
        assert client.session.get(url, timeout=5).status_code == 200
    with (
        HttpClient("https://localhost") as plain,
        pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        plain.session.get(url, timeout=5)


def test_an_allowed_network_admits_every_spelling_of_its_addresses(folder: Path) -> None:
    server = ImageServer(folder).start()
    try:
        fetcher = Fetcher(guarded(allow_private_networks=("127.0.0.0/8",)))
        for host in ("127.0.0.1", "127.1", "0x7f000001", "2130706433", "[::ffff:127.0.0.1]"):
            url = f"http://{host}:{server.port}/img/a.png"
            assert fetcher.load(url, "image_url").width == 96, host
    finally:
        server.stop()


# -- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", REFUSED_HOSTS)
def test_refused_hosts_are_a_422_naming_the_field_at_the_api(host: str) -> None:
    url = f"http://{host}/a.png"
    schema = catalog.payload_schema(catalog.TASKS["upscale"], guarded())
    with pytest.raises(ValidationError) as caught:
        schema.load({"image_url": url})
    assert "image_url" in caught.value.messages
    with pytest.raises(ValidationError) as caught:
        check_webhook_url(url, guarded())
    assert "webhook_url" in caught.value.messages


@pytest.mark.parametrize("host", REFUSED_HOSTS)
def test_refused_hosts_are_a_final_refusal_when_fetched(host: str) -> None:
    with pytest.raises(InputProblem) as caught:
        Fetcher(guarded()).load(f"http://{host}/a.png", "image_url")
    assert caught.value.code == "private_address" and caught.value.field == "image_url"
    assert caught.value.message == "refused: the host of image_url is a private or reserved address"


@pytest.mark.parametrize("host", [h for h in REFUSED_HOSTS if h.isascii()])
def test_the_connection_itself_refuses_them_whatever_checked_the_url_before(host: str) -> None:
    # What a webhook delivery or any other user of the pool gets, with no check of its own.
    with pytest.raises(PrivateAddressError) as caught:
        http_pool(guarded()).request("GET", f"http://{host}/a.png", timeout=2)
    assert str(caught.value) == "refused: the host is a private or reserved address"


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/latest/meta-data", "http://[::ffff:a9fe:a9fe]/", "http://[64:ff9b::a9fe:a9fe]/"],
)
def test_metadata_address_stays_refused_while_loopback_is_allowed(url: str) -> None:
    settings = guarded(allow_private_networks=LOOPBACK)
    with pytest.raises(ValidationError):
        catalog.payload_schema(catalog.TASKS["upscale"], settings).load({"image_url": url})
    with pytest.raises(ValidationError):
        check_webhook_url(url, settings)
    with pytest.raises(InputProblem) as caught:
        Fetcher(settings).load(url, "image_url")
    assert caught.value.code == "private_address"
    with pytest.raises(PrivateAddressError):
        http_pool(settings).request("GET", url, timeout=2)


def test_a_name_resolving_to_a_private_address_is_refused_without_saying_where(folder: Path) -> None:
    # The machine's own name: /etc/hosts maps it to a loopback or private address on most hosts,
    # and the API cannot know that without DNS, so only the worker's check stops it.
    name = socket.gethostname()
    try:
        answers = {info[4][0] for info in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
    except socket.gaierror:
        pytest.skip(f"{name} does not resolve here")
    if not all(a.startswith(("127.", "10.", "192.168.", "172.")) or a == "::1" for a in answers):
        pytest.skip(f"{name} resolves to a public address here")
    server = ImageServer(folder).start()
    try:
        url = f"http://{name}:{server.port}/img/a.png"
        catalog.payload_schema(catalog.TASKS["upscale"], guarded()).load({"image_url": url})  # no DNS
        with pytest.raises(InputProblem) as caught:
            Fetcher(guarded()).load(url, "image_url")
        assert caught.value.code == "private_address"
        assert not IPV4.search(caught.value.message) and name not in caught.value.message
        assert server.hits == []
    finally:
        server.stop()


def test_an_unresolvable_name_is_a_final_input_problem() -> None:
    with pytest.raises(InputProblem) as caught:
        Fetcher(guarded()).load("http://no-such-host.invalid/a.png", "image_url")
    assert caught.value.code == "input_unreachable"
    assert caught.value.message == "refused: the host of image_url cannot be resolved"


def test_the_api_refuses_them_with_a_422_naming_the_field(settings: Settings) -> None:
    client = create_app(settings.with_overrides(allow_private_networks=())).test_client()
    headers = {"X-API-Key": KEYS[0][1]}
    for host in ("[64:ff9b::a9fe:a9fe]", "2130706433", "LOCALHOST.", "0"):
        url = f"http://{host}/a.png"
        response = client.post(
            "/v1/jobs", json={"task": "upscale", "payload": {"image_url": url}}, headers=headers
        )
        assert response.status_code == 422, host
        assert "image_url" in response.get_json()["error"]["details"]["payload"]
        body = {"task": "upscale", "payload": {"image_url": "https://example.com/a.png"}, "webhook_url": url}
        response = client.post("/v1/jobs", json=body, headers=headers)
        assert response.status_code == 422, host
        assert "webhook_url" in response.get_json()["error"]["details"]
