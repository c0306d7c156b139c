"""The multi-host fixtures: a RabbitMQ node of the module's own with a short AMQP heartbeat (so a
host that is cut off is noticed in seconds, not the minute or two of RabbitMQ's default), the API
in the machine's namespace, and two worker hosts in network namespaces of their own
(``tests/support/hosts.py``). Skipped, with the reason, where namespaces cannot be made."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from config import Settings
from tests.support.hosts import Hosts, namespaces_unavailable, worker_hosts
from tests.support.platform import Platform
from tests.support.platform_fixtures import platform_settings
from tests.support.private_rabbitmq import PrivateRabbit, private_rabbitmq
from tests.support.services import purge_queues

HEARTBEAT = 5  # seconds: the node's AMQP heartbeat timeout (RabbitMQ's default is 60)
SLOTS = 2  # GPU-queue pool processes per host


@pytest.fixture(scope="package")
def node() -> Iterator[PrivateRabbit]:
    reason = namespaces_unavailable()
    if reason is not None:
        pytest.skip(f"no worker hosts here: {reason}")
    with private_rabbitmq(f"heartbeat = {HEARTBEAT}\n") as rabbit:
        yield rabbit


@pytest.fixture(scope="package")
def platform(
    base_settings: Settings, node: PrivateRabbit, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    """The API (and beat) in the machine's namespace; no workers of its own."""
    tmp = tmp_path_factory.mktemp("scale")
    plat = Platform(platform_settings(base_settings, tmp, broker_url=node.url), tmp / "logs")
    purge_queues(plat.settings.broker_url)
    try:
        plat.start_api()
        plat.start_beat()  # the periodic sweeps, in the machine's namespace as the API
        yield plat
    finally:
        plat.stop()


@pytest.fixture(scope="package")
def hosts(platform: Platform) -> Iterator[Hosts]:
    with worker_hosts(platform, 2, slots=SLOTS) as made:
        yield made
