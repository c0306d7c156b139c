"""Settings come only from AIORCH_* variables, through converters that name the bad variable."""

from __future__ import annotations

import pytest

from config import Settings, SettingsError


def test_defaults_are_the_embedded_platform(tmp_path) -> None:
    settings = Settings.from_env({"AIORCH_VAR_DIR": str(tmp_path)})
    assert settings.port == 8000
    assert settings.database_url == f"sqlite:///{tmp_path / 'aiorch.db'}"
    assert settings.broker_url == "filesystem://"
    assert settings.public_url == "http://127.0.0.1:8000"
    assert settings.allow_private_urls is False and settings.webhook_secret is None
    assert settings.storage_dir == tmp_path / "storage"


def test_values_are_parsed() -> None:
    settings = Settings.from_env(
        {
            "AIORCH_PORT": "9001",
            "AIORCH_API_KEYS": "client-a:key-a, client-b:key-b",
            "AIORCH_ALLOW_PRIVATE_URLS": "true",
            "AIORCH_PUBLIC_URL": "https://cdn.example.com/",
            "AIORCH_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "AIORCH_DATABASE_URL": "postgresql://u@h/db",
        }
    )
    assert settings.port == 9001
    assert settings.api_keys == (("client-a", "key-a"), ("client-b", "key-b"))
    assert settings.allow_private_urls is True
    assert settings.public_url == "https://cdn.example.com"
    assert settings.webhook_secret == "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AIORCH_PORT", "eighty"),
        ("AIORCH_PORT", "70000"),
        ("AIORCH_API_KEYS", "nokey"),
        ("AIORCH_ALLOW_PRIVATE_URLS", "maybe"),
        ("AIORCH_MAX_ATTEMPTS", "0"),
        ("AIORCH_SYNC_TIMEOUT", "-1"),
        ("AIORCH_ALLOW_PRIVATE_NETWORKS", "10.1.2.0/24,not-a-network"),
        ("AIORCH_CA_BUNDLE", "/nonexistent/ca.pem"),
        ("AIORCH_ASSET_QUOTA_BYTES", "-5"),
        ("AIORCH_WEBHOOK_SECRET_GRACE", "soon"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_guard_exceptions_and_tenancy_limits_are_parsed(tmp_path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = Settings.from_env(
        {
            "AIORCH_ALLOW_PRIVATE_NETWORKS": " 10.1.2.7/24 , fd00::/8,",
            "AIORCH_CA_BUNDLE": str(bundle),
            "AIORCH_ASSET_QUOTA_BYTES": "1048576",
            "AIORCH_WEBHOOK_SECRET_GRACE": "60",
        }
    )
    # Host bits are dropped: the operator's 10.1.2.7/24 means the network 10.1.2.0/24.
    assert settings.allow_private_networks == ("10.1.2.0/24", "fd00::/8")
    assert settings.ca_bundle == bundle
    assert settings.asset_quota_bytes == 1048576
    assert settings.webhook_secret_grace == 60.0
    defaults = Settings.from_env({})
    assert defaults.allow_private_networks == () and defaults.ca_bundle is None


def test_settings_are_frozen() -> None:
    settings = Settings.from_env({})
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


def test_only_config_reads_the_environment() -> None:
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[2]
    offenders = []
    for package in ("app", "models", "tasks", "inference"):
        for path in (root / package).rglob("*.py"):
            if re.search(r"os\.environ|os\.getenv", path.read_text()):
                offenders.append(str(path.relative_to(root)))
    assert offenders == []


def test_flower_broker_api_is_derived_from_an_amqp_broker_url_and_absent_otherwise() -> None:
    amqp = Settings.from_env({"AIORCH_BROKER_URL": "amqp://user:p%40ss@mq.internal:5672/vh"})
    assert amqp.broker_management_api == "http://user:p%40ss@mq.internal:15672/api/"
    assert Settings.from_env({}).broker_management_api is None  # the embedded filesystem transport
    given = Settings.from_env({"AIORCH_BROKER_URL": "amqp://mq//", "AIORCH_FLOWER_BROKER_API": "http://x/api/"})
    assert given.broker_management_api == "http://x/api/"
