"""The storage settings' converters: ``AIORCH_STORAGE_URL`` and the S3 endpoint, checked at start.

``AIORCH_STORAGE_URL=s3://bucket/prefix`` keeps outputs, uploads and checked inputs in an
S3-compatible bucket (``tasks.storage_s3``) instead of ``AIORCH_STORAGE_DIR``, so API and workers
on different hosts share them. A typo stops the process at start-up with the variable's name.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

# S3's bucket naming rules (3-63 characters: lowercase letters, digits, dots and hyphens, starting
# and ending with a letter or digit); MinIO and Ceph RGW hold buckets to the same rules.
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class StorageSettingsError(ValueError):
    """A storage variable holds a value aiorch cannot use (``Settings.from_env`` re-raises it as a
    ``SettingsError``)."""


def parse_storage_url(name: str, raw: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``; ``("", "")`` when unset."""
    raw = raw.strip()
    if not raw:
        return "", ""
    parts = urlsplit(raw)
    if parts.scheme != "s3":
        raise StorageSettingsError(f"{name} must look like s3://bucket/prefix, got scheme {parts.scheme!r}")
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise StorageSettingsError(
            f"{name} must look like s3://bucket/prefix (no credentials, query or fragment; "
            "set AIORCH_S3_ACCESS_KEY_ID and AIORCH_S3_SECRET_ACCESS_KEY)"
        )
    bucket = parts.netloc
    if not BUCKET_RE.match(bucket) or ".." in bucket:
        raise StorageSettingsError(f"{name}: {bucket!r} is not a valid bucket name")
    prefix = parts.path.strip("/")
    if prefix and any(segment in ("", ".", "..") for segment in prefix.split("/")):
        raise StorageSettingsError(f"{name}: the prefix {prefix!r} has an empty, '.' or '..' segment")
    return bucket, prefix


def check_endpoint(name: str, raw: str) -> str:
    """An S3 endpoint (``http://minio:9000``), or '' for the provider's default (AWS)."""
    raw = raw.strip().rstrip("/")
    if not raw:
        return ""
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StorageSettingsError(f"{name} must be an http(s) URL such as http://minio:9000, got {raw!r}")
    return raw


def check_credentials(id_name: str, key_id: str, secret_name: str, secret: str) -> None:
    """Both or neither: with neither, boto3's own chain (``AWS_*`` variables, an instance role)."""
    if bool(key_id) != bool(secret):
        missing, given = (secret_name, id_name) if key_id else (id_name, secret_name)
        raise StorageSettingsError(f"{missing} must be set together with {given}")


def check_s3_only(storage_url: str, names: dict[str, str]) -> None:
    """S3 variables set without ``AIORCH_STORAGE_URL`` are a mistake worth stopping for: the
    operator meant shared storage and would silently get the local folder."""
    given = sorted(name for name, value in names.items() if value)
    if given and not storage_url:
        raise StorageSettingsError(
            f"{', '.join(given)} set, but AIORCH_STORAGE_URL is not: set it to s3://bucket/prefix "
            "to use S3-compatible storage"
        )
