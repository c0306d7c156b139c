"""``JsonErrorWorker``'s linger on a kept-alive connection (``app.gunicorn_json``): a request thread
that just answered waits briefly for the same client's next request. It must work for any
descriptor: an API holding a thousand streams gives its new connections descriptors past 1024,
where ``select`` refuses to look (and every request then took gthread's longer way round)."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from app.gunicorn_json import KEEPALIVE_LINGER, JsonErrorWorker

HIGH_FD = 1500


@pytest.fixture
def high_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair whose server end has a descriptor past 1024."""
    server, client = socket.socketpair()
    high = socket.socket(fileno=os.dup2(server.fileno(), HIGH_FD))
    server.close()
    yield high, client
    high.close()
    client.close()


def connection(sock: socket.socket) -> SimpleNamespace:
    return SimpleNamespace(
        is_http2=False, sock=sock, parser=SimpleNamespace(unreader=SimpleNamespace(buf=io.BytesIO()))
    )


def worker(pool_idle: bool = True) -> SimpleNamespace:
    return SimpleNamespace(_pool_idle=lambda: pool_idle)


def test_the_next_request_on_a_high_descriptor_is_served_by_the_same_thread(
    high_pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = high_pair
    assert server.fileno() > 1024
    threading.Timer(KEEPALIVE_LINGER / 4, lambda: client.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")).start()
    assert JsonErrorWorker._next_request_here(worker(), connection(server)) is True


def test_a_quiet_client_or_a_waiting_connection_sends_it_back_to_gthread(
    high_pair: tuple[socket.socket, socket.socket],
) -> None:
    server, _client = high_pair
    began = time.monotonic()
    assert JsonErrorWorker._next_request_here(worker(), connection(server)) is False
    assert time.monotonic() - began >= KEEPALIVE_LINGER * 0.9  # it waited its linger, then gave up
    assert JsonErrorWorker._next_request_here(worker(pool_idle=False), connection(server)) is False
