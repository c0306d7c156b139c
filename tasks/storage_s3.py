"""The S3-compatible backend (``AIORCH_STORAGE_URL=s3://bucket/prefix``): MinIO, Ceph RGW, AWS S3.

Imported only when that setting names a bucket (``tasks.storage.open_backend``), so an API or a
worker on local storage never loads boto3 (about 25 MB). One client per process, made on first
use (after a worker's fork; boto3 clients are thread-safe, so the API's threads share it).

Credentials: ``AIORCH_S3_ACCESS_KEY_ID`` and ``AIORCH_S3_SECRET_ACCESS_KEY`` when set; otherwise
boto3's own chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, an instance role).
With ``AIORCH_S3_ENDPOINT_URL`` (MinIO, RGW, a local test server) buckets are addressed by path
(``http://host:9000/bucket/key``), which every S3-compatible server understands.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from config import Settings
from tasks.storage_backends import Blob, StorageUnavailable, content_type_of, write_private

MISSING = {"404", "NoSuchKey", "NotFound"}
DELETE_BATCH = 1000  # DeleteObjects takes at most this many keys per request


def _missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in MISSING


@contextlib.contextmanager
def _reaching(endpoint: str) -> Iterator[None]:
    """Network failures and the server's 5xx (after botocore's own retries) as
    ``StorageUnavailable``; a refusal (403, no such bucket) stays the ``ClientError`` it is."""
    try:
        yield
    except BotoCoreError as exc:
        raise StorageUnavailable(f"S3 storage at {endpoint} is unreachable: {exc}") from exc
    except ClientError as exc:
        if int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) >= 500:
            raise StorageUnavailable(f"S3 storage at {endpoint} failed: {exc}") from exc
        raise


class S3Backend:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.bucket = settings.s3_bucket
        self.prefix = f"{settings.s3_prefix}/" if settings.s3_prefix else ""
        self._client: Any = None
        self._lock = threading.Lock()
        self.endpoint = settings.s3_endpoint_url or "AWS"

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        settings = self.settings
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"},
            retries={"max_attempts": 3, "mode": "standard"},  # then StorageUnavailable (503)
            connect_timeout=5,
            read_timeout=60,
            # The API serves /files from many threads at once.
            max_pool_connections=32,
        )
        # A session of our own: boto3's default session is shared process-wide and not thread-safe.
        session = boto3.session.Session()
        return session.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url or None,
            region_name=settings.s3_region or None,
            aws_access_key_id=settings.s3_access_key_id or None,
            aws_secret_access_key=settings.s3_secret_access_key or None,
            config=config,
        )

    def _key(self, key: str) -> str:
        return self.prefix + key

    def local_path(self, key: str) -> Path | None:
        return None

    def put(self, key: str, data: bytes) -> None:
        with _reaching(self.endpoint):
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type_of(key)
            )

    def _get_object(self, key: str) -> dict[str, Any] | None:
        try:
            with _reaching(self.endpoint):
                answer: dict[str, Any] = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        return answer

    def get(self, key: str) -> bytes | None:
        answer = self._get_object(key)
        if answer is None:
            return None
        with _reaching(self.endpoint), answer["Body"] as body:
            data: bytes = body.read()
        return data

    def open(self, key: str) -> Blob | None:
        answer = self._get_object(key)
        if answer is None:
            return None
        return Blob(
            size=int(answer["ContentLength"]),
            etag=str(answer.get("ETag") or "").strip('"') or None,
            last_modified=answer.get("LastModified"),
            stream=answer["Body"],
        )

    def exists(self, key: str) -> bool:
        try:
            with _reaching(self.endpoint):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _missing(exc):
                return False
            raise
        return True

    def delete(self, keys: Iterable[str]) -> None:
        with _reaching(self.endpoint):
            self._delete_keys(self._key(key) for key in keys)

    def delete_prefix(self, prefix: str) -> None:
        with _reaching(self.endpoint):
            self._delete_keys(self._listed(self._key(prefix)))

    def _listed(self, prefix: str) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in pages:
            for item in page.get("Contents", ()):
                yield item["Key"]

    def _delete_keys(self, keys: Iterable[str]) -> None:
        batch: list[str] = []
        for key in keys:
            batch.append(key)
            if len(batch) == DELETE_BATCH:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, keys: list[str]) -> None:
        # Deleting a missing key is a success in S3, so a second sweep or a retried delete is quiet.
        answer = self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True}
        )
        errors = answer.get("Errors") or []
        if errors:
            first = errors[0]
            raise RuntimeError(
                f"S3 refused to delete {len(errors)} objects of bucket {self.bucket}: "
                f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
            )

    def download(self, key: str, target: Path) -> bool:
        # Engines that read a file themselves (a video input) get a local copy, in memory on the way
        # at most once: the inputs are capped (AIORCH_MAX_VIDEO_BYTES).
        data = self.get(key)
        if data is None:
            return False
        write_private(target, data)
        return True

    def ping(self) -> None:
        with _reaching(self.endpoint):
            self.client.head_bucket(Bucket=self.bucket)
