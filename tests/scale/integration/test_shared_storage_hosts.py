"""S3-compatible storage across worker hosts (``tests/support/hosts.py``), each with a private view
of the filesystem (a tmpfs over the storage folder, in a mount namespace of its own):

- host 1 runs only the cpu worker, host 2 only the GPU-queues worker, so a job's input is checked
  on one host and run on the other, and the API (in the machine's namespace, with a storage
  folder of its own) serves the output through ``/files/<name>``;
- the bucket is moto's stand-alone server on 127.0.0.1 (``tests/support/s3.py``), which the hosts
  reach through their forwarder on their link, as they reach Postgres and RabbitMQ;
- an http input is reachable from host 1 only (its forwarder, on its own link address): host 2
  can only have it from the bucket;
- no host's private storage folder, nor the API's, holds any file afterwards.

With local storage the same jobs' outputs stay on the host that wrote them
(``test_worker_hosts.py``); here everything works across hosts.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from config import Settings
from tests.conftest import KEYS
from tests.support.hosts import Host, Hosts, namespaces_unavailable
from tests.support.platform import Platform
from tests.support.platform_fixtures import platform_settings
from tests.support.s3 import S3Server, s3_server
from tests.support.servers import ImageServer
from tests.support.services import purge_queues

KEY = KEYS[0][1]
LINKS = "10.231.0.0/16"  # the harness's link addresses (an input served on host 1's gateway)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    reason = namespaces_unavailable()
    if reason is not None:
        pytest.skip(f"no worker hosts here: {reason}")
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def bucket(s3: S3Server) -> str:
    return s3.new_bucket()


@pytest.fixture(scope="module")
def s3_platform(
    base_settings: Settings,
    worker_amqp_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    s3: S3Server,
    bucket: str,
) -> Iterator[Platform]:
    """The API (no workers of its own) in the machine's namespace, its storage in the bucket."""
    tmp = tmp_path_factory.mktemp("scale-s3")
    networks = (*base_settings.allow_private_networks, LINKS)
    settings = platform_settings(
        base_settings, tmp, broker_url=worker_amqp_url, allow_private_networks=networks
    )
    plat = Platform(s3.settings(settings, bucket), tmp / "logs")
    purge_queues(plat.settings.broker_url)
    try:
        plat.start_api()
        yield plat
    finally:
        plat.stop()


@pytest.fixture(scope="module")
def s3_hosts(s3_platform: Platform, images: ImageServer) -> Iterator[Hosts]:
    """Host 1: the cpu worker (which checks http inputs); host 2: the GPU-queues worker."""
    with Hosts(s3_platform, slots=1, forward=(images.port,)) as hosts:
        hosts.start(hosts.add(), gpu=False)
        hosts.start(hosts.add(), cpu=False)
        yield hosts


def log(platform: Platform, name: str) -> str:
    path = platform.logs / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def private_files(platform: Platform, hosts: Hosts) -> dict[str, list[str]]:
    """Every file in each host's private storage folder and in the API's (expected: none)."""
    storage = platform.settings.storage_dir
    found = {}
    for host in hosts.hosts:
        listed = host.run("find", str(storage), "-type", "f")
        assert listed.returncode == 0, listed.stderr
        found[host.namespace] = listed.stdout.split()
    found["api"] = [str(path) for path in storage.rglob("*") if path.is_file()]
    return found


def served(platform: Platform, job: dict[str, Any], s3: S3Server, bucket: str, size: tuple[int, int]) -> None:
    """The output in the bucket, served by the API through ``/files/<name>``: a PNG of ``size``."""
    name = job["result"]["filename"]
    assert job["result"]["url"] == f"{platform.settings.public_url}/files/{name}"
    assert f"aiorch/files/{name}" in s3.keys(bucket)
    answer = requests.get(job["result"]["url"], timeout=10)
    assert answer.status_code == 200, answer.text
    image = Image.open(io.BytesIO(answer.content))
    assert (image.format, image.size) == ("PNG", size)
    assert answer.content == s3.read(bucket, f"aiorch/files/{name}")


def upscaled(platform: Platform, hosts: Hosts, image_url: str) -> dict[str, Any]:
    response = platform.submit(KEY, "upscale", {"image_url": image_url, "scale": 2})
    assert response.status_code == 202, response.text
    job = platform.wait(KEY, response.json()["job_id"], timeout=60)
    workers = "\n".join(log(platform, name)[-2000:] for host in hosts.hosts for name in host.workers)
    assert job["status"] == "succeeded", (job, workers)
    return job


def test_an_input_checked_on_one_host_runs_on_another_and_the_api_serves_the_output(
    s3_platform: Platform, s3_hosts: Hosts, images: ImageServer, s3: S3Server, bucket: str
) -> None:
    checker, runner = s3_hosts.hosts
    # Served on host 1's link address only: host 2 has no route to it.
    url = f"http://{checker.gateway}:{images.port}/img/astronaut.png"
    probe = f"import socket; socket.create_connection(({checker.gateway!r}, {images.port}), timeout=2)"
    unreachable = runner.run(sys.executable, "-c", probe)
    assert unreachable.returncode == 1 and "OSError" in unreachable.stderr, unreachable
    before = len(images.hits)
    job = upscaled(s3_platform, s3_hosts, url)
    job_id = job["job_id"]
    assert f"aiorch.prepare_job[{job_id}." in log(s3_platform, f"h{checker.index}-cpu")  # checked on host 1
    assert f"aiorch.run_job[{job_id}." in log(s3_platform, f"h{runner.index}-gpu")  # ... run on host 2
    assert images.hits[before:] == ["/img/astronaut.png"]  # fetched once, by host 1
    served(s3_platform, job, s3, bucket, (192, 192))
    assert s3.keys(bucket, f"aiorch/inputs/{job_id}/") == []  # removed when it ended
    assert private_files(s3_platform, s3_hosts) == dict.fromkeys(
        [h.namespace for h in s3_hosts.hosts] + ["api"], []
    )


def test_an_asset_uploaded_to_the_api_runs_on_a_host_and_every_output_is_served(
    s3_platform: Platform, s3_hosts: Hosts, astronaut_png: Path, s3: S3Server, bucket: str
) -> None:
    upload = requests.post(
        f"{s3_platform.base_url}/v1/assets",
        files={"file": ("astronaut.png", astronaut_png.read_bytes(), "image/png")},
        headers=s3_platform.headers(KEY),
        timeout=15,
    )
    assert upload.status_code == 201, upload.text
    asset_id = upload.json()["assets"][0]["asset_id"]
    runner: Host = s3_hosts.hosts[1]
    jobs = [upscaled(s3_platform, s3_hosts, f"asset://{asset_id}") for _ in range(3)]
    for job in jobs:
        assert f"aiorch.run_job[{job['job_id']}." in log(s3_platform, f"h{runner.index}-gpu")
        served(s3_platform, job, s3, bucket, (192, 192))
    assert len({job["result"]["filename"] for job in jobs}) == 3
    assert private_files(s3_platform, s3_hosts) == dict.fromkeys(
        [h.namespace for h in s3_hosts.hosts] + ["api"], []
    )
