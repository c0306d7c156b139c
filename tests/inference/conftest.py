"""Fixtures the engine tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """For a module of tiny models (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    they gain nothing from threads, and on a shared 2-core machine OpenMP's spinning workers make
    every step several times slower (70 s for test_diffusion.py instead of 15 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
