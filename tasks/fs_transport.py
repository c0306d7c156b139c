"""kombu's filesystem transport with atomic message files.

kombu 5.7's ``Channel._put`` creates the message file, then locks it, then writes: a consumer in
another process can move the file away while it is still empty and crash on ``json.loads("")``
(kombu issue #1551), killing the worker and losing the message. Here a message is written to a
hidden temporary name (one ``_get`` never matches) and renamed into place, so a consumer only ever
sees complete files.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

ALIAS = "aiorchfs"


class Channel(filesystem.Channel):
    # kombu's own filesystem.Channel._put names its second parameter "payload" where the
    # virtual AbstractChannel it extends says "message"; no name satisfies both, so this keeps
    # the one of the class it overrides.
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
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
