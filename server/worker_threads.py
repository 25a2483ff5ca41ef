"""``WorkerThreads``: the engine's worker threads, each with its own queue, without an executor's bookkeeping.

The batcher hands every outcome back to the loop itself (``Batcher._infer``), so the future an executor makes
per call serves nothing, and it costs where it hurts: profiled on lone requests (py-spy, an engine that answers
at once), the executor's ``Future`` with its ``Condition``, ``set_result`` notifying it and the idle
``Semaphore`` took about a quarter of an engine worker's Python time and 4 % of the event loop's; and the worker
ran that tail holding the GIL just after it had woken the loop, which then waited for the GIL. Here a worker
goes straight back to ``SimpleQueue.get``, which waits in C without the GIL.

The caller picks the thread: the batcher gives a batch to the thread freed last, so a lone client's requests
keep to one warm thread (with one shared queue, idle threads took turns with an engine that answers at once).
The threads are daemons, started on the first call, so a batcher that is never drained (a test's) leaves none
behind to hold the interpreter's exit. One that is in a call at exit (an engine call that hung past the drain)
is named by ``threads_in_call``: ``server.lifecycle`` then ends the process with ``os._exit``, as for any thread
still running, rather than let the interpreter tear down ONNX Runtime under it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)
_IN_CALL: set[threading.Thread] = set()  # the worker threads (of every WorkerThreads) running a call now


def threads_in_call() -> list[threading.Thread]:
    """The worker threads running a call now."""
    return list(_IN_CALL)


def post(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """Run ``callback`` on ``loop`` from another thread; a loop already closed (process ending) is ignored."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        log.debug("event loop closed before a worker thread's result could be delivered")


def settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """Resolve ``future`` (on its loop) unless its waiter has given up on it."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class UnjoinedExecutor(ThreadPoolExecutor):
    """The event loop's default executor (``asyncio.to_thread``: the store's and the key cache's database calls),
    whose shutdown does not wait for the calls under way.

    ``asyncio.run`` shuts the default executor down at the loop's end and waits for its threads (without a time
    limit before Python 3.12): a key lookup hung on a frozen database held a drained server's exit 26 s past
    "store closed", 40.5 s after SIGTERM against the documented 28 s (red team helper-99). A thread still running
    then is left to ``server.lifecycle.threads_still_running``, which ends the process without joining it."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=cancel_futures)


MODEL_LOAD_THREAD = "model-load"  # start-up's model load (``server.app``): the one step a second SIGTERM cuts


async def on_own_thread(fn: Callable[..., Any], *args: Any, name: str) -> Any:
    """``fn(*args)`` on a daemon thread of its own, awaited on the loop; for long one-off work (a model load).

    Not the loop's default executor: its threads were joined when the loop closed (``asyncio.run`` waits for them;
    ``UnjoinedExecutor`` now), so a model load under way held the process past the drain deadline and a second
    SIGTERM (red team helper-67: 24-28 s after the signal, for a 15 s load); and its workers may all be held by
    database calls that hang, with a call queued behind them (the store's close: review helper-101). A daemon thread
    is not waited for; while it runs it is among ``threads_in_call``, so the process then ends with ``os._exit``
    rather than tear ONNX Runtime down under it (``server.lifecycle``). Cancelling the await leaves the work to
    finish unheard."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def run() -> None:
        me = threading.current_thread()
        _IN_CALL.add(me)
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # delivered to the awaiting task
            result, error = None, exc
        finally:
            _IN_CALL.discard(me)
        post(loop, settle, future, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future


class WorkerThreads:
    """``count`` threads, each taking calls from its own queue: the caller says which thread runs a call."""

    def __init__(self, count: int, name: str) -> None:
        self.count = count
        self._name = name
        self._queues: list[queue.SimpleQueue[tuple[Callable[..., Any], tuple] | None]] = [
            queue.SimpleQueue() for _ in range(count)]
        self._threads: list[threading.Thread] = []
        self._shut = False

    def submit(self, worker: int, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on thread ``worker`` after what it was given before; its result is dropped, an
        exception is logged. Raises ``RuntimeError`` after ``shutdown`` (or when a thread cannot start)."""
        if self._shut:
            raise RuntimeError(f"the {self._name} threads are shut down")
        while len(self._threads) < self.count:
            thread = threading.Thread(target=self._run, args=(self._queues[len(self._threads)],),
                                      name=f"{self._name}_{len(self._threads)}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._queues[worker].put((fn, args))

    def shutdown(self, wait: bool, cancel_pending: bool = False) -> None:
        """End each thread after the calls already submitted (none of those not yet started, with
        ``cancel_pending``); with ``wait``, return once they have ended. Later calls are refused."""
        self._shut = True
        for q in self._queues[: len(self._threads)]:
            while cancel_pending:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
            q.put(None)
        if wait:
            for thread in self._threads:
                thread.join()

    def _run(self, calls: queue.SimpleQueue) -> None:
        me = threading.current_thread()
        while (item := calls.get()) is not None:
            self._call(me, *item)
            del item  # nothing of a finished call (a batch: its requests, their results) is held while waiting

    def _call(self, me: threading.Thread, fn: Callable[..., Any], args: tuple) -> None:
        _IN_CALL.add(me)
        try:
            fn(*args)
        except BaseException:  # the thread must live on to take the next call
            log.exception("a call on the %s threads failed", self._name)
        finally:
            _IN_CALL.discard(me)
