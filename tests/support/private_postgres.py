"""A Postgres cluster of a test's own (``initdb`` in a temp dir, its own port, loopback only), for
tests that stop and start the database: never the machine's shared server, which the rest of the
run and CI use as this session leaves it.

The server refuses to run as root, so where the tests run as root the cluster belongs to the
``postgres`` user (``runuser``). Where no Postgres binaries are found, the tests using it skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.platform import free_port


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class PrivatePostgres:
    bindir: Path
    data: Path
    port: int
    as_user: list[str]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        argv = [*self.as_user, str(self.bindir / tool), *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            log = (self.data / "server.log").read_text() if (self.data / "server.log").exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {done.stderr}\n{log[-2000:]}")

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data} -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.data / "server.log"), "-w", "start"
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    bindir = _bindir()
    if bindir is None:
        pytest.skip("no Postgres server binaries (initdb) on this machine")
    root = Path(tempfile.mkdtemp(prefix="aiorch-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser: cannot start a private Postgres")
        shutil.chown(root, "postgres", "postgres")
        as_user = [runuser, "-u", "postgres", "--"]
    cluster = PrivatePostgres(bindir, root / "data", free_port(), as_user)
    try:
        cluster._run("initdb", "-D", str(cluster.data), "-A", "trust", "-U", "postgres", "--no-sync")
        cluster.start()
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
