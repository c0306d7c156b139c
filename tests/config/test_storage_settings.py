"""``AIORCH_STORAGE_URL`` and the S3 variables: read and checked at start-up, with the variable named
in every error."""

from __future__ import annotations

import pytest

from config import Settings
from config.settings import SettingsError

BUCKET = {"AIORCH_STORAGE_URL": "s3://bucket"}


def test_local_storage_is_the_default() -> None:
    settings = Settings.from_env({})
    assert settings.storage_url == "" and settings.s3_bucket == ""


def test_an_s3_url_gives_the_bucket_prefix_endpoint_and_credentials() -> None:
    settings = Settings.from_env(
        {
            "AIORCH_STORAGE_URL": "s3://aiorch-data/prod/outputs/",
            "AIORCH_S3_ENDPOINT_URL": "http://minio.internal:9000/",
            "AIORCH_S3_REGION": "eu-west-1",
            "AIORCH_S3_ACCESS_KEY_ID": "AKIA-example",
            "AIORCH_S3_SECRET_ACCESS_KEY": "s3cr3t",
        }
    )
    assert settings.storage_url == "s3://aiorch-data/prod/outputs"
    assert (settings.s3_bucket, settings.s3_prefix) == ("aiorch-data", "prod/outputs")
    assert settings.s3_endpoint_url == "http://minio.internal:9000"
    assert (settings.s3_region, settings.s3_access_key_id) == ("eu-west-1", "AKIA-example")
    assert "s3cr3t" not in repr(settings) and "AKIA-example" not in repr(settings)


def test_a_bucket_alone_uses_the_default_endpoint_and_boto3s_own_credentials() -> None:
    settings = Settings.from_env({"AIORCH_STORAGE_URL": "s3://aiorch-data"})
    assert (settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint_url) == ("aiorch-data", "", "")
    assert settings.s3_access_key_id == settings.s3_secret_access_key == ""


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"AIORCH_STORAGE_URL": "https://bucket/prefix"}, "AIORCH_STORAGE_URL"),
        ({"AIORCH_STORAGE_URL": "s3://Bad_Bucket/x"}, "AIORCH_STORAGE_URL"),
        ({"AIORCH_STORAGE_URL": "s3://key:secret@bucket/x"}, "AIORCH_STORAGE_URL"),
        ({"AIORCH_STORAGE_URL": "s3://bucket/a/../b"}, "AIORCH_STORAGE_URL"),
        (
            {"AIORCH_STORAGE_URL": "s3://bucket", "AIORCH_S3_ENDPOINT_URL": "minio:9000"},
            "AIORCH_S3_ENDPOINT_URL",
        ),
        (
            {"AIORCH_STORAGE_URL": "s3://bucket", "AIORCH_S3_ACCESS_KEY_ID": "k"},
            "AIORCH_S3_SECRET_ACCESS_KEY",
        ),
        (
            {"AIORCH_STORAGE_URL": "s3://bucket", "AIORCH_S3_SECRET_ACCESS_KEY": "s"},
            "AIORCH_S3_ACCESS_KEY_ID",
        ),
        # S3 settings without a bucket: the operator meant shared storage, and would get a local one.
        ({"AIORCH_S3_ENDPOINT_URL": "http://minio:9000"}, "AIORCH_STORAGE_URL"),
    ],
)
def test_a_bad_storage_setting_stops_start_up_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)
