"""kombu's filesystem transport with atomic message files and message priority.

kombu 5.7's ``Channel._put`` creates the message file, then locks it, then writes: a consumer in
another process can move the file away while it is still empty and crash on ``json.loads("")``
(kombu issue #1551), killing the worker and losing the message. Here a message is written to a
hidden temporary name (one ``_get`` never matches) and renamed into place, so a consumer only ever
sees complete files.

kombu's ``_get`` takes the first message of a queue in the sorted listing of the folder, and its
own names start with the publish time, so it ignores priority. Here a name starts with the
priority, inverted (``9 - priority``: 0 for the highest), then the publish time in microseconds,
zero-padded: the listing's order is higher priority first, FIFO within a priority, as RabbitMQ
delivers from a queue with ``x-max-priority`` (tasks/celery_app.py). A message a worker hands back
(``_restore``) is put again with its priority. Files named by an older version (the publish time
first) are still taken, only not in priority order.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import Iterator
from time import monotonic_ns
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

ALIAS = "aiorchfs"


def message_name(queue: str, priority: int) -> str:
    """A message file's name: sorted by name, higher priority first, then oldest first. The clock
    is the system's monotonic one, shared by every process on the machine (the folder is local);
    16 digits of microseconds hold some 300 years of uptime, so the names keep one width."""
    # No dot before ".<queue>.msg": kombu finds a queue's messages by what follows the first dot.
    return f"{9 - priority}_{monotonic_ns() // 1000:016d}_{uuid.uuid4()}.{queue}.msg"


class Channel(filesystem.Channel):
    def _queue_bind(self, exchange: str, routing_key: Any, pattern: Any, queue: Any) -> Any:
        # kombu creates a missing exchange table by opening it "wb" and only then locking it: a
        # second process binding at that moment opens the empty file, locks it first and fails on
        # json.loads(""). The whole bind, creation included, runs under one lock file here.
        with self._tables_locked():
            return super()._queue_bind(exchange, routing_key, pattern, queue)

    def get_table(self, exchange: str) -> Any:
        with self._tables_locked():  # never the empty file of a table being created
            return super().get_table(exchange)

    @contextlib.contextmanager
    def _tables_locked(self) -> Iterator[None]:
        self.control_folder.mkdir(exist_ok=True)
        with open(self.control_folder / ".tables.lock", "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)

    # kombu's own filesystem.Channel._put names its second parameter "payload" where the
    # virtual AbstractChannel it extends says "message"; no name satisfies both, so this keeps
    # the one of the class it overrides.
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = message_name(queue, self._get_message_priority(payload))
        final = os.path.join(self.data_folder_out, name)
        # A leading dot and no ".<queue>.msg" suffix: _get, _size and _purge all skip it.
        temporary = os.path.join(self.data_folder_out, f".tmp-{uuid.uuid4().hex}")
        try:
            with open(temporary, "wb", buffering=0) as handle:
                handle.write(str_to_bytes(dumps(payload)))
            os.replace(temporary, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel


TRANSPORT_ALIASES.setdefault(ALIAS, "tasks.fs_transport:Transport")
