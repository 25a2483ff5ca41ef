"""``TextThread``: one daemon thread for long requests' text work (normalizing, checking, tokenizing), off the loop.

Why it exists and when it is used: ``server.predictor`` (``Predictor.text_work``). One thread, so that long
requests are tokenized one at a time, as they were on the loop, and their memory is what the memory plan measured.

Each call is answered through an asyncio future of the caller's loop, resolved there (``settle``), never touched
by the thread but to look whether it is still wanted: work whose caller went away (a gRPC call cancelled) or that
``close`` answered is skipped. ``close`` answers every call still waiting with ``Draining`` at once: a caller left
waiting would be cancelled as the loop ends, each in a traceback of the web server's. A daemon thread, so that
work under way at the exit does not hold it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from server.primitives import Draining
from server.worker_threads import post, settle

T = TypeVar("T")


class TextThread:
    def __init__(self, name: str = "text-work") -> None:
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None  # started at the first call
        self._waiting: set[asyncio.Future] = set()
        self._closed = False

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` on the thread, after the calls queued before it."""
        if self._closed:
            raise _closed()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.add(future)
        self._queue.put((loop, future, work, args))
        try:
            return await future
        finally:
            self._waiting.discard(future)

    def close(self) -> None:
        """Answer every call still waiting with ``Draining``, then let the thread end (module docstring)."""
        self._closed = True
        for future in self._waiting:
            settle(future, None, _closed())
        self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            loop, future, work, args = item
            if future.done():  # its caller went away, or ``close`` answered it
                continue
            try:
                result, error = work(*args), None
            except BaseException as exc:  # delivered to the caller, who decides
                result, error = None, exc
            post(loop, settle, future, result, error)


def _closed() -> Draining:
    return Draining("the server shut down before this request's texts were read; retry on another replica")
