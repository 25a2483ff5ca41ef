"""Predictor on a real tiny model: strict truncation judged per request, drift metrics count computations once."""

from __future__ import annotations

import asyncio
import threading
import time
import unicodedata
from types import SimpleNamespace

import numpy as np
import pytest

from server.batcher import Batcher
from server.cache import PredictionCache
from server.metrics import Metrics
from server.predictor import GRAPHEME_JOINER, LOOP_TEXT_CHARS, STREAM_SAFE_RUN, Predictor, normalize
from server.primitives import Draining, InputFailed, InputTooLong, ModelIdentity, StageTimings
from server.runtime import ModelRuntime
from tests.test_batcher import RecordingEngine
from tests.test_batcher import settings as batcher_settings

LONG = "word " * 300  # over 300 tokens; the tiny model accepts 128


@pytest.fixture
async def serving(make_settings):
    """(predictor, metrics) over a loaded tiny model, strict truncation on, every prediction below the threshold."""
    metrics = Metrics()
    runtime = ModelRuntime.load(make_settings(strict_truncation=True), metrics)
    runtime.batcher.start()
    predictor = Predictor(runtime, PredictionCache(1_000_000, metrics), metrics, low_confidence_threshold=1.01)
    yield predictor, metrics
    await runtime.batcher.drain()


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    """The sum of the samples of ``name`` whose labels include ``labels`` (any model and version); None if none."""
    found = [sample.value for family in metrics.registry.collect() for sample in family.samples
             if sample.name == name and labels.items() <= sample.labels.items()]
    return sum(found) if found else None


async def test_strict_truncation_names_the_requests_own_index(serving) -> None:
    predictor, _ = serving
    other = asyncio.create_task(predictor.predict(["fine"]))
    await asyncio.sleep(0)  # "fine" is now being computed for the other request

    with pytest.raises(InputTooLong) as refused:
        await asyncio.wait_for(predictor.predict(["fine", LONG]), timeout=30)

    assert "texts[1] has 302 tokens" in refused.value.message and "at most 128" in refused.value.message
    assert (await asyncio.wait_for(other, timeout=30))[0].label in {"NEGATIVE", "POSITIVE"}


async def test_strict_truncation_does_not_fail_a_request_sharing_a_text(serving) -> None:
    predictor, _ = serving
    long_one = asyncio.create_task(predictor.predict(["fine", LONG]))
    sharer = asyncio.create_task(predictor.predict(["fine"]))

    done = await asyncio.wait_for(asyncio.gather(long_one, sharer, return_exceptions=True), timeout=30)

    assert isinstance(done[0], InputTooLong) and "texts[1]" in done[0].message
    assert not isinstance(done[1], BaseException), done[1]
    assert done[1][0].label in {"NEGATIVE", "POSITIVE"}


async def test_drift_metrics_count_each_computation_once_and_no_cache_hit(serving) -> None:
    predictor, metrics = serving
    await predictor.predict(["a fine film", "a dull film"])
    again = await predictor.predict(["a fine film", "a dull film"])
    shared = await asyncio.wait_for(asyncio.gather(*(predictor.predict(["moving"]) for _ in range(3))), timeout=30)

    assert [p.cached for p in again] == [True, True]
    assert len(shared) == 3
    by_label = sum(value(metrics, "sentiment_predictions_total", label=x) or 0 for x in ("NEGATIVE", "POSITIVE"))
    assert by_label == 3  # three texts computed; the hits and the two shared waiters are not counted again
    assert value(metrics, "sentiment_prediction_confidence_count") == 3
    assert value(metrics, "sentiment_low_confidence_predictions_total") == 3


async def test_the_serving_models_labels_exist_at_zero_and_follow_a_swap(serving) -> None:
    """A computation that finishes on the model just swapped out is counted in that model's series (kept one swap
    longer); two swaps later its series are gone and it is not counted."""
    predictor, metrics = serving
    assert value(metrics, "sentiment_predictions_total", label="NEGATIVE") == 0
    assert value(metrics, "sentiment_predictions_total", label="POSITIVE") == 0

    other = SimpleNamespace(labels=lambda: ["negative", "neutral", "positive"],
                            identity=SimpleNamespace(name="other", version="v2"))
    real = predictor.swap(other)
    assert [value(metrics, "sentiment_predictions_total", model="other", version="v2", label=x)
            for x in ("negative", "neutral", "positive")] == [0, 0, 0]
    assert value(metrics, "sentiment_prediction_confidence_count", model="other", version="v2") == 0

    def counted_for_real() -> float:
        return sum(value(metrics, "sentiment_predictions_total", model=real.identity.name, label=x) or 0
                   for x in ("NEGATIVE", "POSITIVE"))

    predictor.runtime = real  # stands in for a batch the swapped-out model still runs (the stub cannot compute)
    await predictor.predict(["a batch in flight at the swap"])
    assert counted_for_real() == 1
    assert value(metrics, "sentiment_low_confidence_predictions_total", model=real.identity.name) is not None

    predictor.runtime = other
    predictor.swap(SimpleNamespace(labels=lambda: ["a", "b"], identity=SimpleNamespace(name="third", version="v3")))
    assert value(metrics, "sentiment_predictions_total", model=real.identity.name, label="POSITIVE") is None
    predictor.runtime = real  # two swaps old now; the fixture drains the real runtime
    await predictor.predict(["finished after two swaps"])
    assert counted_for_real() == 0


