"""The request path below HTTP: normalization, cache, tokenization, batcher, prediction metrics.

request -> normalize -> cache (per text, single-flight) -> misses tokenized
-> batcher -> probabilities -> Prediction -> cache filled.

STRICT_TRUNCATION is judged per request, before the shared computation: a
request's texts are tokenized up front and a text over the model's maximum
length fails that request alone with a 422 naming it by its index in that request (``texts[i]``, or as the
request's protocol spells it: ``inputs[i]``, ``instances[i]``). A
text is therefore never refused inside a computation shared with other
requests (which would fail them too, naming an index in someone else's list).
Otherwise a text over the maximum length is cut to it, and its prediction
says ``truncated`` (cache hits too: the cache keeps the flag).

The drift families (``sentiment_predictions_total``, ``sentiment_prediction_
confidence``, ``sentiment_low_confidence_predictions_total``) and
``sentiment_truncated_texts_total`` count what the model computed: each
computation's texts once. Cache hits and requests that shared a concurrent
computation are not counted again, so a hot text answered from the cache
cannot mask (or fake) a shift in what the model says. They carry the model's
name and version (``Metrics.serving_model``); a computation that finishes on the
model just swapped out is counted in its series, which are kept until the next
swap (one finishing on a model two swaps old is not: its series are gone).

Low confidence is relative to the number of labels: LOW_CONFIDENCE_THRESHOLD
is stated for two labels (0.6 = a fifth of the way from chance, 0.5, to
certainty) and a model with n labels uses the same fraction of the way from
its chance, 1/n (``low_confidence_threshold``: 0.467 for three labels).

With the cache off (``CACHE_MAX_BYTES=0`` or ``ENABLE_MODEL_CACHING=false``) a request computes its own texts
directly, without the single-flight machinery (a shared future per text, a task, a shield): two requests sending
the same text at the same moment then both compute it, in the same batch as a rule, which costs that text's
engine time once more; the cache is what shares work between requests. A text repeated within one request is
computed once either way.

Stage timings (``StageTimings``, TEI's timing headers): the predictor measures tokenization and counts the tokens
each computation sends to the engine; the batcher adds queue and engine time.

Long requests' text work runs on the predictor's text thread (``text_work``), not the event loop: over
``LOOP_TEXT_CHARS`` characters, the request's normalization, checks and tokenization are handed to one thread of
their own. On the loop, four 1 MB bodies of 50 texts of 20,000 characters held it 0.2-0.4 s each to tokenize
(more while the engine shared the cores), and a readiness probe beside them waited up to 2.2 s: no other request,
probe or gRPC call is answered while the loop tokenizes. The tokenizer lets go of the GIL while it works, so the
loop runs on meanwhile. One thread, so that long requests are tokenized one at a time, as they were on the loop:
their transient memory is what the memory plan saw. A short request stays on the loop: the hand-off would cost it
more than its tokenization (~50 us for a sentence). A reload drains the model it replaced only once the predictions
started on it are done (``finished_with``): one still preparing its texts on the thread would otherwise find that
model's batcher closed. At shutdown, requests still waiting for the thread fail with ``Draining``
(``server.text_thread``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from server.batcher import OnWorker
from server.cache import PredictionCache
from server.metrics import Metrics
from server.primitives import TEXTS, Prediction, StageTimings, TextName
from server.runtime import ModelRuntime
from server.text_thread import TextThread

log = logging.getLogger(__name__)
Encode = Callable[[list[str]], tuple[list[np.ndarray], list[bool]]]
T = TypeVar("T")
LOOP_TEXT_CHARS = 16_384  # a request's texts up to this many characters are prepared on the loop (~3 ms to tokenize)


def normalize(text: str) -> str:
    """The text as the model and the cache see it: Unicode NFC, outer whitespace removed.

    A text that NFC changes is first made stream-safe (``stream_safe``): NFC's canonical reordering is quadratic in
    the length of a run of combining marks, and 20,000 marks of alternating classes held the event loop 0.33 s
    (a red team's 1 MB body of 25 of them stopped every protocol and /health for 8 s)."""
    if not unicodedata.is_normalized("NFC", text):  # a quick check for most texts, and fast on such runs
        text = unicodedata.normalize("NFC", stream_safe(text))
    return text.strip()


STREAM_SAFE_RUN = 30  # Unicode's stream-safe text format (UAX #15): at most 30 combining marks in a row
GRAPHEME_JOINER = "\u034f"  # what that format puts between longer runs: invisible, and a starter for NFC


def non_starter(char: str) -> bool:
    """Whether NFC may reorder ``char`` among its neighbours (UAX #15 counts it as a non-starter)."""
    return bool(unicodedata.combining(char) or (
        unicodedata.decomposition(char) and unicodedata.combining(unicodedata.normalize("NFD", char)[0])))


def stream_safe(text: str) -> str:
    """``text`` with a combining grapheme joiner after every 30 non-starters in a row (UAX #15, D4): no language
    needs more, and NFC then orders each run of at most 30 characters' marks, in linear time overall."""
    return _long_runs().sub(lambda run: GRAPHEME_JOINER.join(
        run[0][at : at + STREAM_SAFE_RUN] for at in range(0, len(run[0]), STREAM_SAFE_RUN)), text)


@functools.cache
def _long_runs() -> re.Pattern[str]:
    """Runs of more than ``STREAM_SAFE_RUN`` non-starters, as a pattern built once from this Python's Unicode
    tables (~0.2 s: ``Predictor`` builds it at start-up, not a request). A non-starter is a combining mark, or a
    character whose decomposition begins with one: U+0F73, U+0F75 and U+0F81 have class 0 but NFD splits each into
    two marks of different classes, and a red team's 1 MB body of them held the loop 21 s past the first version."""
    marks = [code for code in range(sys.maxunicode + 1) if non_starter(chr(code))]
    ranges: list[list[int]] = []
    for code in marks:
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])
    members = "".join(re.escape(chr(low)) + (f"-{re.escape(chr(high))}" if high > low else "") for low, high in ranges)
    return re.compile(f"[{members}]{{{STREAM_SAFE_RUN + 1},}}")


