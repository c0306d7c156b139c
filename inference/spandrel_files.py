"""Weight files read through spandrel (the upscalers, the face restorers, LaMa): one way to load
one, with one way to say what is wrong with it.

spandrel reads ``.pth``/``.ckpt``/``.safetensors`` with an allow-listed unpickler and knows each
architecture by its keys. Whatever fails (not a zip, a pickle the allow-list refuses, unknown keys,
wrong shapes) means the same thing to a job: ``invalid_model``, naming the file and what it was
expected to be; a file that is not there is ``model_not_found``.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from inference.base import EngineError

StateFilter = Callable[[dict[str, Any]], dict[str, Any]]
# The optional package that teaches spandrel more architectures (CodeFormer among them): MIT code,
# but CodeFormer's own licence is non-commercial, so it is an extra the operator chooses
# (``pip install 'aiorch[faces-noncommercial]'``), never a dependency.
EXTRA_ARCHES = "spandrel_extra_arches"


def extra_arches_available() -> bool:
    """Whether ``spandrel_extra_arches`` is installed (found, not imported: the API asks too)."""
    return importlib.util.find_spec(EXTRA_ARCHES) is not None


@functools.cache
def install_extra_arches() -> bool:
    """Add ``spandrel_extra_arches``' architectures to spandrel's registry, once per process;
    False when the package is not installed."""
    if not extra_arches_available():
        return False
    import spandrel_extra_arches

    # ignore_duplicates: another library of the process may have installed them already.
    spandrel_extra_arches.install(ignore_duplicates=True)
    return True


def load_descriptor(
    path: Path, *, what: str, archs: Collection[str], masked: bool = False, keep: StateFilter | None = None
) -> Any:
    """The spandrel descriptor of ``path`` on the CPU, which must be one of ``archs``; ``what``
    names the kind of model in errors ("Real-ESRGAN", "face restoration", "LaMa"). ``masked``: an
    inpainting model (image and mask in); otherwise an image model, RGB in and out. ``keep``: the
    part of the state dict to load (a checkpoint that holds more than the network)."""
    # Imported here so that importing an engine's module (a worker's warm-up, the API's catalog)
    # stays cheap.
    from spandrel import ImageModelDescriptor, MaskedImageModelDescriptor, ModelLoader

    if not path.is_file():
        raise EngineError(f"{what} model file not found: {path}", code="model_not_found")
    install_extra_arches()
    loader = ModelLoader("cpu")
    try:
        state = loader.load_state_dict_from_file(path)
        descriptor = loader.load_from_state_dict(keep(state) if keep is not None else state)
    except Exception as exc:
        raise EngineError(
            f"{path.name} is not a readable {what} model file: {type(exc).__name__}: {exc}",
            code="invalid_model",
        ) from exc
    arch_id = descriptor.architecture.id
    kind = MaskedImageModelDescriptor if masked else ImageModelDescriptor
    if not isinstance(descriptor, kind) or arch_id not in archs:
        raise EngineError(
            f"{path.name} holds a {arch_id} model, not {what} ({', '.join(archs)})", code="invalid_model"
        )
    if not masked and (descriptor.input_channels != 3 or descriptor.output_channels != 3):
        raise EngineError(
            f"{path.name} maps {descriptor.input_channels} to {descriptor.output_channels} channels; "
            "only RGB models are supported",
            code="invalid_model",
        )
    return descriptor
