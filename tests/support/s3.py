"""A local S3-compatible server for the shared-storage tests: moto's stand-alone server, in a
thread of the test process on 127.0.0.1 and a free port, reached over HTTP by the API and the
workers exactly as MinIO or Ceph RGW would be. Started within a bound, stopped on exit.

``tests/conftest.py`` loads this module as a pytest plugin, so ``s3`` (one server per test module)
and ``bucket`` (a new bucket per test) are fixtures of every test; a module whose platform lives
as long as the module overrides ``bucket`` with a module-scoped one.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
import requests
from moto.server import ThreadedMotoServer

from config import Settings

START_TIMEOUT = 20.0
ACCESS_KEY = "aiorch-test-access"
SECRET_KEY = "aiorch-test-secret"  # moto takes any credentials; the code under test must send some
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def client(self) -> Any:
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def new_bucket(self) -> str:
        name = f"aiorch-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def settings(self, base: Settings, bucket: str, prefix: str = "aiorch") -> Settings:
        """``base`` keeping its storage in ``bucket`` under ``prefix``, as the environment says it."""
        return base.with_overrides(
            storage_url=f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}",
            s3_endpoint_url=self.endpoint,
            s3_region=REGION,
            s3_access_key_id=ACCESS_KEY,
            s3_secret_access_key=SECRET_KEY,
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", ()))

    def read(self, bucket: str, key: str) -> bytes:
        body = self.client().get_object(Bucket=bucket, Key=key)["Body"]
        with body:
            data: bytes = body.read()
        return data


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    # ``start`` waits without a bound for the server's socket: started from a thread of our own,
    # so a server that cannot start fails the test after START_TIMEOUT instead of hanging it.
    starter = threading.Thread(target=server.start, daemon=True)
    starter.start()
    starter.join(START_TIMEOUT)
    if starter.is_alive():
        raise RuntimeError(f"moto's S3 server did not start within {START_TIMEOUT:.0f}s")
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            requests.get(endpoint, timeout=2)
            break
        except requests.RequestException:
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(0.1)
    try:
        yield S3Server(endpoint)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@pytest.fixture
def bucket(s3: S3Server) -> str:
    return s3.new_bucket()
