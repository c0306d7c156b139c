"""``AsyncClient``: the ``Client`` for asyncio code, method for method.

Each call runs the thread-safe ``Client``'s own method in a worker thread (``asyncio.to_thread``),
so both share one implementation: the same retries, ``Retry-After`` handling, typed errors,
streams and downloads. Many calls may be in flight at once (``asyncio.gather``); each holds a
thread of the default executor while it waits, so a coroutine that follows thousands of jobs should
``watch`` them together rather than ``wait`` on each. The iterators (``watch``,
``submit_and_follow``, ``list``) are async iterators fetching their next item in a thread.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from aiorch.client import Client, Job, JobRef

_END = object()


def _in_thread(name: str) -> Callable[..., Any]:
    method = getattr(Client, name)

    @functools.wraps(method)
    async def call(self: AsyncClient, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(method, self.sync, *args, **kwargs)

    return call


def _iterated(name: str) -> Callable[..., AsyncIterator[Any]]:
    method = getattr(Client, name)

    @functools.wraps(method)
    async def iterate(self: AsyncClient, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        items: Iterator[Any] = method(self.sync, *args, **kwargs)
        try:
            while (item := await asyncio.to_thread(next, items, _END)) is not _END:
                yield item
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                await asyncio.to_thread(close)

    return iterate


class AsyncClient:
    """``Client``'s methods as coroutines (``watch`` and ``list`` as async iterators)::

    async with AsyncClient(url, key) as client:
        jobs = await asyncio.gather(*(client.submit("upscale", p) for p in payloads))
        async for job in client.watch(jobs):
            print(job["job_id"], job["status"])
    """

    def __init__(self, url: str | None = None, key: str | None = None, **options: Any):
        self.sync = Client(url, key, **options)

    @property
    def url(self) -> str:
        return self.sync.url

    async def aclose(self) -> None:
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    submit = _in_thread("submit")
    submit_many = _in_thread("submit_many")
    get = _in_thread("get")
    get_many = _in_thread("get_many")
    wait = _in_thread("wait")
    run = _in_thread("run")
    cancel = _in_thread("cancel")
    cancel_many = _in_thread("cancel_many")
    delete = _in_thread("delete")
    batch = _in_thread("batch")
    capabilities = _in_thread("capabilities")
    upload = _in_thread("upload")
    upload_many = _in_thread("upload_many")
    download = _in_thread("download")
    watch = _iterated("watch")
    submit_and_follow = _iterated("submit_and_follow")
    list = _iterated("list")


__all__ = ["AsyncClient", "Job", "JobRef"]
