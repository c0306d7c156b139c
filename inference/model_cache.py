"""A per-process cache of loaded models, bounded by a memory budget.

A worker loads a model once and keeps it warm for the next job. The budget (bytes of GPU memory
on CUDA, of RAM on CPU) caps what the cached weights may hold: before a model that would not fit
is loaded, the least recently used models are evicted, so the sum of the cached sizes never goes
over the budget. The budget covers weights only; the operator leaves headroom beside it for
activations (a 1024x1024 SDXL step needs a few GB of its own).

Sizes are estimated before loading (from the checkpoint) and measured after it (the bytes of the
parameters and buffers), and the accounting keeps the measured size.

Models in use are held with ``hold()``: a held model is never evicted, because dropping the cache's
reference would free no memory while a job still runs on it, and the accounting would lie.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from inference.base import EngineError
from inference.model_files import safetensors_header

T = TypeVar("T")


class ModelTooLarge(EngineError):
    """The model alone needs more than the cache's whole budget."""

    code = "model_too_large"


class CacheFull(EngineError):
    """The model would fit the budget, but models in use by running jobs hold the space."""

    code = "model_cache_full"


@dataclass
class _Entry:
    value: Any
    nbytes: int
    device: str
    loaded_at: float
    last_used: float
    hits: int = 0
    holders: int = 0


