"""Group commit: the requests finishing together share one write and one sync of the write-ahead log.

A request puts its records on a queue (on the event loop: a lock and a ``SimpleQueue.put``, no encoding)
and awaits a future. The committer thread takes everything queued, converts and encodes it
(JSON on this thread, not the loop), appends it to the WAL with one sync (fdatasync), and hands the outcome back to
the loop in one callback, which resolves every request's future and gives the committed rows to the
writer. While one sync runs, the next group accumulates: the busier the server, the more records each
sync covers.

On this path a lone request's wait is the sync plus two thread hand-offs (loop to committer, committer to
loop), which ``commit_here`` below spares it where it can; each hand-off also waits for the GIL the other side
holds. The committer therefore blocks in C (``SimpleQueue.get``, not ``threading.Condition``, whose wait and
wake-up run Python code while the loop wants the GIL back) and posts the outcome as the last thing before
blocking again.

A record that cannot be encoded fails only its own request. A group larger than the spool's cap is appended
in runs within it (``runs_within``); a run refused as full is tried again request by request, so that those
that fit the room left are taken (small requests had failed beside a large one). An append the WAL refuses
otherwise (ENOSPC, I/O error) fails every request of its run with ``SpoolUnavailable``: none is answered 200.

``commit_here`` is the same append on the calling thread, for records ready on a thread that is awake anyway
(an engine worker that just computed them: ``server.records``): no hand-off at all. Its outcome does not wake
the loop either: it waits for ``deliver``, which the caller runs on the loop with its own hand-off there (the
batcher's, which answers the request), or which the committer's next group runs, or the store's close after
``stop``, whichever comes first. Posting it woke the loop once more per lone request (3.0 against 2.1 voluntary
context switches of the loop's thread per request), and the loop then waited for the GIL the worker still held.
Every outcome is queued for ``deliver`` under one lock (``_order``) together with its append, so the loop hears
of commits in log order, whichever thread made them (the writer relies on it).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.store.rows import encode_lines, record_row
from server.store.wal import SpoolUnavailable, WriteAheadLog
from server.worker_threads import post, settle

log = logging.getLogger(__name__)


@dataclass
class Commit:
    """Rows now durable in the WAL at [start, end), in log order."""

    rows: list[dict[str, Any]]
    start: int
    end: int


@dataclass
class Encoded:
    """One request's rows, their spool lines, and its future."""

    rows: list[dict[str, Any]]
    chunk: bytes
    future: asyncio.Future


def runs_within(group: list[Encoded], limit: int) -> list[list[Encoded]]:
    """The group in order, cut into runs of at most ``limit`` bytes each (a request larger than that alone in
    its own): one append each. Appended whole, a group larger than the spool failed every request in it, though
    each one fitted; and a request larger than the spool fails alone (``RecordsTooLarge``)."""
    runs: list[list[Encoded]] = []
    size = 0
    for item in group:
        if not runs or size + len(item.chunk) > limit:
            runs.append([])
            size = 0
        runs[-1].append(item)
        size += len(item.chunk)
    return runs


