"""Dynamic batching: a bounded queue of tokenized texts, ``ENGINE_WORKERS`` engine calls at a time.

Policy:

* The engine runs at most ``ENGINE_WORKERS`` batches at once, each in its own
  worker thread; while they run, new texts accumulate, and the next batch is
  formed the moment a worker frees up (as late as possible, so it is as full
  as possible). A lone request at an idle engine runs at once (no delay).
* Under load (the previous batch held more than one text), formation waits up
  to ``MAX_WAIT_MS`` after the oldest text arrived, so batches fill.
* A batch holds at most ``MAX_BATCH_SIZE`` texts and ``MAX_BATCH_TOKENS``
  padded tokens (the budget may be lowered by OOM or memory pressure).
* Length grouping: when more texts wait than one batch takes, the batch is
  the oldest waiting text plus its nearest neighbours by token length, grown
  greedily to whichever side adds the least padding. The oldest text is
  always served next, so nothing starves, and padding stays small.
* A full queue (``MAX_QUEUE`` texts) sheds with ``Overloaded`` (503 +
  Retry-After); a text still queued at its deadline fails with
  ``DeadlineExceeded``; every accepted text's future is resolved.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from server.config import Settings
from server.engine import Engine, engine_workers, softmax
from server.metrics import Metrics
from server.primitives import DeadlineExceeded, Draining, InferenceFailed, Overloaded, ServerError
from server.tokenizer import pad_batch

log = logging.getLogger(__name__)
GROUPING_WINDOW = 16  # batches' worth of waiting texts considered when grouping by length


@dataclass(eq=False)
class WorkItem:
    ids: np.ndarray
    deadline: float
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    seq: int = 0

    @property
    def length(self) -> int:
        return len(self.ids)


def select_batch(waiting: list[WorkItem], max_size: int, max_tokens: int) -> list[WorkItem]:
    """The next batch: the oldest item and its length neighbours within size and padded-token bounds.

    ``waiting`` is in arrival order. At least one item is always returned (a
    text longer than the budget runs alone).
    """
    window = waiting[: max_size * GROUPING_WINDOW]
    ordered = sorted(window, key=lambda item: item.length)
    pos = ordered.index(window[0])
    left = right = pos
    width = ordered[pos].length
    while right - left + 1 < max_size:
        count = right - left + 1
        options = []
        if left > 0:
            options.append((width - ordered[left - 1].length, "left", width))
        if right + 1 < len(ordered):
            new_width = ordered[right + 1].length
            options.append(((new_width - width) * count, "right", new_width))
        options = [o for o in sorted(options) if (count + 1) * o[2] <= max_tokens]
        if not options:
            break
        _, side, width = options[0]
        if side == "left":
            left -= 1
        else:
            right += 1
    return ordered[left : right + 1]


class Batcher:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        metrics: Metrics,
        token_budget: Callable[[], int] | None = None,
    ) -> None:
        self.engine = engine
        self._settings = settings
        self._metrics = metrics
        self._token_budget = token_budget or (lambda: settings.max_batch_tokens)
        self._waiting: list[WorkItem] = []
        self._wakeup = asyncio.Event()
        self._workers = engine_workers(settings, engine.device)
        self._executor = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="engine")
        self._slots = asyncio.Semaphore(self._workers)
        self._running: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self._draining = False
        self._last_batch_size = 0
        self._seq = itertools.count()

    @property
    def depth(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def submit(self, encodings: list[np.ndarray], timeout: float | None = None) -> list[np.ndarray]:
        """Label probabilities per encoded text, in input order."""
        if self._draining:
            self._metrics.rejected.labels("draining").inc()
            raise Draining("server is shutting down; retry on another replica")
        if len(self._waiting) + len(encodings) > self._settings.max_queue:
            self._metrics.rejected.labels("queue_full").inc()
            raise Overloaded(
                f"server overloaded: {len(self._waiting)} texts already queued (MAX_QUEUE="
                f"{self._settings.max_queue}); retry after the Retry-After delay"
            )
        timeout = self._settings.request_timeout_s if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        items = [WorkItem(ids, deadline, loop.create_future(), seq=next(self._seq)) for ids in encodings]
        self._waiting.extend(items)
        self._metrics.queue_depth.set(len(self._waiting))
        self._wakeup.set()
        try:
            # The loop fails expired items itself; the grace covers a batch already running.
            return list(await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), timeout + 5.0))
        except asyncio.TimeoutError:
            self._forget(items)
            self._metrics.rejected.labels("deadline").inc()
            raise DeadlineExceeded(f"no result within the request deadline ({timeout:.1f} s)") from None

    async def drain(self) -> None:
        """Refuse new work, answer everything accepted, then stop the worker."""
        self._draining = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    def _forget(self, items: list[WorkItem]) -> None:
        gone = set(map(id, items))
        self._waiting = [i for i in self._waiting if id(i) not in gone]
        self._metrics.queue_depth.set(len(self._waiting))

    async def _loop(self) -> None:
        while True:
            if not self._waiting:
                if self._draining:
                    await asyncio.gather(*self._running)
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._slots.acquire()  # a free engine worker: form the next batch now, as late as possible
            await self._fill_under_load()
            self._expire()
            if not self._waiting:
                self._slots.release()
                continue
            batch = select_batch(self._waiting, self._settings.max_batch_size, self._token_budget())
            self._forget(batch)
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._slots.release()

    async def _fill_under_load(self) -> None:
        if self._last_batch_size <= 1 or len(self._waiting) >= self._settings.max_batch_size:
            return
        remaining = self._waiting[0].enqueued + self._settings.max_wait_ms / 1000 - time.monotonic()
        if remaining > 0:
            await asyncio.sleep(remaining)

    def _expire(self) -> None:
        now = time.monotonic()
        expired = [i for i in self._waiting if i.deadline <= now or i.future.done()]
        if not expired:
            return
        self._forget(expired)
        for item in expired:
            if not item.future.done():
                self._metrics.rejected.labels("deadline").inc()
                item.future.set_exception(DeadlineExceeded("request deadline passed while queued; retry later"))

    async def _execute(self, batch: list[WorkItem]) -> None:
        self._last_batch_size = len(batch)
        input_ids, attention_mask = pad_batch([item.ids for item in batch])
        started = time.monotonic()
        self._observe_batch(batch, input_ids, attention_mask, started)
        loop = asyncio.get_running_loop()
        try:
            logits = await loop.run_in_executor(self._executor, self.engine.run, input_ids, attention_mask)
            probabilities = softmax(np.asarray(logits, dtype=np.float32))
        except ServerError as exc:
            if isinstance(exc, InferenceFailed):
                log.error("inference failed on a batch of %d: %s", len(batch), exc)
                self._metrics.inference_errors.labels(self.engine.device).inc()
            self._fail(batch, exc)
            return
        except Exception as exc:  # engine errors must reach the callers, never hang them
            log.error("inference failed on a batch of %d: %s", len(batch), exc)
            self._metrics.inference_errors.labels(self.engine.device).inc()
            self._fail(batch, InferenceFailed(f"inference failed: {exc}"))
            return
        finally:
            self._metrics.inference_latency.labels(self.engine.device).observe(time.monotonic() - started)
        for item, row in zip(batch, probabilities, strict=True):
            if not item.future.done():
                item.future.set_result(row)

    def _observe_batch(self, batch, input_ids, attention_mask, started: float) -> None:
        m = self._metrics
        m.batch_size.observe(len(batch))
        m.batch_tokens.observe(input_ids.size)
        m.padded_tokens.inc(input_ids.size)
        m.real_tokens.inc(int(attention_mask.sum()))
        for item in batch:
            m.queue_wait.observe(started - item.enqueued)

    @staticmethod
    def _fail(batch: list[WorkItem], error: Exception) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(error)
