"""A RabbitMQ node of a test's own (its own name, port, data and cookie in a temp dir, loopback
only), for tests that stop and start the broker: never the machine's shared node, which the rest
of the run and CI use as this session leaves it.

``stop_app``/``start_app`` restart the broker application inside the node, as a broker restart
looks to its clients (connections dropped, durable queues and persistent messages recovered from
disk) in about a second instead of a whole VM start. Where ``rabbitmq-server`` is missing, or the
tests run as root without a ``rabbitmq`` user to run it as, the tests using it skip.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.platform import free_port


@dataclass
class PrivateRabbit:
    root: Path
    port: int
    as_user: list[str]
    name: str = field(default_factory=lambda: f"aiorch{os.getpid()}@localhost")
    server: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.root),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(free_port()),
            RABBITMQ_MNESIA_BASE=str(self.root / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.root / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(self.root / "rabbitmq"),
            RABBITMQ_PID_FILE=str(self.root / "pid"),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def ctl(self, *args: str, timeout: float = 90) -> None:
        cookie = (self.root / ".erlang.cookie").read_text().strip()
        argv = [*self.as_user, "rabbitmqctl", "--erlang-cookie", cookie, "-n", self.name, *args]
        done = subprocess.run(
            argv, env=self._env(), capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stdout}{done.stderr}")

    def start_node(self) -> None:
        log = open(self.root / "server.out", "ab")  # noqa: SIM115 (the process owns it)
        argv = [*self.as_user, "rabbitmq-server"]
        self.server = subprocess.Popen(argv, env=self._env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not (self.root / ".erlang.cookie").exists():
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "rabbitmq-server did not start: " + (self.root / "server.out").read_text()[-2000:]
                )
            time.sleep(0.1)
        self.ctl("await_startup", "--timeout", "60")

    def stop(self) -> None:
        """The broker down: every connection dropped, the port closed."""
        self.ctl("stop_app")

    def start(self) -> None:
        self.ctl("start_app")

    def halt(self) -> None:
        with contextlib.suppress(Exception):
            self.ctl("stop", timeout=30)
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.wait(timeout=30)
            if self.server.poll() is None:
                self.server.kill()


@contextlib.contextmanager
def private_rabbitmq(config: str = "") -> Iterator[PrivateRabbit]:
    """A node of its own; ``config`` adds lines to its ``rabbitmq.conf`` (e.g. ``heartbeat = 5``)."""
    if shutil.which("rabbitmq-server") is None or shutil.which("rabbitmqctl") is None:
        pytest.skip("no rabbitmq-server on this machine")
    root = Path(tempfile.mkdtemp(prefix="aiorch-rmq-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("rabbitmq")
        except KeyError:
            pytest.skip("running as root without a rabbitmq user: cannot start a private node")
        as_user = ["runuser", "-p", "-u", "rabbitmq", "--"]  # -p: HOME stays the node's folder
    (root / "enabled_plugins").write_text("[].\n")
    (root / "rabbitmq.conf").write_text("loopback_users = none\n" + config)
    if as_user:
        for path in (root, root / "enabled_plugins", root / "rabbitmq.conf"):
            shutil.chown(path, "rabbitmq", "rabbitmq")
    node = PrivateRabbit(root, free_port(), as_user)
    try:
        node.start_node()
        yield node
    finally:
        node.halt()
        shutil.rmtree(root, ignore_errors=True)
