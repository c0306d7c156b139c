"""The ``debug_sleep`` payload (only with AIORCH_DEBUG_TASKS)."""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, fields, validate

from tasks.outbound import UrlPolicy
from tasks.payloads.base import payload_for


@payload_for("debug_sleep")
class DebugSleepPayload(Schema):
    """The diagnostic task: sleeps, reporting progress, and can kill its own worker process
    (``crash``: ``always``, ``first``), which is how the fault tests exercise redelivery, or raise
    an unexpected exception (``raise``), as an engine bug would."""

    class Meta:
        unknown = RAISE

    seconds = fields.Float(load_default=1.0, validate=validate.Range(min=0.0, max=600.0))
    crash = fields.String(
        load_default="never", validate=validate.OneOf(("never", "always", "first", "raise", "oom", "device"))
    )

    def __init__(
        self,
        *args: Any,
        url_policy: UrlPolicy = UrlPolicy(),
        max_faces: int = 0,
        styles: Any = (),
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
