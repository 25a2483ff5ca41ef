"""``BlockingWorker``: one daemon thread that runs the store's blocking calls in order, answering on the loop.

A daemon thread rather than a ThreadPoolExecutor: an executor's threads are joined at interpreter exit,
so a database call hung on a dead network would hold the process's exit for as long as it hangs, and the
store's ``close()`` must be bounded in time. Results come back as asyncio futures resolved on the loop
that made the call, so worker threads never touch loop-owned state themselves.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from server.worker_threads import post, settle

log = logging.getLogger(__name__)


class BlockingWorker:
    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._call_started: float | None = None  # time.monotonic() when the call under way began
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Queue ``fn(*args)``; the returned future (of the running loop) gets its result or exception."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((loop, future, fn, args))
        return future

    def call_age_s(self) -> float:
        """How long the call under way has been running (0 when none): a database that stopped answering holds
        one until its timeouts end it (PostgreSQL's statement timeout: 30 s), and /health says so meanwhile."""
        started = self._call_started
        return 0.0 if started is None else time.monotonic() - started

    def stop(self) -> None:
        """Finish the calls already queued, then end; does not wait (a hung call must not hold shutdown)."""
        self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            loop, future, fn, args = item
            self._call_started = time.monotonic()
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # delivered to the caller, who decides
                result, error = None, exc
            self._call_started = None
            post(loop, settle, future, result, error)
