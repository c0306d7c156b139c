"""Worker hosts of their own on one machine: a Linux network namespace each, joined to the machine
by a veth link, with a private view of the filesystem, running its own ``aiorch`` worker processes.

What a host is here:

- **its network**: namespace ``aiorch-<run>-h<i>`` (``<run>`` new for each ``Hosts``), one veth
  pair (``ao<run>o<i>`` outside, ``ao<run>i<i>`` inside) on a /30 of a 10.231.X.0/24 no other
  interface of this machine uses; loopback up, no default route. The database and the broker
  (which listen on 127.0.0.1 only, and are left exactly as they are) are reached through
  ``tests/support/forwarder.py``, one process per host in the machine's namespace, listening only
  on that host's link address; so is an S3-compatible server on loopback when the platform's
  storage is a bucket (``AIORCH_S3_ENDPOINT_URL``), and any loopback port a test names
  (``forward``: an input image server). So every byte a host's workers exchange with Postgres,
  RabbitMQ and the bucket crosses its link, and ``link_down`` really cuts it off.
- **its disk**: a holder process in that namespace and a mount namespace of its own, where a tmpfs
  covers the platform's storage folder; every worker of the host is started inside both
  (``nsenter``), so its cpu and GPU workers share a folder that neither the API nor another host
  can see, and an output or input handed across hosts through the local disk fails instead of
  passing silently. Its ``AIORCH_VAR_DIR`` is a folder of its own.
- **its processes**: Celery workers named ``<role>@aiorch-<run>-h<i>``, started through
  ``Platform.start_worker`` (their logs beside the platform's), whose ids the harness keeps:
  teardown kills those, the holders and the forwarders, by id, then deletes the links and
  namespaces it made, also after a failure.

The API and beat stay in the machine's namespace. ``namespaces_unavailable()`` says why hosts
cannot be made here (not root, a tool missing, ``ip netns add`` refused), and the tests skip with it.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.support.platform import ROOT, Platform

RUN = uuid.uuid4().hex[:6]
TOOLS = ("ip", "nsenter", "unshare", "mount")
UNSHARE = ("unshare", "--mount", "--propagation", "private", "--")
# A host's disk: a tmpfs over the storage folder, seen only inside its mount namespace.
MOUNT = 'mount -t tmpfs -o size=256m,mode=0755 aiorch-host "$1" && echo mounted && exec sleep infinity'


def _ip(*args: str, namespace: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(("netns", "exec", namespace, "ip") if namespace else ()), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done


@functools.cache
def namespaces_unavailable() -> str | None:
    """Why worker hosts cannot be made on this machine, or None when they can (probed once: a
    namespace and a veth pair made and deleted)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces and veth links need root (run the scale tests as root)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (iproute2 / util-linux)"
    probe = f"aiorch-{RUN}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` refused: {made.stderr.strip()}"
    try:
        pair = ("link", "add", f"ao{RUN}p", "type", "veth", "peer", "name", f"ao{RUN}q", "netns", probe)
        veth = _ip(*pair, check=False)
        if veth.returncode != 0:
            return f"`ip link add type veth` refused: {veth.stderr.strip()}"
        _ip("link", "del", f"ao{RUN}p", check=False)
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.231.X.0/24 that no interface of this machine has an address in (another run's)."""
    used = _ip("-4", "-o", "addr", "show").stdout
    candidates = [x for x in range(1, 255) if f" 10.231.{x}." not in used]
    if not candidates:
        raise RuntimeError("every 10.231.X.0/24 is in use")
    return ipaddress.IPv4Network(f"10.231.{random.choice(candidates)}.0/24")


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The first line ``proc`` prints, waited for at most ``timeout`` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().decode(errors="replace").strip() if ready else ""


def _end(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGKILL) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@dataclass
class Host:
    index: int
    namespace: str
    outside: str  # the veth end in the machine's namespace (the one ``link_down`` takes down)
    inside: str
    gateway: str  # outside address: its forwarder listens here
    address: str
    var_dir: Path
    holder: subprocess.Popen[bytes] | None = None
    forwarder: subprocess.Popen[bytes] | None = None
    workers: list[str] = field(default_factory=list)  # their names in ``Platform.procs``

    @property
    def enter(self) -> list[str]:
        """The command prefix that runs a program on this host (its network and its disk)."""
        assert self.holder is not None
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n", "--"]

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """A short command on this host (a probe: ``cat`` a file, ``ip addr``)."""
        return subprocess.run([*self.enter, *argv], capture_output=True, text=True, timeout=30, check=False)


def through(url: str, gateway: str) -> str:
    """``url`` with its loopback host replaced by ``gateway`` (same port, path and credentials)."""
    parts = urlsplit(url)
    netloc = parts.netloc.replace(f"@{parts.hostname}", f"@{gateway}", 1)
    if "@" not in parts.netloc:
        netloc = parts.netloc.replace(parts.hostname or "", gateway, 1)
    return urlunsplit(parts._replace(netloc=netloc))


class Hosts:
    """Worker hosts for one ``Platform`` (its API and beat stay in the machine's namespace).

    ``add()`` makes one more host; ``start(host)`` runs its workers; ``link_down``/``link_up`` cut
    and restore its link; ``kill(host)`` SIGKILLs its workers; ``close()`` (or leaving the ``with``)
    tears everything down, whatever happened before. ``forward``: more loopback ports each host
    reaches on its gateway address (the same port), besides the database, the broker and the bucket.
    """

    def __init__(
        self,
        platform: Platform,
        gpu_queues: str = "gpu.diffusion,gpu.superres",
        slots: int = 2,
        forward: Sequence[int] = (),
    ):
        reason = namespaces_unavailable()
        if reason is not None:
            raise RuntimeError(f"cannot make worker hosts: {reason}")
        self.platform = platform
        self.gpu_queues = gpu_queues
        self.slots = slots
        self.run = uuid.uuid4().hex[:6]  # names of its own: two harnesses in one process do not clash
        self.subnet = _free_subnet()
        self.hosts: list[Host] = []
        self.services = [*self._services(), *(("127.0.0.1", port) for port in forward)]

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _urls(self) -> list[str]:
        """The URLs of the loopback services the workers need: the database, the broker and, when
        storage is an S3-compatible bucket at an endpoint of its own, that endpoint."""
        settings = self.platform.settings
        urls = [settings.database_url, settings.broker_url]
        if settings.storage_url and settings.s3_endpoint_url:
            urls.append(settings.s3_endpoint_url)
        return urls

    def _services(self) -> list[tuple[str, int]]:
        """The loopback (host, port) pairs behind ``_urls``."""
        found = []
        for url in self._urls():
            parts = urlsplit(url)
            if parts.hostname not in ("127.0.0.1", "localhost"):
                raise RuntimeError(f"worker hosts reach loopback services only, not {url.split('@')[-1]}")
            default = {"http": 80, "https": 443}.get(parts.scheme, 5672)
            default = 5432 if parts.scheme.startswith("postgres") else default
            found.append(("127.0.0.1", parts.port or default))
        return found

    # -- making and removing hosts ---------------------------------------------------------------
    def add(self) -> Host:
        """One more host, its link up and its forwarder listening; no workers yet (``start``)."""
        index = len(self.hosts) + 1
        block = list(self.subnet.hosts())[4 * (index - 1) : 4 * (index - 1) + 2]  # a /30 each
        host = Host(
            index=index,
            namespace=f"aiorch-{self.run}-h{index}",
            outside=f"ao{self.run}o{index}",
            inside=f"ao{self.run}i{index}",
            gateway=str(block[0]),
            address=str(block[1]),
            var_dir=self.platform.logs.parent / "hosts" / f"h{index}",
        )
        self.hosts.append(host)  # before anything exists, so close() removes what got made
        _ip("netns", "add", host.namespace)
        _ip("link", "add", host.outside, "type", "veth", "peer", "name", host.inside, "netns", host.namespace)
        _ip("addr", "add", f"{host.gateway}/30", "dev", host.outside)
        _ip("link", "set", host.outside, "up")
        _ip("addr", "add", f"{host.address}/30", "dev", host.inside, namespace=host.namespace)
        _ip("link", "set", host.inside, "up", namespace=host.namespace)
        _ip("link", "set", "lo", "up", namespace=host.namespace)
        host.var_dir.mkdir(parents=True, exist_ok=True)
        storage = self.platform.settings.storage_dir
        storage.mkdir(parents=True, exist_ok=True)
        # The holder keeps the host's mount namespace (a tmpfs over the storage folder) alive;
        # every process of the host enters it. exec all the way down: its pid is the sleep's.
        host.holder = subprocess.Popen(
            [*("ip", "netns", "exec", host.namespace), *UNSHARE, "sh", "-c", MOUNT, "sh", str(storage)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if _read_line(host.holder, 15) != "mounted":
            raise RuntimeError(f"host {host.namespace}: private storage not mounted")
        routes = [f"{host.gateway}:{port}={target}:{port}" for target, port in self.services]
        host.forwarder = subprocess.Popen(
            [sys.executable, "-m", "tests.support.forwarder", *routes],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if _read_line(host.forwarder, 15) != "ready":
            raise RuntimeError(f"host {host.namespace}: forwarder did not start")
        return host

    def close(self) -> None:
        """Every worker, holder and forwarder this harness started (by pid), then its links and
        namespaces; errors on the way are passed over so the rest is removed too."""
        for host in reversed(self.hosts):
            with contextlib.suppress(Exception):
                self.kill(host)
            _end(host.holder)
            _end(host.forwarder, signal.SIGTERM)
            _ip("link", "del", host.outside, check=False)  # deletes its peer with it
            _ip("netns", "del", host.namespace, check=False)
        self.hosts.clear()

    # -- a host's workers --------------------------------------------------------------------------
    def env(self, host: Host) -> dict[str, str]:
        settings = self.platform.settings
        env = {
            "AIORCH_DATABASE_URL": through(settings.database_url, host.gateway),
            "AIORCH_BROKER_URL": through(settings.broker_url, host.gateway),
            "AIORCH_VAR_DIR": str(host.var_dir),
        }
        if settings.storage_url and settings.s3_endpoint_url:
            env["AIORCH_S3_ENDPOINT_URL"] = through(settings.s3_endpoint_url, host.gateway)
        return env

    def start(self, host: Host, cpu: bool = True, gpu: bool = True) -> None:
        """The host's GPU-queues worker (``slots`` processes) with ``gpu``, its cpu worker with ``cpu``."""
        roles = ([("gpu", self.gpu_queues, self.slots)] if gpu else []) + ([("cpu", "cpu", 1)] if cpu else [])
        for role, queues, concurrency in roles:
            name = f"h{host.index}-{role}"
            self.platform.start_worker(
                name,
                queues,
                concurrency,
                env=self.env(host),
                node=f"{role}@{host.namespace}",
                wrap=host.enter,
            )
            if name not in host.workers:
                host.workers.append(name)

    def kill(self, host: Host) -> None:
        """SIGKILL the host's workers and their pool processes (a power cut, as far as they go)."""
        for name in host.workers:
            self.platform.kill(name)

    def link_down(self, host: Host) -> None:
        _ip("link", "set", host.outside, "down")

    def link_up(self, host: Host) -> None:
        _ip("link", "set", host.outside, "up")


@contextlib.contextmanager
def worker_hosts(platform: Platform, count: int, **options: object) -> Iterator[Hosts]:
    """``count`` hosts with their workers running, torn down on exit."""
    with Hosts(platform, **options) as hosts:  # type: ignore[arg-type]
        for _ in range(count):
            hosts.start(hosts.add())
        yield hosts
