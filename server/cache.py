"""PredictionCache: a byte-bounded LRU of predictions keyed by (model, text), plus single-flight.

The model part of the key is the serving runtime's own (``ModelRuntime.load_key``: one per load, not the version):
a computation still running on the model a reload replaced is never joined by a request to the new one, whatever
name, version and labels the two claim (a red team's copy of a model under another name, same version, other
labels, got 36 of 17,800 answers in the first model's labels while the cache went by the version).

Why bytes and not entries: texts range from a word to ``MAX_TEXT_CHARS``, so an entry count says
nothing about memory, and the cache must never be what pushes the pod into OOMKilled. Each entry is
charged what it really holds (measured with ``sys.getsizeof``): the key tuple, the text, the stored
value and its packed numbers. The charge is packed with the entry (no side table to pay for) and
refunded on eviction, so the figure cannot drift. The ``OrderedDict``'s own tables are charged live
(``sys.getsizeof``): they swing between ~70 and ~170 bytes per entry as the hash table fills, doubles
and collects deleted slots under LRU churn, too much to fold into a per-entry constant. Objects
shared by every entry (the model key, label strings, the labels tuple) are kept once and not
charged. ``tests/test_cache.py`` checks the figure against ``tracemalloc``.

Single-flight: concurrent misses for one (model, text) share one computation, so a burst of the same text costs
one engine slot. A caller computes the misses no one else is computing in its own task (no task, no shield, no
extra loop turns), then waits for the ones others are computing (those run meanwhile all the same). It joins
only a computation of no more characters (what the engine's work, and so the wait, goes by) than its own misses
hold: a computation answers all its texts at once, and a red team's one-text request that shared its text with a
request of 200 long ones waited 30 s for all of them (503 ``deadline``; 0.05 s alone). A smaller one computes
the text itself instead, and later callers join that one. Should a caller be cancelled (its client disconnected)
while others still wait for some of its texts, those texts (and no others) are computed again in a task of its
own, so a joiner never inherits the cancellation. A cancelled caller that no one waits for leaves nothing
behind: its texts are not computed for nobody. A joiner counts as waiting until it leaves, answered or cancelled
(``_joiners``), so one cancelled before its starter does not make that starter's cancellation compute for no
one. Whatever happens to a computation (an error, a cancellation, a failure while filling the cache), every
future it started is settled and leaves the in-flight table: a waiter is never left pending.

Hits and misses are counted only while the cache is on (``max_bytes`` > 0): a disabled cache is never
looked up, so ``sentiment_cache_misses_total`` does not climb with every text it could never have held.

Not thread-safe: use it from the event loop (the batcher's worker thread never touches it).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import TypeVar

from server.metrics import Metrics
from server.primitives import InputFailed, Prediction

log = logging.getLogger(__name__)
_EMPTY_TABLE = sys.getsizeof(OrderedDict())  # the container itself, charged to no one

Key = tuple[Hashable, str]  # (the model that computes, the text)
Compute = Callable[[list[str]], Awaitable[list[Prediction]]]
Computation = dict[Key, asyncio.Future[Prediction]]  # the texts one ``compute`` call answers, each's future
Flight = tuple[asyncio.Future[Prediction], int]  # a text's future, and its computation's characters
_Shared = TypeVar("_Shared", bound=Hashable)


def _pack(size: int, prediction: Prediction) -> bytes:
    """The entry's charge, score, probabilities and truncation flag as one bytes object (one small allocation,
    exact size)."""
    probabilities = prediction.probabilities.values()
    return struct.pack(f"Q{len(probabilities) + 1}d?", size, prediction.score, *probabilities, prediction.truncated)


def entry_size(text: str, prediction: Prediction) -> int:
    """Bytes one entry's objects hold, its slot in the table aside (see the module docstring)."""
    key = ("", text)
    value = (prediction.label, (), _pack(0, prediction))
    return sys.getsizeof(key) + sys.getsizeof(text) + sys.getsizeof(value) + sys.getsizeof(value[2])