class ModelCache:
    """Least-recently-used cache of loaded models, never holding more than ``budget_bytes``.

    Thread-safe. Loads run outside the cache lock (a load takes seconds), with their estimated
    size reserved so that two loads in parallel cannot together overshoot the budget; a second
    caller asking for a model that is being loaded waits for that load instead of repeating it.
    """

    def __init__(self, budget_bytes: int, *, device: str = "cpu"):
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self.device = str(device)
        self._lock = threading.Condition(threading.RLock())
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._loading: dict[str, int] = {}  # key -> bytes reserved for the load in flight
        self.loads = 0
        self.evictions = 0

    # -- the main entry points -----------------------------------------------------------------

    def get_or_load(
        self, key: str, loader: Callable[[], T], size_estimate: int, *, device: str | None = None
    ) -> T:
        """The cached model for ``key``, or ``loader()``'s result, cached, after evicting least
        recently used models until ``size_estimate`` bytes fit in the budget."""
        with self._acquire(key, loader, size_estimate, device, hold=False) as value:
            return value

    @contextlib.contextmanager
    def hold(
        self, key: str, loader: Callable[[], T], size_estimate: int, *, device: str | None = None
    ) -> Iterator[T]:
        """Like ``get_or_load`` but keeps the model from being evicted until the block ends."""
        with self._acquire(key, loader, size_estimate, device, hold=True) as value:
            yield value

    def evict(self, key: str) -> bool:
        """Drop one model (if not held); True if it was cached."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.holders:
                return False
            del self._entries[key]
            self.evictions += 1
            devices = {entry.device}
        del entry
        self._release_memory(devices)
        return True

    def clear(self) -> None:
        """Drop every model not in use (after a CUDA out-of-memory error, for one)."""
        with self._lock:
            victims = [k for k, e in self._entries.items() if not e.holders]
            devices = {self._entries[k].device for k in victims}
            for key in victims:
                del self._entries[key]
                self.evictions += 1
        self._release_memory(devices)

    # -- diagnostics ---------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def loaded(self) -> list[dict[str, Any]]:
        """What is loaded now, most recently used first (for ``/diag/backends``)."""
        with self._lock:
            return [
                {
                    "id": key,
                    "bytes": e.nbytes,
                    "device": e.device,
                    "hits": e.hits,
                    "in_use": e.holders > 0,
                    "loaded_at": e.loaded_at,
                    "last_used": e.last_used,
                }
                for key, e in reversed(self._entries.items())
            ]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "budget_bytes": self.budget_bytes,
                "used_bytes": sum(e.nbytes for e in self._entries.values()),
                "models": len(self._entries),
                "loads": self.loads,
                "evictions": self.evictions,
            }

    # -- internals -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _acquire(
        self, key: str, loader: Callable[[], T], size_estimate: int, device: str | None, *, hold: bool
    ) -> Iterator[T]:
        device = str(device or self.device)
        entry = self._get_or_reserve(key, int(size_estimate), hold=hold)
        if entry is None:
            entry = self._load(key, loader, int(size_estimate), device, hold=hold)
        try:
            yield entry.value
        finally:
            if hold:
                with self._lock:
                    entry.holders -= 1
                    self._lock.notify_all()

    def _get_or_reserve(self, key: str, size: int, *, hold: bool) -> _Entry | None:
        """The cached entry (marked used), or None after reserving room for this caller to load."""
        if size > self.budget_bytes:
            raise ModelTooLarge(
                f"model {key!r} needs about {_mb(size)} but the model cache budget is "
                f"{_mb(self.budget_bytes)}"
            )
        devices: set[str] = set()
        with self._lock:
            while True:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    entry.hits += 1
                    entry.last_used = time.monotonic()
                    if hold:
                        entry.holders += 1
                    break
                if key in self._loading:
                    self._lock.wait()  # another thread is loading this very model
                    continue
                if self._committed() + size <= self.budget_bytes:
                    self._loading[key] = size
                    break
                # Waiting for room releases the lock, so look for the key again after it.
                devices |= self._evict_one_or_wait(key, size)
        self._release_memory(devices)
        return entry

    def _evict_one_or_wait(self, key: str, size: int) -> set[str]:
        """Evict the least recently used model not in use; if there is none but other loads are
        in flight, wait for one to finish (its reservation becomes a model that can be evicted).
        Only models held by running jobs make the space unavailable. Called with the lock held."""
        victim = next((k for k, e in self._entries.items() if not e.holders), None)
        if victim is not None:
            self.evictions += 1
            return {self._entries.pop(victim).device}
        if any(k != key for k in self._loading):
            self._lock.wait()
            return set()
        raise CacheFull(
            f"model {key!r} needs about {_mb(size)}; {_mb(self._committed())} of the "
            f"{_mb(self.budget_bytes)} budget is held by models in use"
        )

    def _committed(self) -> int:
        return sum(e.nbytes for e in self._entries.values()) + sum(self._loading.values())

    def _load(self, key: str, loader: Callable[[], T], size: int, device: str, *, hold: bool) -> _Entry:
        try:
            value = loader()
            measured = measure_bytes(value)
        except BaseException:
            with self._lock:
                del self._loading[key]
                self._lock.notify_all()
            raise
        # Keep the measured size: it is what the weights really hold once loaded (the estimate
        # can miss a dtype cast or tied weights). Objects with no tensors keep the estimate.
        nbytes = measured or size
        now = time.monotonic()
        entry = _Entry(value, nbytes, device, loaded_at=now, last_used=now, holders=1 if hold else 0)
        devices: set[str] = set()
        with self._lock:
            # The reservation stays (at the measured size) until the entry replaces it, so no
            # other thread starts loading the same model while this one makes room.
            self._loading[key] = nbytes
            try:
                if nbytes > self.budget_bytes:
                    raise ModelTooLarge(
                        f"model {key!r} holds {_mb(nbytes)} once loaded, more than the "
                        f"model cache budget of {_mb(self.budget_bytes)}"
                    )
                while self._committed() > self.budget_bytes:
                    devices |= self._evict_one_or_wait(key, nbytes)
            except EngineError:
                del self._loading[key], value, entry
                self._lock.notify_all()
                self._release_memory(devices | {device})
                raise
            del self._loading[key]
            self._entries[key] = entry
            self.loads += 1
            self._lock.notify_all()
        self._release_memory(devices)
        return entry

    @staticmethod
    def _release_memory(devices: set[str]) -> None:
        if not devices:
            return
        # Evicted pipelines hold reference cycles (components point back at their pipeline), so
        # collect them now rather than at some later GC, then hand CUDA's cached blocks back.
        gc.collect()
        if any(d.startswith("cuda") for d in devices):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def measure_bytes(obj: Any) -> int:
    """Bytes of the tensors an object holds: a torch module, a diffusers pipeline (its module
    components), or a dict/list/tuple of those. Shared tensors are counted once."""
    import torch

    seen: set[int] = set()
    total = 0

    def tensors_of(module: torch.nn.Module) -> Iterator[torch.Tensor]:
        yield from module.parameters()
        yield from module.buffers()

    def visit(item: Any) -> None:
        nonlocal total
        if isinstance(item, torch.nn.Module):
            for t in tensors_of(item):
                ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
                if ptr not in seen:
                    seen.add(ptr)
                    total += t.untyped_storage().nbytes()
        elif isinstance(item, torch.Tensor):
            if item.untyped_storage().data_ptr() not in seen:
                seen.add(item.untyped_storage().data_ptr())
                total += item.untyped_storage().nbytes()
        elif isinstance(item, dict):
            for v in item.values():
                visit(v)
        elif isinstance(item, (list, tuple)):
            for v in item:
                visit(v)
        elif hasattr(item, "components") and isinstance(item.components, dict):
            visit(item.components)  # a diffusers DiffusionPipeline
        elif hasattr(item, "__dict__"):
            # A small holder object (an engine's bundle of pipeline + lock): look one level in.
            for v in vars(item).values():
                if isinstance(v, torch.nn.Module) or hasattr(v, "components"):
                    visit(v)

    visit(obj)
    return total


def file_identity(path: Path) -> str:
    """A short tag of the files behind a model (where they are, when they last changed, their size):
    part of its cache key, so a model replaced under the same id (``aiorch models add --replace``,
    or removed and added again) is loaded afresh by running workers, never served stale. A hash:
    cache keys are shown by ``/diag/backends``, which shows no filesystem path."""
    try:
        stat = path.stat()
        facts = f"{path.resolve()}:{stat.st_mtime_ns}:{stat.st_size}"
    except OSError:
        facts = str(path)
    return hashlib.sha1(facts.encode(), usedforsecurity=False).hexdigest()[:8]


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


# Bytes per element of the dtypes safetensors files use.
_SAFETENSORS_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def estimate_checkpoint_bytes(path: Path, *, itemsize: int | None = None, variant: str | None = None) -> int:
    """Bytes a checkpoint will hold once loaded, read from its safetensors headers (no tensor data
    is read). ``itemsize`` is the bytes per element of the dtype floats are loaded in (2 for
    float16), since an fp32 file loaded in fp16 takes half its size. In a diffusers folder only
    the files ``from_pretrained`` would load count: ``variant`` files (``*.fp16.safetensors``)
    when a variant is asked for, the plain ones otherwise. Other formats count their file size."""
    path = Path(path)
    files = [path] if path.is_file() else _loaded_weight_files(path, variant)
    total = 0
    for file in files:
        if file.suffix != ".safetensors":
            total += file.stat().st_size
            continue
        for info in safetensors_header(file).values():
            numel = 1
            for dim in info["shape"]:
                numel *= dim
            stored = _SAFETENSORS_ITEMSIZE.get(info["dtype"], 4)
            is_float = info["dtype"].startswith(("F", "BF"))
            total += numel * (itemsize if itemsize and is_float else stored)
    return total


def _loaded_weight_files(folder: Path, variant: str | None) -> list[Path]:
    folders = [folder] + sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    chosen: list[Path] = []
    for sub in folders:
        weights = sorted(sub.glob("*.safetensors")) or sorted(sub.glob("*.bin"))
        if variant:
            picked = [w for w in weights if f".{variant}." in w.name]
        else:
            # Variant files carry an infix (model.fp16.safetensors); shards do not
            # (model-00001-of-00002.safetensors).
            picked = [w for w in weights if "." not in w.stem]
        chosen += picked or weights
    return chosen
