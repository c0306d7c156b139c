"""The ``providers`` block of a routes file for the provider fakes a test runs, as an operator
would write it for the real services."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tests.fakes.aiorch_upstream_fake import UpstreamFake
from tests.fakes.sensetime_fake import SenseTimeFake
from tests.fakes.volcengine_fake import VolcengineFake
from tests.fakes.zhinian_fake import ZhinianFake


def providers(fakes: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """One provider per running fake, under the fake's name, with the one credential it accepts.

    The credentials are read off the fake, so a module names its keys once, where it builds the
    fake. A Zhinian fake built with a webhook secret gets it too (then its webhook can finish jobs).
    """
    return {name: _provider(fake) for name, fake in fakes.items()}


def _provider(fake: Any) -> dict[str, Any]:
    if isinstance(fake, SenseTimeFake | VolcengineFake):
        [(access_key, secret_key)] = fake.keys.items()
        kind = "sensetime" if isinstance(fake, SenseTimeFake) else "volcengine"
        return {"kind": kind, "base_url": fake.url, "access_key": access_key, "secret_key": secret_key}
    if isinstance(fake, ZhinianFake):
        [api_key] = fake.api_keys.values()  # client id -> key
        entry = {"kind": "zhinian", "base_url": fake.url, "api_key": api_key}
        if fake.webhook_secret is not None:
            entry["webhook_secret"] = fake.webhook_secret
        return entry
    if isinstance(fake, UpstreamFake):
        [api_key] = fake.api_keys  # key -> client id
        return {"kind": "upstream", "base_url": fake.url, "api_key": api_key}
    raise TypeError(f"no provider kind for {type(fake).__name__}")