async def test_with_the_cache_off_a_request_computes_each_distinct_text_once(make_settings) -> None:
    metrics = Metrics()
    runtime = ModelRuntime.load(make_settings(), metrics)
    runtime.batcher.start()
    predictor = Predictor(runtime, PredictionCache(0, metrics), metrics, low_confidence_threshold=0.6)
    try:
        got = await asyncio.wait_for(predictor.predict(["fine", "a dull film", "fine"]), timeout=30)
    finally:
        await runtime.batcher.drain()
    assert got[0] == got[2] and not got[0].cached
    assert sum(value(metrics, "sentiment_predictions_total", label=x) or 0 for x in ("NEGATIVE", "POSITIVE")) == 2


class FakeEncoder:
    strict = False

    @staticmethod
    def encode_marking_truncation(texts: list[str]):
        return [np.array([len(text)], dtype=np.int64) for text in texts], [False] * len(texts)


def fake_runtime(batcher: Batcher, name: str, labels: list[str], version: str = "1") -> SimpleNamespace:
    """What the predictor reads of a ``ModelRuntime``, over ``batcher`` and ``FakeEncoder``; a load of its own."""
    fake_runtime.loads += 1
    return SimpleNamespace(batcher=batcher, encoder=FakeEncoder(), labels=lambda: labels, load_key=fake_runtime.loads,
                           identity=ModelIdentity(name=name, version=version, variant="fp32", provider="cpu",
                                                  device="cpu"))


fake_runtime.loads = 0


async def test_a_request_after_a_swap_never_joins_the_replaced_models_computation() -> None:
    """The cache joined computations in flight by version: a request to a new model that claimed the version of the
    one it replaced (another name, other labels) got the replaced model's answer (a red team's 36 of 17,800)."""
    metrics = Metrics()
    batchers = [Batcher(RecordingEngine(delay=0.2), batcher_settings(), metrics) for _ in range(2)]
    for batcher in batchers:
        batcher.start()
    first = fake_runtime(batchers[0], "first", ["negative", "positive"])
    predictor = Predictor(first, PredictionCache(1 << 20, metrics), metrics, low_confidence_threshold=0.6)
    try:
        before = asyncio.ensure_future(predictor.predict(["hello"]))
        await asyncio.sleep(0.05)  # "hello" is on the first model's engine
        predictor.swap(fake_runtime(batchers[1], "second", ["bad", "good"]))
        after = await asyncio.wait_for(predictor.predict(["hello"]), 30)
        assert after[0].label in {"bad", "good"} and not after[0].cached
        assert (await asyncio.wait_for(before, 30))[0].label in {"negative", "positive"}
    finally:
        for batcher in batchers:
            await batcher.drain()


async def test_a_computation_rerun_for_others_does_not_run_the_gone_caller_s_follow_up_again() -> None:
    """The cache reruns a computation for the requests waiting on it when its own caller goes away; the caller's
    follow-up (ack mode: its records synced on the engine worker) must not run a second time with the rerun."""
    metrics = Metrics()
    batcher = Batcher(RecordingEngine(delay=0.05), batcher_settings(engine_workers=3), metrics)
    batcher.start()
    runtime = fake_runtime(batcher, "m", ["negative", "positive"])
    predictor = Predictor(runtime, PredictionCache(1 << 20, metrics), metrics, low_confidence_threshold=0.6)
    follow_ups: list[list] = []
    leader = asyncio.ensure_future(predictor.predict(["hello"], on_worker=follow_ups.append))
    await asyncio.sleep(0.01)  # its batch is on the engine, followed up (other workers are free)
    joiner = asyncio.ensure_future(predictor.predict(["hello"]))
    await asyncio.sleep(0.01)
    leader.cancel()  # its client went away: the joiner's answer is computed again, in a task
    assert (await asyncio.wait_for(joiner, 30))[0].label in {"negative", "positive"}
    await asyncio.wait_for(batcher.drain(), 30)
    assert len(follow_ups) == 1