class PredictionCache:
    def __init__(self, max_bytes: int, metrics: Metrics) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self._max_bytes = max_bytes
        self._metrics = metrics
        # value: (label, labels in probability order, _pack(charge, prediction)); see entry_size
        self._entries: OrderedDict[Key, tuple[str, tuple[str, ...], bytes]] = OrderedDict()
        self._payload = 0  # sum of entry_size over the entries
        self._shared: dict[Hashable, Hashable] = {}
        self._inflight: dict[Key, Flight] = {}
        self._joiners: dict[asyncio.Future[Prediction], int] = {}  # in flight: callers waiting that did not start it
        self._tasks: set[asyncio.Task[None]] = set()
        self._generation = 0  # bumped by clear(): computations started before it are not stored
        metrics.cache_limit.set(max_bytes)
        self._export()

    @property
    def bytes(self) -> int:
        return self._payload + sys.getsizeof(self._entries) - _EMPTY_TABLE

    @property
    def entries(self) -> int:
        return len(self._entries)

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    def get(self, model: Hashable, text: str) -> Prediction | None:
        """The cached prediction (``cached=True``) or None; counts a hit or a miss while the cache is on."""
        if not self._max_bytes:
            return None
        key = (model, text)
        value = self._entries.get(key)
        if value is None:
            self._metrics.cache_misses.inc()
            return None
        self._entries.move_to_end(key)
        self._metrics.cache_hits.inc()
        label, labels, packed = value
        _, score, *probabilities, truncated = struct.unpack(f"Q{len(labels) + 1}d?", packed)
        probabilities_by_label = dict(zip(labels, probabilities, strict=True))
        return Prediction(label=label, score=score, probabilities=probabilities_by_label, cached=True,
                          truncated=truncated)

    def put(self, model: Hashable, text: str, prediction: Prediction) -> None:
        """Store, evicting least recently used entries to stay within max_bytes; too large an entry is not kept."""
        key = (self._share(model), text)
        if key in self._entries:
            self._remove(key)
        size = entry_size(text, prediction)
        if size > self._max_bytes:
            self._export()
            return
        labels = self._share(tuple(self._share(label) for label in prediction.probabilities))
        self._entries[key] = (self._share(prediction.label), labels, _pack(size, prediction))
        self._payload += size
        evicted = 0
        while self._entries and self.bytes > self._max_bytes:  # the insert may also have grown the table
            oldest = next(iter(self._entries))
            self._remove(oldest)
            evicted += oldest is not key
        if not self._entries:
            self._entries = OrderedDict()  # a bound this small cannot carry even the empty table
        if evicted:
            self._metrics.cache_evictions.inc(evicted)
        self._export()

    def shed(self, fraction: float) -> int:
        """Evict the least recently used ``fraction`` of the entries' bytes; returns the bytes freed.

        The table is rebuilt afterwards (a dict never shrinks on deletion, and shedding exists to give memory
        back), so it shrinks in proportion.
        """
        before = self.bytes
        keep = self._payload * (1 - min(max(fraction, 0.0), 1.0))
        evicted = 0
        while self._entries and self._payload > keep:
            self._remove(next(iter(self._entries)))
            evicted += 1
        if evicted:
            self._entries = OrderedDict(self._entries)
            self._metrics.cache_evictions.inc(evicted)
            self._export()
        return before - self.bytes

    def clear(self) -> None:
        """Drop every entry (the model changed); computations in flight still answer their waiters."""
        self._entries = OrderedDict()
        self._shared.clear()
        self._payload = 0
        self._generation += 1
        self._export()

    async def get_or_compute(self, model: Hashable, texts: list[str], compute: Compute) -> list[Prediction]:
        """Predictions in input order: hits at once, misses via one ``compute`` call shared with concurrent callers
        (a computation under way is joined only when it holds no more characters than this call's own misses:
        module docstring).

        ``compute`` gets the distinct texts that no one is computing yet and must return one prediction each,
        in order. Its exception reaches every caller waiting on those texts, and nothing is cached; but for
        ``InputFailed`` (the input of the request that started it is at fault), a caller that had joined it computes
        its own texts again (``_compute_again``).
        """
        results: list[Prediction | None] = [None] * len(texts)
        waiting: list[tuple[int, asyncio.Future[Prediction]]] = []
        started: Computation = {}
        own = started.values()  # a failure of these is this caller's own input's
        joined: list[asyncio.Future[Prediction]] = []  # someone else's computations this caller waits for
        misses: dict[Key, list[int]] = {}  # each distinct text not cached, at its indexes
        for index, text in enumerate(texts):
            hit = self.get(model, text)
            if hit is None:
                misses.setdefault((model, text), []).append(index)
            else:
                results[index] = hit
        own_chars = sum(len(text) for _, text in misses)
        for key, indexes in misses.items():
            flight = self._inflight.get(key)
            if flight is not None and flight[1] <= own_chars:  # not held behind more work than its own
                future = flight[0]
                joined.append(future)
                self._joiners[future] = self._joiners.get(future, 0) + 1
            else:
                future = started[key] = asyncio.get_running_loop().create_future()
                # Mark the exception retrieved: a waiter that stopped at an earlier failure never awaits this one.
                future.add_done_callback(lambda f: f.cancelled() or f.exception())
            waiting += [(index, future) for index in indexes]
        self._take_off(started)
        try:
            if started:
                await self._fill(model, started, compute, in_caller=True)
            again: list[int] = []  # joined texts whose computation another request's input failed
            for index, future in waiting:
                try:
                    # a cancelled caller must not cancel a shared future: shield what is still running
                    results[index] = future.result() if future.done() else await asyncio.shield(future)
                except InputFailed:
                    if future in own:
                        raise
                    again.append(index)
            if again:
                await self._compute_again(texts, again, results, compute)
        finally:
            for future in joined:  # answered, failed or cancelled: no longer waiting
                if self._joiners[future] == 1:
                    del self._joiners[future]
                else:
                    self._joiners[future] -= 1
        return results  # type: ignore[return-value]  # every slot is filled above

    @staticmethod
    async def _compute_again(texts: list[str], again: list[int], results: list[Prediction | None],
                             compute: Compute) -> None:
        """Compute the texts at ``again`` for this caller alone: the computation it had joined failed for the input
        of the request that started it (``InputFailed``: its other texts), which says nothing of these (a red team's
        request holding a text the model fails on failed every request that shared its other text with 500)."""
        distinct = list(dict.fromkeys(texts[index] for index in again))
        by_text = dict(zip(distinct, await compute(distinct), strict=True))
        for index in again:
            results[index] = by_text[texts[index]]

    def _fill_in_task(self, model: Hashable, started: Computation, compute: Compute) -> None:
        """Compute ``started`` (texts a cancelled caller had started that others wait for) in a task of its own; a
        later caller joins it by its own size."""
        self._take_off({key: future for key, future in started.items() if self._in_flight(key) is future})
        task = asyncio.create_task(self._fill(model, started, compute))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fill(self, model: Hashable, started: Computation, compute: Compute, in_caller: bool = False) -> None:
        """Answer the started futures from one ``compute`` call, then cache the results.

        The ``finally`` settles whatever is still pending (cancelled, or a bug in settling or caching), so no
        waiter can hang on a future this computation owns; ``in_caller``: a cancelled caller instead hands its
        computation to a task (module docstring), whose ``finally`` then settles the futures.
        """
        generation = self._generation
        handed_over = False
        try:
            predictions = await compute([text for _, text in started])
            if len(predictions) != len(started):
                raise RuntimeError(f"compute returned {len(predictions)} predictions for {len(started)} texts")
            for future, prediction in zip(started.values(), predictions, strict=True):
                future.set_result(prediction)
            if self._max_bytes and generation == self._generation:
                for (_, text), prediction in zip(started, predictions, strict=True):
                    self.put(model, text, prediction)
        except asyncio.CancelledError:
            awaited = {key: future for key, future in started.items() if future in self._joiners}
            if in_caller and awaited:  # others still wait for these: they get them from a task
                handed_over = True
                self._release({key: future for key, future in started.items() if key not in awaited}, None)
                self._fill_in_task(model, awaited, compute)
            raise
        except Exception as exc:
            if all(future.done() for future in started.values()):  # answered; only caching them failed
                log.exception("caching %d computed predictions failed (their requests were answered)", len(started))
            self._release(started, exc)
        finally:
            if not handed_over:
                self._release(started, None)  # cancelled (loop shutdown): waiters must not hang either

    def _release(self, started: Computation, exc: Exception | None) -> None:
        """Take a computation's keys out of flight; fail (or, with no exception, cancel) its futures still pending."""
        for key, future in started.items():
            if self._in_flight(key) is future:
                del self._inflight[key]
            if future.done():
                continue
            if exc is None:
                future.cancel()
            else:
                future.set_exception(exc)

    def _take_off(self, computation: Computation) -> None:
        """Put each text of ``computation`` in flight, with its characters: what a joiner would wait for."""
        chars = sum(len(text) for _, text in computation)
        for key, future in computation.items():
            self._inflight[key] = future, chars

    def _in_flight(self, key: Key) -> asyncio.Future[Prediction] | None:
        flight = self._inflight.get(key)
        return None if flight is None else flight[0]

    def _remove(self, key: Key) -> None:
        (size,) = struct.unpack_from("Q", self._entries.pop(key)[2])
        self._payload -= size

    def _share(self, value: _Shared) -> _Shared:
        return self._shared.setdefault(value, value)  # type: ignore[return-value]

    def _export(self) -> None:
        self._metrics.cache_bytes.set(self.bytes)
        self._metrics.cache_entries.set(len(self._entries))