class GroupCommitter:
    def __init__(self, wal: WriteAheadLog, store_text: bool,
                 on_commit: Callable[[Commit | None, SpoolUnavailable | None], None]) -> None:
        self._wal = wal
        self._store_text = store_text
        self._on_commit = on_commit  # called on the loop, in commit order
        self._queue: queue.SimpleQueue[tuple[list[Any], bool, asyncio.Future] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders appends against stop(): nothing is queued behind the stop marker
        self._order = threading.Lock()  # held from an append to the queueing of its outcome (module docstring)
        # each append's outcome for the loop, in log order: added holding ``_order``, taken on the loop (``deliver``)
        self._outcomes: deque[tuple[Commit | None, SpoolUnavailable | None, list[asyncio.Future]]] = deque()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="store-committer", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def append(self, items: list[Any], *, rows: bool = False) -> asyncio.Future:
        """Queue records (or ready rows, ``rows=True``) for the next group; the future is done once they are
        durable, or raises ``SpoolUnavailable``. Call on the loop."""
        future = self._loop.create_future()
        with self._lock:
            if self._stopping:
                raise SpoolUnavailable("closed", "the server is shutting down; retry on another replica")
            self._queue.put((items, rows, future))
        return future

    def commit_here(self, records: list[Any]) -> None:
        """Append and sync ``records`` on the calling thread (not the loop: it blocks for a sync), in log order
        with the committer's groups; returns once they are durable, or raises ``SpoolUnavailable``. Either way the
        caller then has ``deliver`` run on the loop (module docstring)."""
        rows = [record_row(r, self._store_text) for r in records]
        chunk = encode_lines(rows)
        with self._order:
            if self._stopping:  # read under _order: stop() waits for _order, so no append outlives it
                raise SpoolUnavailable("closed", "the server is shutting down; retry on another replica")
            span, error = self._append(chunk)
            self._outcomes.append((Commit(rows, *span) if span else None, error, []))
        if error is not None:
            raise error

    def deliver(self) -> None:
        """On the loop: report the appends made so far to ``on_commit``, in log order, and settle their futures (a
        failing ``on_commit`` is logged: the records are durable, and the outcomes behind it are still reported)."""
        while self._outcomes:
            commit, error, futures = self._outcomes.popleft()  # only the loop takes: never empty here
            try:
                self._on_commit(commit, error)
            except Exception:
                log.exception("store: reporting a commit to the writer failed")
            for future in futures:
                settle(future, None, error)

    def stop(self, timeout: float) -> bool:
        """Commit what is pending, then end the thread; False if it (or an append on another thread) did not end
        within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive() or not self._order.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
        self._order.release()
        return True

    def _run(self) -> None:
        while True:
            group = [self._queue.get()]
            while True:  # everything queued meanwhile joins the group
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = group[-1] is None  # the stop marker is always the last item queued
            if stopping:
                group.pop()
            if group:
                self._commit(group)
            if stopping:
                return

    def _commit(self, group: list[tuple[list[Any], bool, asyncio.Future]]) -> None:
        encoded: list[Encoded] = []
        for items, ready, future in group:
            try:
                converted = items if ready else [record_row(r, self._store_text) for r in items]
                encoded.append(Encoded(converted, encode_lines(converted), future))
            except Exception as error:  # a record that is not one: fail its request alone
                log.exception("store: a prediction record could not be encoded")
                post(self._loop, settle, future, None, error)
        if not encoded:
            return
        with self._order:
            for run in runs_within(encoded, self._wal.max_bytes):
                span, error = self._append(b"".join(item.chunk for item in run))
                if error is not None and error.cause == "full" and len(run) > 1:
                    for item in run:  # each one that fits the room left is taken
                        self._append_outcome([item], *self._append(item.chunk))
                else:
                    self._append_outcome(run, span, error)
        post(self._loop, self.deliver)

    def _append_outcome(self, run: list[Encoded], span: tuple[int, int] | None, error: SpoolUnavailable | None) -> None:
        """Queue a run's outcome for ``deliver``. Call holding ``_order``, right after its append."""
        rows = [row for item in run for row in item.rows]
        self._outcomes.append((Commit(rows, *span) if span else None, error, [item.future for item in run]))

    def _append(self, chunk: bytes) -> tuple[tuple[int, int] | None, SpoolUnavailable | None]:
        """Append and sync ``chunk``: its (start, end) LSN, or why not. Call holding ``_order``."""
        try:
            return self._wal.append(chunk), None
        except SpoolUnavailable as error:
            return None, error
        except Exception as error:  # a bug, not the disk: still never answer 200 without a record
            log.exception("store: appending to the spool failed")
            return None, SpoolUnavailable("io_error", f"spool append failed: {type(error).__name__}")
