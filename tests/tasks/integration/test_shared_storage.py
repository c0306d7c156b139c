"""Jobs on S3-compatible storage through the real API, RabbitMQ, Celery workers and Postgres, with
each process on a disk of its own: the API, the cpu worker and the gpu worker each get a storage
folder no other one reads (``AIORCH_STORAGE_DIR``), as on three hosts, so any hidden shared-disk
assumption fails here. The bucket is moto's stand-alone server (tests/support/s3.py)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image
from sqlalchemy import update

from config import Settings
from models.db import utcnow
from models.jobs import StoredFile
from tasks.celery_app import create_celery
from tasks.runtime import Runtime
from tasks.sweeps import sweep
from tests.conftest import KEYS
from tests.support.platform import Platform
from tests.support.platform_fixtures import platform_settings
from tests.support.s3 import S3Server
from tests.support.servers import ImageServer
from tests.support.services import purge_queues

ALICE = KEYS[0][1]
GPU_QUEUES = "gpu.diffusion,gpu.superres,gpu.faceswap,gpu.vision"


@pytest.fixture(scope="module")
def bucket(s3: S3Server) -> str:
    # Module-scoped, as the platform that keeps its files there is.
    return s3.new_bucket()


@pytest.fixture(scope="module")
def platform(
    base_settings: Settings,
    worker_amqp_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    s3: S3Server,
    bucket: str,
) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp("shared-storage")
    settings = s3.settings(platform_settings(base_settings, tmp, broker_url=worker_amqp_url), bucket)
    plat = Platform(settings, tmp / "logs")
    purge_queues(settings.broker_url)
    try:
        plat.start_api()
        # Two worker "hosts", each with a storage folder of its own that neither the API nor the
        # other worker ever sees.
        plat.start_worker("cpu", "cpu", 1, env={"AIORCH_STORAGE_DIR": str(tmp / "cpu-host")})
        plat.start_worker("gpu", GPU_QUEUES, 1, env={"AIORCH_STORAGE_DIR": str(tmp / "gpu-host")})
        yield plat
    finally:
        plat.stop()


def local_files(platform: Platform) -> list[Path]:
    """Every file in the three processes' storage folders (expected: none, all is in the bucket)."""
    var = platform.settings.var_dir
    folders = [platform.settings.storage_dir, var / "cpu-host", var / "gpu-host"]
    return [path for folder in folders for path in folder.rglob("*") if path.is_file()]


def upscaled(platform: Platform, image_url: str) -> dict[str, Any]:
    response = platform.submit(ALICE, "upscale", {"image_url": image_url, "scale": 2})
    assert response.status_code == 202, response.text
    job = platform.wait(ALICE, response.json()["job_id"], timeout=60)
    assert job["status"] == "succeeded", (job, platform.log("gpu")[-2000:], platform.log("cpu")[-2000:])
    return job


def test_a_job_prepared_on_one_host_runs_on_another_and_its_output_is_served_from_the_bucket(
    platform: Platform, images: ImageServer, s3: S3Server, bucket: str
) -> None:
    # An http input: checked by the prepare step on the cpu host, read by the run on the gpu host.
    job = upscaled(platform, images.url("img/astronaut.png"))
    name = job["result"]["filename"]
    assert f"aiorch/files/{name}" in s3.keys(bucket)
    served = requests.get(job["result"]["url"], timeout=10)
    assert served.status_code == 200 and served.headers["Cache-Control"] == "private"
    assert Image.open(io.BytesIO(served.content)).size == (192, 192)
    assert served.content == s3.read(bucket, f"aiorch/files/{name}")
    runtime = Runtime(platform.settings)
    try:
        stored = runtime.store.get(job["job_id"])
        assert stored is not None and stored.inputs is not None
        entry = stored.inputs["image_url"]
        assert entry["name"] == "image_url_0.png" and "path" not in entry  # no host's disk
    finally:
        runtime.db.dispose()
    assert s3.keys(bucket, f"aiorch/inputs/{job['job_id']}/") == []  # removed when it ended
    assert local_files(platform) == []


def test_an_uploaded_asset_lands_in_the_bucket_and_a_worker_host_reads_it(
    platform: Platform, astronaut_png: Path, s3: S3Server, bucket: str
) -> None:
    response = requests.post(
        f"{platform.base_url}/v1/assets",
        files={"file": ("astronaut.png", astronaut_png.read_bytes(), "image/png")},
        headers=platform.headers(ALICE),
        timeout=15,
    )
    assert response.status_code == 201, response.text
    asset_id = response.json()["assets"][0]["asset_id"]
    uploads = s3.keys(bucket, "aiorch/uploads/")
    assert len(uploads) == 1 and s3.read(bucket, uploads[0]) == astronaut_png.read_bytes()
    content = requests.get(
        f"{platform.base_url}/v1/assets/{asset_id}/content", headers=platform.headers(ALICE), timeout=10
    )
    assert content.status_code == 200 and content.content == astronaut_png.read_bytes()
    # asset:// needs no network: the gpu host checks it itself, from the bucket.
    job = upscaled(platform, f"asset://{asset_id}")
    assert f"aiorch/files/{job['result']['filename']}" in s3.keys(bucket)
    assert local_files(platform) == []


def test_deleting_a_job_deletes_its_objects(
    platform: Platform, images: ImageServer, s3: S3Server, bucket: str
) -> None:
    job = upscaled(platform, images.url("img/astronaut.png"))
    key = f"aiorch/files/{job['result']['filename']}"
    assert key in s3.keys(bucket)
    deleted = requests.delete(
        f"{platform.base_url}/v1/jobs/{job['job_id']}", headers=platform.headers(ALICE), timeout=10
    )
    assert deleted.status_code == 204
    assert key not in s3.keys(bucket)
    assert requests.get(job["result"]["url"], timeout=10).status_code == 404


def test_the_retention_sweep_deletes_expired_objects(
    platform: Platform, images: ImageServer, s3: S3Server, bucket: str
) -> None:
    job = upscaled(platform, images.url("img/astronaut.png"))
    kept = upscaled(platform, images.url("img/astronaut.png"))
    key = f"aiorch/files/{job['result']['filename']}"
    runtime = Runtime(platform.settings)
    try:
        with runtime.db.session() as session:
            session.execute(
                update(StoredFile).where(StoredFile.job_id == job["job_id"]).values(expires_at=utcnow())
            )
        # The sweep as beat runs it, on a host whose disk holds none of the files.
        host = runtime.settings.with_overrides(storage_dir=platform.settings.var_dir / "sweep-host")
        sweeper = Runtime(host)
        try:
            counts = sweep(sweeper, create_celery(host))
        finally:
            sweeper.db.dispose()
    finally:
        runtime.db.dispose()
    assert counts["files_removed"] >= 1
    assert key not in s3.keys(bucket)
    assert f"aiorch/files/{kept['result']['filename']}" in s3.keys(bucket)
    assert requests.get(job["result"]["url"], timeout=10).status_code == 404
    assert requests.get(kept["result"]["url"], timeout=10).status_code == 200
