"""A plain TCP forwarder for the multi-host harness (``tests/support/hosts.py``).

The machine's Postgres and RabbitMQ listen on 127.0.0.1 only, which a network namespace cannot
reach; this process listens on the addresses of the harness's own veth links (never on a public
one) and pipes every connection to the loopback service, byte for byte. It adds no failure
detection of its own: when a host's link goes down, the two halves of its connections stay open
here, and the service finds out the way it would across a real network (RabbitMQ by its AMQP
heartbeat, Postgres when a write fails); a side that closes closes the other.

    python -m tests.support.forwarder 10.231.7.1:5432=127.0.0.1:5432 10.231.7.1:5672=127.0.0.1:5672

prints ``ready`` once every listening socket is bound, then runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        # No half-close: neither AMQP nor the Postgres protocol uses one, and an abort passes a
        # dead peer on at once instead of waiting for a FIN that a cut link never carries.
        writer.transport.abort()


def _handler(target: tuple[str, int]):  # type: ignore[no-untyped-def]
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.transport.abort()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    return handle


async def serve(routes: list[tuple[tuple[str, int], tuple[str, int]]]) -> None:
    servers = [
        await asyncio.start_server(_handler(target), host, port, reuse_address=True)
        for (host, port), target in routes
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str]) -> None:
    routes = []
    for arg in argv:
        listen, _, target = arg.partition("=")
        routes.append((_address(listen), _address(target)))
    asyncio.run(serve(routes))


if __name__ == "__main__":
    main(sys.argv[1:])
