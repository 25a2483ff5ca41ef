"""Dynamic batching: a bounded queue of tokenized texts, ``ENGINE_WORKERS`` engine calls at a time.

Policy:

* The engine runs at most ``ENGINE_WORKERS`` batches at once, each in its own
  worker thread; while they run, new texts accumulate, and the next batch is
  formed the moment a worker frees up (as late as possible, so it is as full
  as possible). A request that finds a worker idle is dispatched within its
  own ``submit`` call: no loop turn, no delay.
* Under load (the previous batch served more than one request, and the batcher
  has not been idle since: nothing waiting, nothing running), formation waits
  up to ``MAX_WAIT_MS`` after the oldest text arrived, so batches fill. One
  client's request of many texts is not load (a lone client of two-text
  requests waited ``MAX_WAIT_MS`` each time), and an idle batcher is not under
  load whatever it last ran (the state outlived the load, and with
  ``MAX_WAIT_MS`` at the request deadline every later request timed out).
* A batch holds at most ``MAX_BATCH_SIZE`` texts and ``MAX_BATCH_TOKENS``
  padded tokens (the budget may be lowered by OOM or memory pressure).
* Serving order: fair between requests, by tokens (self-clocked fair queuing,
  each request a flow). A request's first text takes the turn the queue has
  reached (``_virtual``: how far the texts served so far go, in tokens), each
  next text of it one turn later by the length of the text before it; texts
  are served in turn order, arrival order between equal turns. A stream of
  lone texts is served in arrival order, as before; but a request of many
  long texts no longer holds a short request that arrives after it behind all
  of them: they share the engine, token for token (two clients of 52 texts of
  512 tokens each held a one-word request 4-16 s, red team helper-73). The
  turn reached grows with every batch, so every text is served in the end.
  Bulk requests (more than ``BULK_TOKENS`` tokens) share the engine with
  the others, but not among themselves: each starts its turns after the
  bulk requests waiting before it, so they finish in arrival order. Shared
  among them, four requests of 256 texts of 500 tokens (9.7 s each alone)
  all finished at about four times that, past the 30 s deadline, and all
  failed, where in arrival order two were answered (red team helper-75).
* Length grouping: the batch is the next text in turn plus its nearest
  neighbours by token length, grown greedily to whichever side adds the least
  padding.
* On the CPU a batch also stops growing when the next text would raise the
  engine time per real token: a call costs about ``CPU_CALL_COST_TOKENS``
  tokens' worth of fixed work (ONNX Runtime's per-run cost, the hand-offs and
  the loop's work per batch) plus one unit per padded token, and on a CPU a
  padded token costs as much as a real one. Measured with the default int8
  model on one thread of this 2-core VM: 0.06 ms per token; 1 x 8 tokens 1.2 ms
  against 0.51 ms per text in 32 x 8 (~0.7 ms, ~11 tokens, fixed per call);
  batches of SST-2 sentences in arrival order cost 2.8 (4 texts, 42% padding)
  to 4.7 (32 texts, 94%) ms per text against 1.3-1.5 length-sorted. So a few
  similar lengths beat many mixed ones. Against the server at 64 clients (same
  runs, CPU per text): 6, 16, 48 and 96 were within the machine's noise of each
  other (padding 2-15%), 200 cost ~10% more engine time (27% padding); 48 also
  forms fewer, fuller batches than 16 (less loop work per text). A GPU computes
  padding in parallel, so there batches fill to the bounds.
* On the CPU a batch also stops at ``CPU_MOST_PADDED_TOKENS`` (2,048) padded
  tokens, whatever the memory budget allows: past that a call costs no less
  per token, and it holds its worker longer (16 texts of 512 tokens took
  1.3-2.5 s, and a one-word request waited for such calls, then ran in one:
  2.2-3.9 s p50 beside two clients of 52 such texts, 0.57 s with the bound).
  And its width (the longest text, to which the others are padded) is at most
  4 times its first text's length, or 64 tokens: a short text is not padded
  to the length of the long ones it waits beside (the one-word request then
  ran with three 512-token texts, 0.46 s; now 48-50 ms p50), while batches of
  sentences (SST-2: 4 to 66 tokens) group as before.
* An engine error on a batch shared by several requests runs each request's
  texts again on their own (``_per_request``), so an input the model fails on
  fails its own request, not its batch-mates' (a WARNING names the first
  error); two reruns in a row that fail stop it (the engine fails on
  everything), and the errors metric counts the engine batch once.
* A full queue (``MAX_QUEUE`` texts) sheds with ``Overloaded`` (503 +
  Retry-After); a request with texts still queued at its deadline fails with
  ``DeadlineExceeded`` (one already running gets a grace period first); every
  accepted request is answered. Each kind of shedding is logged at WARNING at
  most once a minute, with a count of the rest: the words an operator greps a
  log for when the service is slow ("slow", "timeout").

Mechanics: no batcher task. Batches are formed on the event loop (in ``submit``
when a worker is idle, when a worker finishes, when the fill wait ends) and go
to the engine thread freed last (``server.worker_threads``: a lone client's
requests keep to one thread, and its core's caches); the worker thread pads,
runs the engine and the softmax, and hands the batch back through one
``call_soon_threadsafe``; a request awaits one future for all its texts.
A batch that starts with nothing else running or waiting has the loop wake
itself shortly before it is expected back (``server.wake_ahead``), so the
hand-back does not wait for an idle CPU to wake.
The engine's time is measured on the worker around the engine call alone
(``sentiment_inference_latency_seconds``); the hand-offs, to the worker and
back to the loop, are ``sentiment_engine_handoff_seconds`` (a stalled loop shows
in ``to_loop``, a slow engine only in the former), and each request's queue and
engine time reach its caller (``StageTimings``, TEI's timing headers). A request
may bring a follow-up (``on_worker``) that the worker runs with its results
before handing them back, when the batch is the request's alone, nothing
else waits, another worker is free and no other follow-up runs (one at a
time: ``_request_to_follow_up``): ``server.records`` syncs a lone
request's records there, on the thread that is awake, rather than waking the
store's committer thread (so with one engine worker, as on CUDA, never); what
the follow-up leaves for the loop (telling the store's writer) rides on the
batch's own hand-off.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from server import idle_spin
from server.config import Settings
from server.engine import Engine, engine_workers, first_line, softmax
from server.metrics import Metrics
from server.primitives import (
    DeadlineExceeded,
    Draining,
    InferenceFailed,
    InputFailed,
    ModelOutputInvalid,
    Overloaded,
    ServerError,
    StageTimings,
)
from server.store.throttle import Throttle
from server.tokenizer import pad_batch
from server.wake_ahead import WakeAhead
from server.worker_threads import WorkerThreads, post

log = logging.getLogger(__name__)
# a request's follow-up on the engine worker, and what it has the loop run with the batch's hand-off (``submit``)
OnWorker = Callable[[list[np.ndarray]], Callable[[], None] | None]
GROUPING_WINDOW = 16  # batches' worth of waiting texts considered when grouping by length
RUNNING_GRACE_S = 5.0  # how long past its deadline a request whose texts are all running still waits
CPU_CALL_COST_TOKENS = 48  # an engine call's fixed cost on the CPU, in padded tokens' worth (module docstring)
BULK_TOKENS = 2048  # a request of more tokens is bulk: served after the bulk requests before it (docstring)
CPU_MOST_PADDED_TOKENS = 2048  # a CPU batch's padded tokens at most: its engine call's time is bounded (docstring)
DRAIN_POLL_S = 0.1  # how often a drain looks whether every request it waits for is answered
CPU_WIDTH_GROWTH, CPU_WIDTH_ANY_TEXT_MAY_JOIN = 4, 64  # a CPU batch's width: at most 4x its first text's, or 64


class PendingRequest:
    """One ``submit`` call: its texts' work items, their results in input order, the one future its caller awaits,
    and when its batches ran on the engine (``time.perf_counter``)."""

    def __init__(self, future: asyncio.Future, size: int, timeout: float, submitted: float,
                 on_worker: OnWorker | None = None) -> None:
        self.future = future
        self.on_worker = on_worker
        self.timeout = timeout
        self.submitted = submitted
        self.items: list[WorkItem] = []
        self.results: list[np.ndarray | None] = [None] * size
        self.remaining = size
        self.timer: asyncio.TimerHandle | None = None
        self.engine_started = float("inf")  # its first batch's engine call began
        self.engine_ended = submitted  # its last batch's engine call returned

    def deliver(self, index: int, row: np.ndarray, ran: Ran) -> None:
        if self.future.done():
            return
        self.engine_started = min(self.engine_started, ran.engine_started)
        self.engine_ended = max(self.engine_ended, ran.engine_ended)
        self.results[index] = row
        self.remaining -= 1
        if not self.remaining:
            self.future.set_result(self.results)

    def fail(self, error: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def close(self) -> None:
        """Its caller has its outcome: cancel its deadline and let go of its texts' work items. They point back at
        the request (as its deadline's timer does), and that cycle, left standing, kept each request and all it
        holds (~17 objects, its future and store records among them) for the cyclic garbage collector: at 256
        clients its collections took ~0.08 ms of the loop's ~0.4 ms per request (``gc.callbacks``, this VM)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.items = []

    def report(self, timings: StageTimings) -> None:
        """Add its queue wait (submission to its first engine call, hand-off included) and engine time."""
        timings.queue += self.engine_started - self.submitted
        timings.inference += self.engine_ended - self.engine_started


@dataclass(eq=False)
class WorkItem:
    ids: np.ndarray
    request: PendingRequest
    index: int = 0  # position in its request
    enqueued: float = field(default_factory=time.perf_counter)
    dispatched: bool = False
    turn: int = 0  # its place in the serving order (module docstring: fair between requests, in tokens)
    bulk: bool = False  # its request holds more than ``BULK_TOKENS``
    length: int = field(init=False)  # its tokens: read ~10 times per text while the queue is long (``select_batch``)

    def __post_init__(self) -> None:
        self.length = len(self.ids)


@dataclass(frozen=True)
class Ran:
    """One batch's trip (``time.perf_counter``): formed on the loop, picked up by a worker, the engine call's start
    and end, handed back to the loop."""

    formed: float
    picked_up: float
    engine_started: float
    engine_ended: float
    handed_back: float


Part = tuple[list[WorkItem], np.ndarray | BaseException, np.ndarray | None]  # texts, outcome, unusable rows


def select_batch(waiting: list[WorkItem], max_size: int, max_tokens: int | Callable[[int], int],
                 call_cost_tokens: float | None = None) -> list[WorkItem]:
    """The next batch: the first item and its length neighbours within size and padded-token bounds.

    ``max_tokens``: the padded tokens a batch may hold, or a function of the batch's padded width that says so
    (``server.budget.TokenBudget.at``: a batch of short texts may hold more tokens than one of long texts).

    ``waiting`` is in serving order (``Batcher``: turn, then arrival). At least one item is always returned (a
    text longer than the budget runs alone). With ``call_cost_tokens`` (an engine call's fixed cost in padded
    tokens' worth) the batch grows only while each text added lowers the cost per real token,
    ``(call_cost_tokens + padded) / real``.
    """
    window = waiting[: max_size * GROUPING_WINDOW]
    ordered = sorted(window, key=_length)
    pos = ordered.index(window[0])
    left = right = pos
    width = real = ordered[pos].length
    widest = math.inf if call_cost_tokens is None else max(CPU_WIDTH_ANY_TEXT_MAY_JOIN, CPU_WIDTH_GROWTH * width)
    while right - left + 1 < max_size:
        count = right - left + 1
        options = []
        if left > 0:
            options.append((width - ordered[left - 1].length, "left", width))
        if right + 1 < len(ordered):
            new_width = ordered[right + 1].length
            options.append(((new_width - width) * count, "right", new_width))
        options = [o for o in sorted(options) if o[2] <= widest
                   and (count + 1) * o[2] <= (max_tokens(o[2]) if callable(max_tokens) else max_tokens)]
        if not options:
            break
        _, side, new_width = options[0]
        added = ordered[left - 1 if side == "left" else right + 1].length
        if call_cost_tokens is not None:  # cost per real token before and with it: stop if it would rise
            before, after = call_cost_tokens + count * width, call_cost_tokens + (count + 1) * new_width
            if (real + added) * before < real * after:
                break
        width, real = new_width, real + added
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
        token_budget: Callable[[int], int] | None = None,
    ) -> None:
        self.engine = engine
        self._settings = settings
        self._metrics = metrics
        metrics.queue_limit.set(settings.max_queue)
        budget = token_budget or (lambda width: settings.max_batch_tokens)
        on_cpu = engine.device == "cpu"
        self._token_budget = (lambda width: min(budget(width), CPU_MOST_PADDED_TOKENS)) if on_cpu else budget
        self._call_cost_tokens = CPU_CALL_COST_TOKENS if on_cpu else None
        self._engine_time = metrics.inference_latency.labels(engine.device)
        self._to_worker, self._to_loop = (metrics.engine_handoff.labels(way) for way in ("to_worker", "to_loop"))
        self._waiting: list[WorkItem] = []  # in serving order: by turn, arrival order between equal turns
        self._virtual = 0  # the turn the queue has reached: a new request's first text takes it
        self._pending: set[PendingRequest] = set()  # submitted and not yet answered (a drain's time limit fails them)
        self._workers = engine_workers(settings, engine.device)
        self._idle = list(reversed(range(self._workers)))  # engine threads free, the most recently freed last
        self._busy_since: dict[int, float] = {}  # worker -> when its batch was handed to it (time.monotonic())
        self._threads = WorkerThreads(self._workers, "engine")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fill_timer: asyncio.TimerHandle | None = None
        self._quiet = asyncio.Event()  # set when nothing waits and nothing runs
        self._draining = False
        self._under_load = False  # the last batch served several requests, and the batcher was not idle since
        self._following_up = False  # a batch with a follow-up is running (``_request_to_follow_up``)
        self._wake_ahead: WakeAhead | None = None
        self._alone_on: int | None = None  # the worker running a batch that started with nothing else
        self._throttle = Throttle(log)

    @property
    def depth(self) -> int:
        return len(self._waiting)

    def stuck_workers(self, longer_than_s: float) -> tuple[int, float]:
        """How many engine workers have been on one batch for more than ``longer_than_s``, and the longest time: an
        engine that hangs answered every request 503 ``deadline`` while /health said ok and /ready 200 (red team
        helper-90)."""
        now = time.monotonic()
        running = [now - since for since in self._busy_since.values()]
        return sum(1 for seconds in running if seconds > longer_than_s), max(running, default=0.0)

    @property
    def workers(self) -> int:
        return self._workers

    def start(self) -> None:
        """Bind to the running event loop: finished batches are handed back to it."""
        self._loop = asyncio.get_running_loop()
        self._wake_ahead = WakeAhead(self._loop)

    async def submit(self, encodings: list[np.ndarray], timeout: float | None = None,
                     timings: StageTimings | None = None, on_worker: OnWorker | None = None) -> list[np.ndarray]:
        """Label probabilities per encoded text, in input order; ``timings`` gets the queue wait and engine time.

        ``on_worker``: called on the engine worker with the results (input order) before they are handed back,
        when one batch holds every text of the request, nothing else waits, another worker is free and no other
        follow-up runs (a lone request: the worker is awake, a thread it would hand work to is not;
        ``server.records``). It must not raise; it is not called otherwise, nor when the engine fails, and it may
        run for a request that has meanwhile failed (its deadline passed while the batch ran, its caller went
        away). What it returns, if not None, runs on the loop when the batch is handed back, before the results
        are delivered.
        """
        if self._draining:
            self._metrics.rejected.labels("draining").inc()
            raise Draining("server is shutting down; retry on another replica")
        if len(self._waiting) + len(encodings) > self._settings.max_queue:
            self._metrics.rejected.labels("queue_full").inc()
            self._throttle.log("queue_full", logging.WARNING, "load shedding: a request was answered 503 because "
                               "the queue is full (MAX_QUEUE=%d texts): the server is too slow for its load (runbook: "
                               "Queue saturation and load shedding)", self._settings.max_queue)
            raise Overloaded(
                f"server overloaded: {len(self._waiting)} texts already queued (MAX_QUEUE="
                f"{self._settings.max_queue}); retry after the Retry-After delay"
            )
        loop = self._loop
        assert loop is not None, "Batcher.start() was not called"
        if not encodings:
            return []
        timeout = self._settings.request_timeout_s if timeout is None else timeout
        now = time.perf_counter()
        request = PendingRequest(loop.create_future(), len(encodings), timeout, now, on_worker)
        request.items = self._queue(request, encodings, now)
        self._pending.add(request)
        request.timer = loop.call_later(timeout, self._deadline_passed, request, True)
        try:
            if self._idle:
                self._dispatch()  # an idle worker takes it now; else a worker that finishes forms the next batch
            else:
                self._settle()
            results = await request.future
            if timings is not None:
                request.report(timings)
            return results
        except BaseException:
            self._forget(request.items)  # its caller is gone (client disconnected) or it failed: its texts need not run
            raise
        finally:
            request.close()
            self._pending.discard(request)
            del request  # an exception raised here keeps this frame (its traceback) and the request's future keeps
            # the exception: with the request still in the frame, that would be a cycle (``PendingRequest.close``)

    async def drain(self, timeout: float | None = None) -> int:
        """Refuse new work and answer everything accepted, then stop the workers.

        What is still unanswered after ``timeout`` seconds fails with 503 (``Draining``) and the workers are
        stopped without waiting: an engine call that hangs is left behind rather than holding shutdown up.
        Returns how many requests failed so.
        """
        self._draining = True
        if self._loop is not None:
            self._dispatch()
            try:
                if not self._quiet.is_set():
                    await asyncio.wait_for(self._awaited_work_done(), timeout)
                if not self._quiet.is_set():  # answered: the engine is still on work nobody waits for
                    raise TimeoutError
            except TimeoutError:  # ``timeout`` is what was left of the drain (0 once the connections' wait used it)
                abandoned = [request for request in self._pending if not request.future.done()]
                if abandoned:
                    log.warning("drain: %d requests not answered by the drain's end, failed with 503",
                                len(abandoned))
                else:  # it said "0 requests not answered" beside the shutdown's "abandoned 1" (red team helper-74)
                    log.warning("drain: the engine is still busy with work no request waits for (requests already "
                                "answered or failed); its workers are not waited for")
                for request in abandoned:
                    request.fail(Draining("the server shut down before this request was answered; "
                                          "retry on another replica"))
                self._forget(list(self._waiting))
                self._threads.shutdown(wait=False, cancel_pending=True)
                return len(abandoned)
        self._threads.shutdown(wait=True)
        return 0

    async def _awaited_work_done(self) -> None:
        """Until nothing waits and nothing runs, or every request accepted is answered (or failed): a batch still on
        the engine then is work nobody waits for, and the drain need not wait for it (an engine hung on requests
        failed at their deadline held shutdown for the whole drain timeout: red team helper-90)."""
        while not self._quiet.is_set():
            if not self._waiting and all(request.future.done() for request in self._pending):
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._quiet.wait(), DRAIN_POLL_S)

    def _queue(self, request: PendingRequest, encodings: list[np.ndarray], now: float) -> list[WorkItem]:
        """Its texts' work items, each put in the waiting list at its turn (the module docstring's fair order)."""
        bulk = sum(len(ids) for ids in encodings) > BULK_TOKENS
        turn = self._virtual
        if bulk:  # after the bulk requests waiting already: among themselves they are served in arrival order
            turn = max([turn, *(item.turn + item.length for item in self._waiting if item.bulk)])
        items = []
        for index, ids in enumerate(encodings):
            items.append(WorkItem(ids, request, index, now, turn=turn, bulk=bulk))
            turn += len(ids)
        if not self._waiting or self._waiting[-1].turn <= items[0].turn:  # the usual case: nothing waits beyond
            self._waiting.extend(items)
        else:
            for item in items:
                bisect.insort_right(self._waiting, item, key=_turn)
        return items

    def _forget(self, items: list[WorkItem]) -> None:
        gone = set(items)  # by identity (``WorkItem`` has eq=False)
        self._waiting = [item for item in self._waiting if item not in gone]
        self._settle()

    def _settle(self) -> None:
        """The batcher is quiet (drain waits for it) when nothing waits or runs."""
        if not self._waiting and len(self._idle) == self._workers:
            self._quiet.set()
            self._under_load = False
        else:
            self._quiet.clear()

    def _deadline_passed(self, request: PendingRequest, queued_only: bool) -> None:
        if request.future.done():
            return
        if queued_only and all(item.dispatched for item in request.items):
            # Every text is on the engine: give it a grace period rather than drop finished work.
            request.timer = self._loop.call_later(RUNNING_GRACE_S, self._deadline_passed, request, False)
            return
        self._forget(request.items)
        self._metrics.rejected.labels("deadline").inc()
        self._throttle.log("deadline", logging.WARNING, "load shedding: a request was answered 503 because it got no "
                           "result within its request timeout (%.1f s): the server is too slow for its load (runbook: "
                           "Queue saturation and load shedding)", request.timeout)
        request.fail(DeadlineExceeded(f"no result within the request deadline ({request.timeout:.1f} s); "
                                      "retry later"))
        self._dispatch()

    def _dispatch(self) -> None:
        """Start batches while an engine worker is free and texts wait."""
        while self._idle and self._waiting and not self._wait_to_fill():
            first = self._waiting[0]
            self._virtual = max(self._virtual, first.turn + first.length)  # grows with each batch: none starves
            batch = select_batch(self._waiting, self._settings.max_batch_size, self._token_budget,
                                 self._call_cost_tokens)
            self._forget(batch)
            self._start(batch)
        self._settle()

    def _wait_to_fill(self) -> bool:
        """Under load, hold a part-full batch until ``MAX_WAIT_MS`` after its first text (the next in turn)
        arrived."""
        if not self._under_load or len(self._waiting) >= self._settings.max_batch_size:
            return False
        remaining = self._waiting[0].enqueued + self._settings.max_wait_ms / 1000 - time.perf_counter()
        if remaining <= 0:
            return False
        if self._fill_timer is None:
            self._fill_timer = self._loop.call_later(remaining, self._fill_wait_over)
        return True

    def _fill_wait_over(self) -> None:
        self._fill_timer = None
        self._dispatch()

    def _start(self, batch: list[WorkItem]) -> None:
        alone = not self._waiting and len(self._idle) == self._workers
        worker = self._idle.pop()
        self._busy_since[worker] = time.monotonic()
        self._under_load = any(item.request is not batch[0].request for item in batch)
        for item in batch:
            item.dispatched = True
        formed = time.perf_counter()
        self._observe_batch(batch, formed)
        followed_up = self._request_to_follow_up(batch)
        if followed_up is not None:
            self._following_up = True  # until its batch is handed back (``_finish``)
        self._threads.submit(worker, self._infer, worker, batch, formed, followed_up)
        if alone:
            self._alone_on = worker
            self._wake_ahead.started_alone()
        idle_spin.touch()

    def _request_to_follow_up(self, batch: list[WorkItem]) -> PendingRequest | None:
        """The request whose ``on_worker`` runs after this batch (already counted as running): one whose every text
        is in it, alone in it, with nothing else waiting, another worker free for what arrives meanwhile and no
        other follow-up running. A follow-up holds its worker (a sync: ~0.3 ms, at times a few ms), so it is for
        an engine that would idle anyway, and a stalled disk holds one worker, not several; under load a group
        commit on the committer thread covers many requests with one sync."""
        request = batch[0].request
        if request.on_worker is None or self._waiting or not self._idle or self._following_up \
                or len(batch) != len(request.items) or any(item.request is not request for item in batch):
            return None
        return request

    def _infer(self, worker: int, batch: list[WorkItem], formed: float, followed_up: PendingRequest | None) -> None:
        """On an engine worker thread: pad, run the engine (timed around the call alone), softmax, hand back.

        Whatever happens is handed back to the loop (an exception as the outcome), so no caller can hang and the
        worker's slot comes back: a ``BaseException`` too (``SystemExit`` or ``KeyboardInterrupt`` raised inside
        the engine call cannot stop the process from a worker thread; uncaught here, it would only be lost with
        the slot), and a result whose row count is not the batch's (its callers would wait for missing rows).
        """
        picked_up = time.perf_counter()
        outcome, unusable, engine_started, engine_ended = self._run([item.ids for item in batch])
        parts: list[Part] = [(batch, outcome, unusable)]
        if isinstance(outcome, Exception) and (reruns := self._per_request(batch, outcome)):
            parts, engine_ended = reruns, time.perf_counter()  # the input at fault fails its own request only
        after = _follow_up(followed_up, batch, outcome) \
            if followed_up is not None and not isinstance(outcome, BaseException) and unusable is None else None
        ran = Ran(formed, picked_up, engine_started, engine_ended, time.perf_counter())
        post(self._loop, self._finish, worker, parts, ran, followed_up is not None, after)  # closed: gone

    def _run(self, rows: list[np.ndarray]) -> tuple[np.ndarray | BaseException, np.ndarray | None, float, float]:
        """On an engine worker: the probabilities of a batch of token id ``rows`` and which rows are unusable, or
        what the engine raised (every outcome must reach the callers, never hang them); and the engine call's start
        and end."""
        started = time.perf_counter()
        try:
            input_ids, attention_mask = pad_batch(rows)
            started = time.perf_counter()
            logits = self.engine.run(input_ids, attention_mask)
            ended = time.perf_counter()
            probabilities = softmax(np.asarray(logits, dtype=np.float32))
            if len(probabilities) != len(rows):
                raise RuntimeError(f"the engine returned {len(probabilities)} rows for a batch of {len(rows)} texts")
            return probabilities, unusable_rows(probabilities), started, ended
        except BaseException as error:
            return error, None, started, time.perf_counter()

    def _per_request(self, batch: list[WorkItem], error: Exception) -> list[Part] | None:
        """After the engine failed on a batch: each request's texts once more on their own, and whose input is at
        fault, if the engine runs at all.

        The engine first runs a canary, one token that any model embeds (``CANARY``): if that fails too, the engine
        fails whatever it is given, and None leaves ``error`` (503, Retry-After) for every request of the batch. So
        does memory running out (``OutOfMemory``: not the input's fault, and a one-token canary would still fit).
        Otherwise each request's texts run again on their own (a lone request's too: a passing fault then goes
        unseen), so that an input the model fails on fails its own request only (a red team's tokenizer gave ids
        the model could not embed, and each text holding one failed its whole batch of other clients' texts), and a
        request whose texts fail twice gets ``InputFailed`` (500, no Retry-After: sending them again fails again).
        The canary replaced a rule that stopped the reruns after two failed in a row: two short failing requests,
        which the length order runs first, then failed every other request of their batch (a red team: 4-8 % of
        bystanders)."""
        if not _engine_fault(error) or isinstance(self._run([CANARY])[0], BaseException):
            return None
        by_request: dict[int, list[WorkItem]] = {}
        for item in batch:
            by_request.setdefault(id(item.request), []).append(item)
        self._throttle.log("rerun", logging.WARNING, "inference failed on a batch of %d texts from %d requests (%s); "
                           "each request's texts run again on their own", len(batch), len(by_request), error)
        reruns = [(items, *self._run([item.ids for item in items])[:2]) for items in by_request.values()]
        return [(items, _input_failed(outcome) if _engine_fault(outcome) else outcome, unusable)
                for items, outcome, unusable in reruns]

    def _finish(self, worker: int, parts: list[Part], ran: Ran, followed_up: bool,
                after: Callable[[], None] | None) -> None:
        self._to_loop.observe(time.perf_counter() - ran.handed_back)
        self._wake_ahead.back(ran.handed_back - ran.formed, alone=worker == self._alone_on)
        if worker == self._alone_on:
            self._alone_on = None
        self._busy_since.pop(worker, None)
        self._idle.append(worker)
        idle_spin.touch()
        if followed_up:
            self._following_up = False
        if after is not None:
            _run_after(after)
        self._engine_time.observe(ran.engine_ended - ran.engine_started)
        self._to_worker.observe(ran.picked_up - ran.formed)
        failed = [self._answer(batch, outcome, unusable, ran) for batch, outcome, unusable in parts]
        device = next(filter(None, failed), None)
        if device is not None:  # once per engine batch, however many of its requests' reruns failed
            self._metrics.inference_errors.labels(device).inc()
        self._dispatch()

    def _answer(self, batch: list[WorkItem], outcome: np.ndarray | BaseException, unusable: np.ndarray | None,
                ran: Ran) -> str | None:
        """Deliver the rows of ``batch`` (texts the model gave no usable scores for fail their requests), or fail
        every request with a text in it; when that was for an engine error, the device it failed on (``_finish``
        counts it), else None. An error may say which device failed (``server.oom.CpuFallbackFailed``: the CPU
        fallback of a CUDA engine); otherwise it is the engine's."""
        if not isinstance(outcome, BaseException):
            if unusable is not None:
                self._fail_unusable([item for item, bad in zip(batch, unusable, strict=True) if bad], len(batch))
            for item, row in zip(batch, outcome, strict=True):
                item.request.deliver(item.index, row, ran)  # a failed request's rows are dropped
            return None
        if isinstance(outcome, ServerError):
            self._fail(batch, outcome)
            if not isinstance(outcome, InferenceFailed):
                return None
            self._throttle.log(type(outcome).__name__, logging.ERROR, "inference failed on a batch of %d: %s",
                               len(batch), outcome)
            return getattr(outcome, "device", None) or self.engine.device
        detail = outcome if isinstance(outcome, Exception) else first_line(outcome)  # SystemExit(3) says "3"
        self._throttle.log("InferenceFailed", logging.ERROR, "inference failed on a batch of %d: %s", len(batch),
                           detail)
        self._fail(batch, InferenceFailed(f"inference failed: {detail}"))
        return self.engine.device

    def _observe_batch(self, batch: list[WorkItem], formed: float) -> None:
        m = self._metrics
        lengths = [item.length for item in batch]
        padded = len(batch) * max(lengths)
        m.batch_size.observe(len(batch))
        m.batch_tokens.observe(padded)
        m.padded_tokens.inc(padded)
        m.real_tokens.inc(sum(lengths))
        for item in batch:
            m.queue_wait.observe(formed - item.enqueued)

    def _fail_unusable(self, items: list[WorkItem], batch_size: int) -> None:
        """Fail the requests of texts the model gave NaN or infinite scores for; the rest of the batch is answered."""
        self._throttle.log("unusable", logging.ERROR, "inference gave NaN or infinite scores for %d of a batch of %d "
                           "texts: their requests are answered 500 model_output_invalid (damaged weights, or an fp16 "
                           "overflow on such inputs: try MODEL_VARIANT=fp32)", len(items), batch_size)
        self._metrics.inference_errors.labels(self.engine.device).inc()
        self._fail(items, ModelOutputInvalid(
            "the model gave no usable scores for this text (NaN or infinite): a fault of the serving model on this "
            "input, and retrying it gets the same; the operator has been told (ERROR log, "
            "sentiment_inference_errors_total)"))

    def _fail(self, batch: list[WorkItem], error: Exception) -> None:
        """Fail every request with a text in ``batch``; their texts still queued need not run."""
        requests = {id(item.request): item.request for item in batch}.values()
        for request in requests:
            request.fail(error)
        self._forget([item for request in requests for item in request.items])


