"""The workers' Celery events as Flower receives them: a receiver on its own thread, bound before the
caller goes on (the first event, a heartbeat the wakeup asks for, proves it), stopped on exit."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from celery import Celery


@contextlib.contextmanager
def worker_events(app: Celery, handle: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """Call ``handle`` with every event the workers of ``app``'s broker send, while inside."""
    listening = threading.Event()
    receivers: list[Any] = []

    def on_event(event: dict[str, Any]) -> None:
        listening.set()  # any event (the heartbeats the wakeup asks for) proves the binding is up
        handle(event)

    def capture() -> None:
        with app.connection_for_read() as connection:
            receivers.append(app.events.Receiver(connection, handlers={"*": on_event}))
            receivers[0].capture(limit=None, timeout=None, wakeup=True)

    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    assert listening.wait(10), "no worker event within 10 s"
    try:
        yield
    finally:
        receivers[0].should_stop = True
        thread.join(5)
