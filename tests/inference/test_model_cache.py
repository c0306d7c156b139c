"""The memory-bounded model cache, with real torch modules as the cached models."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from inference.model_cache import (
    CacheFull,
    ModelCache,
    ModelTooLarge,
    estimate_checkpoint_bytes,
    measure_bytes,
)

# nn.Linear(50, 50) in float32: (50*50 weights + 50 biases) * 4 bytes.
LINEAR_BYTES = (50 * 50 + 50) * 4


def linear() -> torch.nn.Module:
    return torch.nn.Linear(50, 50)


class CountingLoader:
    def __init__(self, make=linear, delay: float = 0.0):
        self.calls = 0
        self.make = make
        self.delay = delay

    def __call__(self) -> torch.nn.Module:
        self.calls += 1
        time.sleep(self.delay)
        return self.make()


def test_size_is_measured_from_parameter_and_buffer_bytes():
    assert measure_bytes(linear()) == LINEAR_BYTES
    bn = torch.nn.BatchNorm1d(10)  # 2 params + running mean/var + the batch counter
    assert measure_bytes(bn) == 4 * 10 * 4 + 8
    shared = linear()
    assert measure_bytes({"a": shared, "b": shared}) == LINEAR_BYTES  # shared weights count once
    assert measure_bytes(linear().half()) == LINEAR_BYTES // 2


def test_a_cached_model_is_loaded_once_and_reported():
    cache = ModelCache(10 * LINEAR_BYTES)
    loader = CountingLoader()
    first = cache.get_or_load("m", loader, LINEAR_BYTES)
    second = cache.get_or_load("m", loader, LINEAR_BYTES)
    assert first is second and loader.calls == 1
    [entry] = cache.loaded()
    assert entry["id"] == "m" and entry["bytes"] == LINEAR_BYTES and entry["device"] == "cpu"
    assert entry["hits"] == 1


def test_least_recently_used_model_is_evicted_before_one_that_would_not_fit():
    cache = ModelCache(2 * LINEAR_BYTES + 100)
    cache.get_or_load("a", linear, LINEAR_BYTES)
    cache.get_or_load("b", linear, LINEAR_BYTES)
    cache.get_or_load("a", linear, LINEAR_BYTES)  # a is now more recent than b
    cache.get_or_load("c", linear, LINEAR_BYTES)
    assert [e["id"] for e in cache.loaded()] == ["c", "a"]
    assert cache.used_bytes <= cache.budget_bytes
    assert cache.stats()["evictions"] == 1


def test_the_budget_is_never_exceeded_even_while_loading():
    cache = ModelCache(3 * LINEAR_BYTES)
    peaks = []

    def loader():
        # what is cached plus this load's own size, at the moment the load runs
        peaks.append(cache.used_bytes + LINEAR_BYTES)
        return linear()

    for i in range(8):
        cache.get_or_load(f"m{i % 5}", loader, LINEAR_BYTES)
    assert max(peaks) <= cache.budget_bytes
    assert len(cache.loaded()) == 3


def test_an_underestimated_model_makes_room_for_its_measured_size():
    cache = ModelCache(3 * LINEAR_BYTES)
    cache.get_or_load("a", linear, LINEAR_BYTES)
    cache.get_or_load("b", linear, LINEAR_BYTES)
    big = cache.get_or_load("big", lambda: torch.nn.Sequential(linear(), linear()), 10)
    assert measure_bytes(big) == 2 * LINEAR_BYTES
    assert [e["id"] for e in cache.loaded()] == ["big", "b"]
    assert cache.used_bytes == 3 * LINEAR_BYTES


def test_a_model_larger_than_the_whole_budget_is_refused():
    cache = ModelCache(LINEAR_BYTES - 1)
    loader = CountingLoader()
    with pytest.raises(ModelTooLarge):
        cache.get_or_load("m", loader, LINEAR_BYTES)
    assert loader.calls == 0  # refused on the estimate, before loading
    with pytest.raises(ModelTooLarge):
        cache.get_or_load("m", loader, 10)  # the estimate lied; the measured size is refused
    assert "m" not in cache and cache.used_bytes == 0


def test_a_held_model_is_not_evicted():
    cache = ModelCache(LINEAR_BYTES + 100)
    with cache.hold("busy", linear, LINEAR_BYTES):
        with pytest.raises(CacheFull):
            cache.get_or_load("other", linear, LINEAR_BYTES)
        assert "busy" in cache
    cache.get_or_load("other", linear, LINEAR_BYTES)  # released: now it can go
    assert [e["id"] for e in cache.loaded()] == ["other"]


def test_a_failed_load_leaves_nothing_reserved():
    cache = ModelCache(LINEAR_BYTES + 100)

    def broken():
        raise OSError("disk gone")

    with pytest.raises(OSError):
        cache.get_or_load("m", broken, LINEAR_BYTES)
    assert cache.get_or_load("m", linear, LINEAR_BYTES) is not None
    assert cache.used_bytes == LINEAR_BYTES


def test_concurrent_callers_share_one_load():
    cache = ModelCache(10 * LINEAR_BYTES)
    loader = CountingLoader(delay=0.05)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get_or_load("m", loader, LINEAR_BYTES)))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loader.calls == 1
    assert len(results) == 8 and all(r is results[0] for r in results)


def test_concurrent_loads_of_different_models_stay_within_budget():
    # Few rounds: every eviction runs a full gc.collect(), slow in a process that holds torch.
    cache = ModelCache(3 * LINEAR_BYTES)
    errors = []

    def worker(n: int) -> None:
        try:
            for i in range(8):
                cache.get_or_load(f"m{(n + i) % 6}", CountingLoader(delay=0.001), LINEAR_BYTES)
                assert cache.used_bytes <= cache.budget_bytes
        except Exception as exc:  # collected: an assertion in a thread would be lost otherwise
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert cache.used_bytes <= cache.budget_bytes and len(cache.loaded()) <= 3


def test_checkpoint_estimate_reads_safetensors_headers_and_target_dtype(tmp_path):
    save_file(
        {"w": torch.zeros(100, 10), "steps": torch.zeros(4, dtype=torch.int64)}, tmp_path / "m.safetensors"
    )
    assert estimate_checkpoint_bytes(tmp_path / "m.safetensors") == 100 * 10 * 4 + 4 * 8
    # loaded in float16, the floats take half; the integer buffer keeps its size
    assert estimate_checkpoint_bytes(tmp_path / "m.safetensors", itemsize=2) == 100 * 10 * 2 + 4 * 8


def test_checkpoint_estimate_of_a_folder_counts_only_the_files_that_load(tmp_path):
    unet = tmp_path / "unet"
    unet.mkdir()
    save_file({"w": torch.zeros(1000)}, unet / "diffusion_pytorch_model.safetensors")
    save_file(
        {"w": torch.zeros(1000, dtype=torch.float16)}, unet / "diffusion_pytorch_model.fp16.safetensors"
    )
    assert estimate_checkpoint_bytes(tmp_path) == 4000
    assert estimate_checkpoint_bytes(tmp_path, variant="fp16") == 2000


def test_clear_drops_everything_not_in_use():
    cache = ModelCache(10 * LINEAR_BYTES)
    cache.get_or_load("a", linear, LINEAR_BYTES)
    with cache.hold("b", linear, LINEAR_BYTES):
        cache.clear()
        assert [e["id"] for e in cache.loaded()] == ["b"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evicting_a_cuda_model_returns_its_memory():
    cache = ModelCache(2**30, device="cuda")
    size = 64 * 2**20

    def load():
        return torch.nn.Linear(4096, 4096).cuda()

    cache.get_or_load("a", load, size)
    held = torch.cuda.memory_reserved()
    assert cache.loaded()[0]["device"] == "cuda"
    cache.evict("a")
    assert torch.cuda.memory_reserved() < held  # empty_cache gave the blocks back


def test_a_model_replaced_under_the_same_id_is_loaded_afresh(tmp_path, monkeypatch) -> None:
    """A worker's cache keys carry the files' identity: an operator who replaces a model's files
    (``aiorch models add --replace``, or remove and add again) gets the new weights in running
    workers, never the cached old ones; the key shows no path (``/diag/backends`` lists keys)."""
    import os

    from inference import runtime

    monkeypatch.setattr(runtime, "_cache", ModelCache(2**30))
    weights = tmp_path / "det.pth"
    weights.write_bytes(b"old weights")
    loads = []

    def loader() -> object:
        loads.append(weights.read_bytes())
        return object()

    first = runtime.load_cached("det:det", weights, loader)
    assert runtime.load_cached("det:det", weights, loader) is first and len(loads) == 1
    weights.write_bytes(b"new weights, another size")
    os.utime(weights, ns=(1, 2))
    assert runtime.load_cached("det:det", weights, loader) is not first
    assert loads == [b"old weights", b"new weights, another size"]
    keys = [entry["id"] for entry in runtime.model_cache().loaded()]
    assert all(key.startswith("det:det#") and str(tmp_path) not in key for key in keys), keys
