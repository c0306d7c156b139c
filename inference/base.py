"""The contract between engines and the task adapters that call them.

Engines are pure: they take decoded inputs (PIL images, numbers, strings), a ``RunControl``
for progress and cancellation, and return an ``EngineResult``. They never touch the database,
the broker or the network; the task adapter in ``tasks/`` does the loading, storing and
status changes around them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image


class EngineError(Exception):
    """An engine failed on this one input; the job fails, the worker carries on."""

    code = "engine_error"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.field = field


class InvalidInput(EngineError):
    """The input is unusable for this engine (a ``failed`` job naming the field)."""

    code = "invalid_input"


class ContentRejected(EngineError):
    """A safety check refused the content: the job ends ``rejected``."""

    code = "content_rejected"


class Cancelled(Exception):
    """Raised by ``RunControl.check()`` when the job was cancelled while running."""


class RunControl(Protocol):
    """What an engine may call while it runs."""

    def progress(self, percent: float, detail: dict[str, Any] | None = None) -> None:
        """Report progress 0-100, and what the run can say beside it (a training's step and loss);
        callers throttle, so engines may call it every step."""

    def should_stop(self) -> bool:
        """True once the job was cancelled; the engine should stop at its next safe point."""


class NullControl:
    """A ``RunControl`` for direct calls and tests: no progress sink, never stops."""

    def progress(self, percent: float, detail: dict[str, Any] | None = None) -> None:
        pass

    def should_stop(self) -> bool:
        return False


def check_stop(control: RunControl) -> None:
    """Raise ``Cancelled`` when the job was cancelled."""
    if control.should_stop():
        raise Cancelled()


@dataclass
class OutputImage:
    """One image an engine produced, with the facts to store beside it (seed, size, ...)."""

    image: Image.Image
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputFile:
    """A non-image output (a video) the engine wrote to ``path``; the task layer stores it under
    a name of its own and deletes ``path``."""

    path: Path
    ext: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineResult:
    """What an engine returns: images, files, JSON data, or a mix, and which backend ran."""

    backend: str
    images: list[OutputImage] = field(default_factory=list)
    data: dict[str, Any] | None = None
    files: list[OutputFile] = field(default_factory=list)