def test_normalization_is_nfc_and_stream_safe():
    """NFC reorders a run of combining marks in time quadratic in its length: 20,000 marks of alternating classes
    held the event loop 0.33 s, and a 1 MB body of 25 stopped the server for 8 s. Longer runs than Unicode's
    stream-safe 30 get a combining grapheme joiner after every 30 first (UAX #15); shorter ones are plain NFC."""
    for text in ("  cafe\u0301 ", "e\u0316\u0301", "x" + "\u0301\u0316" * 15, "plain ascii", "\u1100\u1161"):
        assert normalize(text) == unicodedata.normalize("NFC", text).strip()
    run = "\u0301\u0316" * 10_000
    normalized = normalize("a" + run)
    assert normalized.count(GRAPHEME_JOINER) == (len(run) - 1) // STREAM_SAFE_RUN
    pieces = normalized.split(GRAPHEME_JOINER)
    assert pieces[0] == unicodedata.normalize("NFC", "a" + run[:STREAM_SAFE_RUN])
    assert all(piece == unicodedata.normalize("NFC", piece) and len(piece) <= STREAM_SAFE_RUN for piece in pieces[1:])
    # class 0 itself, but NFD splits each into two marks of different classes (a red team's run of them held the
    # loop 1.27 s a text past the first version of this)
    for sign in ("\u0f73", "\u0f75", "\u0f81"):
        assert normalize("a" + sign * 100).count(GRAPHEME_JOINER) == 3, hex(ord(sign))


class GatedEncoder:
    """The runtime's encoder, noting the thread of each call; a call with more than ``LOOP_TEXT_CHARS`` characters
    waits for ``gate`` first (bounded: on the loop, where nothing could open it, it fails the test late, not never)."""

    def __init__(self, real) -> None:
        self.real, self.threads = real, []
        self.gate, self.waiting = threading.Event(), threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def _call(self, method: str, texts: list[str], *rest):
        self.threads.append(threading.current_thread())
        if sum(map(len, texts)) > LOOP_TEXT_CHARS:
            self.waiting.set()
            self.gate.wait(10)
        return getattr(self.real, method)(texts, *rest)

    def encode(self, texts: list[str], *rest):
        return self._call("encode", texts, *rest)

    def encode_marking_truncation(self, texts: list[str], *rest):
        return self._call("encode_marking_truncation", texts, *rest)