def timed(work: Callable[..., T], *args) -> tuple[T, float]:
    """``work(*args)`` and the seconds it took, measured where it runs (on the text thread: not its queue's wait)."""
    started = time.perf_counter()
    return work(*args), time.perf_counter() - started


def prediction_of(labels: list[str], probabilities: np.ndarray, truncated: bool) -> Prediction:
    """One text's prediction from its label probabilities."""
    values = probabilities.tolist()  # Python floats at once: numpy's argmax and scalars cost more for 2 labels
    best = max(range(len(values)), key=values.__getitem__)
    return Prediction(
        label=labels[best],
        score=values[best],
        probabilities=dict(zip(labels, values, strict=True)),
        truncated=truncated,
    )


def low_confidence_threshold(configured: float, labels: int) -> float:
    """LOW_CONFIDENCE_THRESHOLD (stated for two labels) as the same fraction of the way from chance to certainty
    for a model with ``labels`` labels."""
    chance = 1.0 / labels
    return chance + (configured - 0.5) / 0.5 * (1.0 - chance)


class Predictor:
    def __init__(self, runtime: ModelRuntime, cache: PredictionCache, metrics: Metrics,
                 low_confidence_threshold: float) -> None:
        self.runtime = runtime
        self.cache = cache
        self._metrics = metrics
        self._low_confidence = low_confidence_threshold
        self._series: dict[tuple[str, str], _ModelSeries] = {}
        self._text_thread = TextThread()
        self._under_way: dict[int, int] = {}  # predictions under way per runtime (``load_key``)
        self._finished: dict[int, asyncio.Event] = {}  # set when a runtime awaited by ``finished_with`` has none
        self._serve(runtime, previous=None)
        _long_runs()  # built now, not on the loop inside the first request whose text NFC changes

    async def text_work(self, texts: list[str], work: Callable[..., T], *args) -> T:
        """``work(*args)``, the text work of a request holding ``texts``: on the text thread when they are long
        (module docstring), else here."""
        if sum(map(len, texts)) <= LOOP_TEXT_CHARS:
            return work(*args)
        return await self._text_thread.run(work, *args)

    def close(self) -> None:
        """At shutdown: requests still waiting for the text thread fail with ``Draining`` (``server.text_thread``)."""
        self._text_thread.close()

    def _done(self, load_key: int) -> None:
        left = self._under_way[load_key] - 1
        if left:
            self._under_way[load_key] = left
            return
        del self._under_way[load_key]
        finished = self._finished.pop(load_key, None)
        if finished is not None:
            finished.set()

    async def finished_with(self, runtime: ModelRuntime) -> None:
        """Return once no prediction started on ``runtime`` is under way. For a runtime swapped out, which no new
        prediction can start on: one that had started may still be preparing its texts on the text thread, and
        draining the runtime's batcher then would refuse its submission (503 ``draining`` in mid-reload)."""
        if runtime.load_key in self._under_way:
            await self._finished.setdefault(runtime.load_key, asyncio.Event()).wait()

    def swap(self, runtime: ModelRuntime) -> ModelRuntime:
        """Serve ``runtime`` from now on; returns the previous one (to drain). The cache is emptied."""
        previous, self.runtime = self.runtime, runtime
        self.cache.clear()
        self._serve(runtime, previous)
        return previous

    def _serve(self, runtime: ModelRuntime, previous: ModelRuntime | None) -> None:
        labels = runtime.labels()
        self._metrics.serving_model(runtime.identity.name, runtime.identity.version, labels)
        series = self._series_of(runtime)
        # The drift families' children of the serving model and of the one before it, whose series the metrics
        # keep until the next swap (``Metrics.serving_model``).
        kept = {} if previous is None else {key: s for key, s in self._series.items() if key == model_key(previous)}
        self._series = {**kept, model_key(runtime): series}
        log.info("model %s %s: labels %s, low-confidence threshold %.3f", runtime.identity.name,
                 runtime.identity.version, labels, series.threshold)

    @contextmanager
    def using(self) -> Iterator[ModelRuntime]:
        """The serving model, held until the block ends: a reload drains it only after (``finished_with``)."""
        runtime = self.runtime
        self._under_way[runtime.load_key] = self._under_way.get(runtime.load_key, 0) + 1
        try:
            yield runtime
        finally:
            self._done(runtime.load_key)

    async def predict(self, texts: list[str], timeout: float | None = None, timings: StageTimings | None = None,
                      on_worker: OnWorker | None = None, name: TextName = TEXTS,
                      runtime: ModelRuntime | None = None, scope: str | None = None) -> list[Prediction]:
        """Predictions in input order; ``timings`` (when given) gets what this request computed itself; a text
        strict mode refuses is named by ``name``. ``runtime``: the model the caller holds (``using``); by default the
        serving one, held for the call. ``scope``: only cached predictions, and computations under way, of requests
        of the same scope serve this one (``serving.cache_scope``); None: those of any request.

        ``on_worker`` (``Batcher.submit``) is passed on only when this request computes all of its texts itself,
        in its own order: no cache hit, no text shared with another request's computation, no repeated text; and
        only once: should the cache run the computation again (this caller went away while others waited on it),
        the rerun is theirs, and the follow-up would record this request's predictions a second time.
        """
        if runtime is not None:  # held by the caller (``using``)
            return await self._predict(runtime, texts, timeout, timings, on_worker, name, scope)
        with self.using() as runtime:
            return await self._predict(runtime, texts, timeout, timings, on_worker, name, scope)

    async def _predict(self, runtime: ModelRuntime, texts: list[str], timeout: float | None,
                       timings: StageTimings | None, on_worker: OnWorker | None, name: TextName,
                       scope: str | None) -> list[Prediction]:
        timings = timings if timings is not None else StageTimings()
        encode = await self._strict_encoder(runtime, texts, timings, name) if runtime.encoder.strict else \
            runtime.encoder.encode_marking_truncation

        follow_up = [on_worker]  # handed to the first computation only (docstring)

        async def compute(misses: list[str]) -> list[Prediction]:
            handed = follow_up.pop() if follow_up and misses == texts else None
            (rows, truncated), took = await self.text_work(misses, timed, encode, misses)
            timings.tokenization += took
            timings.compute_tokens += sum(len(row) for row in rows)
            probabilities = await runtime.batcher.submit(rows, timeout, timings, handed)
            labels = runtime.labels()
            predictions = [prediction_of(labels, row, cut) for row, cut in zip(probabilities, truncated, strict=True)]
            self._observe(runtime, predictions)
            return predictions

        if not self.cache.max_bytes:  # no cache: nothing to share between requests (module docstring)
            return await self._compute_distinct(texts, compute)
        return await self.cache.get_or_compute((runtime.load_key, scope), texts, compute)

    @staticmethod
    async def _compute_distinct(texts: list[str], compute: Callable) -> list[Prediction]:
        """``compute`` each distinct text once, answered in input order."""
        distinct = list(dict.fromkeys(texts))
        if len(distinct) == len(texts):
            return await compute(texts)
        by_text = dict(zip(distinct, await compute(distinct), strict=True))
        return [by_text[text] for text in texts]

    async def _strict_encoder(self, runtime: ModelRuntime, texts: list[str], timings: StageTimings,
                              name: TextName) -> Encode:
        """Tokenize the request's own texts now (InputTooLong names the text by ``name``, its index in this request);
        misses reuse them.

        The misses a computation gets are always some of the request's texts, so nothing is tokenized twice.
        Nothing is truncated in strict mode: a text over the maximum length was refused.
        """
        ids, took = await self.text_work(texts, timed, runtime.encoder.encode, texts, name)
        timings.tokenization += took
        ids_by_text = dict(zip(texts, ids, strict=True))
        return lambda misses: ([ids_by_text[text] for text in misses], [False] * len(misses))

    def _observe(self, runtime: ModelRuntime, predictions: list[Prediction]) -> None:
        series = self._series.get(model_key(runtime))
        if series is None:  # swapped out twice while computing: its series are gone (module docstring)
            return
        for p in predictions:
            series.by_label[p.label].inc()
            series.confidence.observe(p.score)
            if p.score < series.threshold:
                series.low.inc()
            if p.truncated:
                series.truncated.inc()

    def _series_of(self, runtime: ModelRuntime) -> _ModelSeries:
        """The serving model's series, looked up once per model rather than per prediction (``labels()`` takes a
        lock and builds a key each time)."""
        m, name, version, labels = self._metrics, runtime.identity.name, runtime.identity.version, runtime.labels()
        return _ModelSeries(
            low_confidence_threshold(self._low_confidence, len(labels)),
            {label: m.predictions.labels(name, version, label) for label in labels},
            *(family.labels(name, version) for family in (m.confidence, m.low_confidence, m.truncated)))


def model_key(runtime: ModelRuntime) -> tuple[str, str]:
    return runtime.identity.name, runtime.identity.version


@dataclass(frozen=True)
class _ModelSeries:
    threshold: float
    by_label: dict
    confidence: object
    low: object
    truncated: object
