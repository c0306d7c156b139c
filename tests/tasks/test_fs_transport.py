"""The embedded broker: producers and consumers in separate processes never see half a message."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from kombu import Connection

from config import Settings
from tasks.celery_app import broker_options

COUNT = 400


def _options(folder: Path) -> tuple[str, dict]:
    return broker_options(Settings(var_dir=folder, broker_url="filesystem://", broker_poll_interval=0.01))


def _produce(folder: str, tag: str) -> None:
    url, options = _options(Path(folder))
    with Connection(url, transport_options=options) as conn:
        queue = conn.SimpleQueue("race")
        for i in range(COUNT):
            queue.put({"tag": tag, "i": i, "pad": "x" * 2000})
        queue.close()


def _consume(folder: str, out: multiprocessing.Queue) -> None:
    url, options = _options(Path(folder))
    seen = 0
    with Connection(url, transport_options=options) as conn:
        queue = conn.SimpleQueue("race")
        try:
            while True:
                message = queue.get(timeout=3)
                message.ack()
                seen += 1
        except queue.Empty:
            pass
        finally:
            queue.close()
    out.put(seen)


def test_concurrent_producers_and_consumers_lose_and_break_nothing(tmp_path: Path) -> None:
    url, _ = _options(tmp_path)
    assert url == "aiorchfs://localhost//"
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    consumers = [ctx.Process(target=_consume, args=(str(tmp_path), results)) for _ in range(2)]
    producers = [ctx.Process(target=_produce, args=(str(tmp_path), tag)) for tag in "ab"]
    for proc in consumers + producers:
        proc.start()
    for proc in producers + consumers:
        proc.join(timeout=90)
        assert proc.exitcode == 0  # a consumer that read an empty file would have died
    assert sum(results.get(timeout=5) for _ in consumers) == 2 * COUNT
    assert not [p for p in (tmp_path / "broker" / "queue").iterdir() if p.name.startswith(".tmp-")]


def test_messages_are_consumed_higher_priority_first_and_in_order_within_a_priority(tmp_path: Path) -> None:
    url, options = _options(tmp_path)
    sent = [(0, "a"), (0, "b"), (5, "c"), (0, "d"), (9, "e"), (5, "f"), (9, "g"), (12, "h")]
    with Connection(url, transport_options=options) as conn:
        queue = conn.SimpleQueue("prio")
        for priority, tag in sent:
            queue.put({"tag": tag}, priority=priority)
        received = []
        for _ in sent:
            message = queue.get(timeout=3)
            message.ack()
            received.append(message.payload["tag"])
        queue.close()
    # 9 first (12 is out of range and counts as 9, as on RabbitMQ), then 5, then 0; FIFO inside each.
    assert received == ["e", "g", "h", "c", "f", "a", "b", "d"]


def test_a_message_handed_back_keeps_its_priority(tmp_path: Path) -> None:
    url, options = _options(tmp_path)
    with Connection(url, transport_options=options) as conn:
        queue = conn.SimpleQueue("back")
        queue.put({"tag": "high"}, priority=9)
        queue.put({"tag": "low"}, priority=0)
        taken = queue.get(timeout=3)
        assert taken.payload["tag"] == "high"
        taken.requeue()  # as a worker that stops hands its unacked message back
        again = [queue.get(timeout=3) for _ in range(2)]
        for message in again:
            message.ack()
        queue.close()
    assert [m.payload["tag"] for m in again] == ["high", "low"]