_turn = operator.attrgetter("turn")
_length = operator.attrgetter("length")


def unusable_rows(probabilities: np.ndarray) -> np.ndarray | None:
    """Which rows hold a NaN or an infinity (NaN or +inf logits: softmax gives NaN), or None when none does (the
    usual case, one check of the whole batch)."""
    finite = np.isfinite(probabilities)
    return None if finite.all() else ~finite.all(axis=1)


CANARY = np.zeros(1, dtype=np.int64)  # one text of token id 0: every vocabulary has one


def _engine_fault(outcome: np.ndarray | BaseException) -> bool:
    """Whether an engine call's outcome is its own failure (an exception, or the ``InferenceFailed`` the engine's
    wrapper makes of one), not a result or an error with a meaning of its own (``OutOfMemory``)."""
    return isinstance(outcome, Exception) and (not isinstance(outcome, ServerError) or type(outcome) is InferenceFailed)


def _input_failed(error: Exception) -> InputFailed:
    """A rerun's failure, when the engine ran its canary (``InputFailed``)."""
    detail = error.message if isinstance(error, ServerError) else f"inference failed: {error}"
    return InputFailed(f"{detail}; it failed again on these texts alone while the engine ran other input, so the "
                       "fault is in this request's texts, and sending them again fails again")


def _follow_up(request: PendingRequest, batch: list[WorkItem], outcome: np.ndarray) -> Callable[[], None] | None:
    """Run ``request.on_worker`` with its results in input order (the batch is in length order); returns what it
    has the loop run. A failure is logged and leaves the results as they are (the caller then does without what it
    would have done)."""
    try:
        rows: list[np.ndarray] = [outcome[0]] * len(batch)
        for item, row in zip(batch, outcome, strict=True):
            rows[item.index] = row
        return request.on_worker(rows)
    except BaseException:  # even SystemExit: the batch must still be handed back (``_infer``)
        log.exception("a request's follow-up on the engine worker failed")
        return None


def _run_after(after: Callable[[], None]) -> None:
    """On the loop: what a follow-up left to run there; an exception is logged and the batch's callers are still
    answered (SystemExit and KeyboardInterrupt on the loop stop the server, as anywhere else on it)."""
    try:
        after()
    except Exception:
        log.exception("a request's follow-up on the loop failed")