@pytest.mark.parametrize("strict", [False, True])
async def test_a_long_request_is_tokenized_off_the_loop_while_a_short_one_is_answered(make_settings, strict) -> None:
    """A long request's tokenization held the loop (1 MB: 0.2-2 s with no other request or probe answered); it now
    runs on the text thread, and a short request sent meanwhile is answered before it finishes."""
    metrics = Metrics()
    runtime = ModelRuntime.load(make_settings(strict_truncation=strict), metrics)
    runtime.encoder = gated = GatedEncoder(runtime.encoder)
    runtime.batcher.start()
    predictor = Predictor(runtime, PredictionCache(0, metrics), metrics, low_confidence_threshold=0.6)
    long_text = "word " * (LOOP_TEXT_CHARS // 5 + 1)
    try:
        long_one = asyncio.create_task(predictor.predict([long_text]))
        while not gated.waiting.is_set():
            await asyncio.sleep(0.01)
        short = await asyncio.wait_for(predictor.predict(["fine"]), timeout=30)
        assert not long_one.done(), "the long request was done first: it was tokenized on the loop"
        gated.gate.set()
        if strict:  # the long text is past the model's length: refused, as on the loop
            with pytest.raises(InputTooLong, match="texts\\[0\\] has"):
                await asyncio.wait_for(long_one, timeout=30)
        else:
            assert (await asyncio.wait_for(long_one, timeout=30))[0].truncated
    finally:
        gated.gate.set()
        await runtime.batcher.drain()
        predictor.close()
    assert short[0].label in {"NEGATIVE", "POSITIVE"}
    loop_thread = threading.current_thread()
    assert gated.threads[0] is not loop_thread and gated.threads[0].name.startswith("text-work")
    assert gated.threads[1:] == [loop_thread], "a short request is tokenized on the loop (no hand-off)"


async def gated_pair(make_settings) -> tuple[Predictor, GatedEncoder, ModelRuntime]:
    """A predictor over the tiny model whose encoder is gated (``GatedEncoder``), its batcher started."""
    metrics = Metrics()
    runtime = ModelRuntime.load(make_settings(), metrics)
    runtime.encoder = gated = GatedEncoder(runtime.encoder)
    runtime.batcher.start()
    return Predictor(runtime, PredictionCache(0, metrics), metrics, low_confidence_threshold=0.6), gated, runtime


async def until_set(event: threading.Event) -> None:
    deadline = time.monotonic() + 30
    while not event.is_set():
        assert time.monotonic() < deadline, "the gated encoder was never reached"
        await asyncio.sleep(0.01)


async def test_a_reload_lets_a_request_started_on_the_old_model_finish_on_it(make_settings) -> None:
    """A request still tokenizing on the text thread when a reload swapped models found the old model's batcher
    drained: 503 draining in mid-reload (a red team: 7 of 177 long requests over five reloads)."""
    from server.services import Services

    predictor, gated, old = await gated_pair(make_settings)
    new = ModelRuntime.load(make_settings(), Metrics())
    new.batcher.start()
    try:
        long_one = asyncio.create_task(predictor.predict(["word " * (LOOP_TEXT_CHARS // 5 + 1)]))
        await until_set(gated.waiting)
        predictor.swap(new)
        retired = asyncio.create_task(Services._retire(SimpleNamespace(predictor=predictor, _retiring=[old]), old))
        await asyncio.sleep(0.1)
        assert not retired.done(), "the old model was drained with a request started on it still under way"
        gated.gate.set()
        assert (await asyncio.wait_for(long_one, 30))[0].truncated
        await asyncio.wait_for(retired, 30)
    finally:
        gated.gate.set()
        await new.batcher.drain()
        await old.batcher.drain()
        predictor.close()


async def test_at_shutdown_requests_waiting_for_text_work_fail_as_draining_and_its_time_is_their_own(
        make_settings) -> None:
    """Requests still waiting for the text thread at shutdown were cancelled as the loop ended, each in a traceback
    of the web server's; and a request's tokenization time counted its wait in the thread's queue."""
    predictor, gated, runtime = await gated_pair(make_settings)
    long_text = "word " * (LOOP_TEXT_CHARS // 5 + 1)
    try:
        first = asyncio.create_task(predictor.predict([long_text]))
        await until_set(gated.waiting)
        second_timings = StageTimings()
        second = asyncio.create_task(predictor.predict([long_text + "more"], timings=second_timings))
        await asyncio.sleep(0.5)  # the first holds the thread this long; the second waits in its queue
        gated.gate.set()
        await asyncio.wait_for(asyncio.gather(first, second), 30)
        assert second_timings.tokenization < 0.25, second_timings  # its own work, not the half second it queued

        gated.gate.clear()
        gated.waiting.clear()
        holding = asyncio.create_task(predictor.predict([long_text + "again"]))
        await until_set(gated.waiting)  # it holds the thread now
        queued = asyncio.create_task(predictor.predict([long_text + "queued"]))
        await asyncio.sleep(0.05)
        predictor.close()
        for waiting in (holding, queued):  # at once: the work under way finishes unheard
            with pytest.raises(Draining, match="shut down before this request's texts were read"):
                await asyncio.wait_for(waiting, 1)
    finally:
        gated.gate.set()
        await runtime.batcher.drain()


async def test_a_request_that_joined_a_computation_failed_by_anothers_input_computes_its_text_itself() -> None:
    """A red team's request held a text the model fails on beside a common one: every request that had joined the
    common text's computation got that request's 500, "the fault is in this request's texts"."""
    from tests.test_batcher import PoisonEngine, holding_the_worker

    metrics = Metrics()
    engine = PoisonEngine()
    batcher, held = await holding_the_worker(engine, metrics)
    predictor = Predictor(fake_runtime(batcher, "m", ["negative", "positive"]), PredictionCache(1 << 20, metrics),
                          metrics, low_confidence_threshold=0.6)
    poison = "x" * 99  # FakeEncoder's token is the text's length, and the engine fails on token 99
    try:
        attacker = asyncio.ensure_future(predictor.predict(["common", poison]))
        bystander = asyncio.ensure_future(predictor.predict(["fine"]))  # shares the attacker's batch
        await asyncio.sleep(0.01)
        joiner = asyncio.ensure_future(predictor.predict(["common"]))
        await asyncio.sleep(0.01)
        engine.gate.set()
        await asyncio.wait_for(asyncio.wait([held, attacker, bystander, joiner]), 30)
        with pytest.raises(InputFailed):
            attacker.result()
        assert bystander.result()[0].label in {"negative", "positive"}
        assert joiner.result()[0].label in {"negative", "positive"} and not joiner.result()[0].cached
    finally:
        await batcher.drain()
