"""PredictionCache: byte bound, honest accounting (tracemalloc), LRU, shedding, single-flight."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine

from server.app import create_app
from server.cache import PredictionCache, entry_size
from server.metrics import Metrics
from server.primitives import Prediction
from server.store.keys import KeyStore

LABELS = ("NEGATIVE", "POSITIVE")


def prediction(positive: float) -> Prediction:
    label = "POSITIVE" if positive >= 0.5 else "NEGATIVE"
    return Prediction(label, max(positive, 1 - positive), {"NEGATIVE": 1 - positive, "POSITIVE": positive})


def sample(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


def assert_exported(cache: PredictionCache, metrics: Metrics) -> None:
    assert sample(metrics, "sentiment_cache_bytes") == cache.bytes
    assert sample(metrics, "sentiment_cache_entries") == cache.entries
    assert sample(metrics, "sentiment_cache_limit_bytes") == cache.max_bytes


def test_hit_round_trips_the_prediction_marked_cached() -> None:
    metrics = Metrics()
    cache = PredictionCache(10_000, metrics)
    stored = prediction(0.8125)
    cache.put("v1", "great film", stored)

    hit = cache.get("v1", "great film")

    assert hit == Prediction(stored.label, stored.score, stored.probabilities, cached=True)
    assert list(hit.probabilities) == list(LABELS)
    assert cache.get("v2", "great film") is None  # the model version is part of the key
    assert cache.get("v1", "other") is None
    assert sample(metrics, "sentiment_cache_hits_total") == 1
    assert sample(metrics, "sentiment_cache_misses_total") == 2
    assert_exported(cache, metrics)


def test_least_recently_used_is_evicted_first() -> None:
    metrics = Metrics()
    one = entry_size("text-0", prediction(0.9))
    cache = PredictionCache(one * 3 + 400, metrics)  # room for three entries and their table slots
    for i in range(3):
        cache.put("v1", f"text-{i}", prediction(0.9))
    assert cache.entries == 3
    cache.get("v1", "text-0")  # now text-1 is the oldest

    cache.put("v1", "text-3", prediction(0.9))

    assert cache.get("v1", "text-1") is None
    assert all(cache.get("v1", f"text-{i}") is not None for i in (0, 2, 3))
    assert sample(metrics, "sentiment_cache_evictions_total") == 1
    assert cache.bytes <= cache.max_bytes


def test_entry_larger_than_the_bound_is_not_kept_and_replaces_nothing_stale() -> None:
    metrics = Metrics()
    cache = PredictionCache(2_000, metrics)
    cache.put("v1", "small", prediction(0.9))
    cache.put("v1", "x" * 5_000, prediction(0.9))
    assert cache.get("v1", "x" * 5_000) is None
    assert cache.get("v1", "small") is not None
    assert sample(metrics, "sentiment_cache_evictions_total") == 0


def test_a_bound_too_small_for_entry_and_table_keeps_nothing() -> None:
    cache = PredictionCache(entry_size("ok", prediction(0.9)) + 10, Metrics())
    cache.put("v1", "ok", prediction(0.9))
    assert (cache.entries, cache.bytes) == (0, 0)


def test_zero_bytes_stores_nothing() -> None:
    cache = PredictionCache(0, Metrics())
    cache.put("v1", "a", prediction(0.9))
    assert (cache.entries, cache.bytes) == (0, 0)


def test_shed_frees_the_oldest_half_and_clear_empties() -> None:
    metrics = Metrics()
    cache = PredictionCache(1_000_000, metrics)
    for i in range(1_000):
        cache.put("v1", f"text number {i:04d}", prediction(0.7))
    before = cache.bytes

    freed = cache.shed(0.5)

    assert freed == before - cache.bytes
    assert 0.45 * before <= freed <= 0.6 * before
    assert 480 <= cache.entries <= 520
    assert cache.get("v1", "text number 0000") is None
    assert cache.get("v1", "text number 0999") is not None
    assert sample(metrics, "sentiment_cache_evictions_total") == 1_000 - cache.entries
    assert_exported(cache, metrics)

    cache.clear()
    assert (cache.entries, cache.bytes) == (0, 0)
    assert_exported(cache, metrics)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 30), st.integers(0, 400), st.floats(0, 1)),
        st.tuples(st.just("get"), st.integers(0, 30)),
        st.tuples(st.just("shed"), st.floats(0, 1)),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(max_bytes=st.integers(0, 6_000), operations=ops)
def test_randomized_workload_stays_within_bytes_and_keeps_lru_order(max_bytes: int, operations: list) -> None:
    metrics = Metrics()
    cache = PredictionCache(max_bytes, metrics)
    recency: list[str] = []  # keys the cache may hold, least recently used first
    values: dict[str, Prediction] = {}
    for op in operations:
        if op[0] == "put":
            _, key, length, positive = op
            text = f"{key}:" + "é" * length
            values[text] = prediction(positive)
            cache.put("v1", text, values[text])
            recency = [t for t in recency if t != text]
            if cache._entries.get(("v1", text)) is not None:  # an entry too large for the bound is not kept
                recency.append(text)
        elif op[0] == "get":
            text = next((t for t in values if t.startswith(f"{op[1]}:")), f"{op[1]}:")
            hit = cache.get("v1", text)
            if hit is not None:
                assert hit == Prediction(values[text].label, values[text].score, values[text].probabilities, True)
                recency = [t for t in recency if t != text] + [text]
        else:
            before = cache.bytes
            assert cache.shed(op[1]) == before - cache.bytes
        assert cache.bytes <= max_bytes
        assert_exported(cache, metrics)
        # Evictions only ever take the least recently used: what is held is the most recent suffix
        # (peeking at _entries, since get() would change the recency under test).
        recency = recency[len(recency) - cache.entries:] if cache.entries else []
        assert all(cache._entries.get(("v1", t)) is not None for t in recency)


@pytest.mark.parametrize(
    ("text", "limit"),
    [("ok", 300_000), ("a review of average length, " * 4, 1_000_000), ("très bien 😀 " * 30, 2_000_000)],
    ids=["short", "medium", "non-ascii"],
)
def test_reported_bytes_match_memory_really_held(text: str, limit: int) -> None:
    metrics = Metrics()
    gc.collect()
    tracemalloc.start()
    try:
        cache = PredictionCache(limit, metrics)
        baseline = tracemalloc.get_traced_memory()[0]
        count = limit // entry_size(text, prediction(0.5)) * 2  # twice what fits: steady LRU churn
        for i in range(count):
            cache.put("model-v1", f"{i:06d} {text}", prediction((i % 89) / 89))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - baseline
        assert cache.bytes <= limit
        assert abs(held - cache.bytes) <= 0.1 * cache.bytes

        cache.shed(0.5)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - baseline
        assert cache.bytes <= limit // 2 + 0.05 * limit
        assert abs(held - cache.bytes) <= 0.1 * cache.bytes  # shedding gave the memory back
    finally:
        tracemalloc.stop()


class Computer:
    """A compute callable that counts its calls and waits for a gate, so calls overlap."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[list[str]] = []
        self.gate = asyncio.Event()
        self.error = error

    async def __call__(self, texts: list[str]) -> list[Prediction]:
        self.calls.append(list(texts))
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return [prediction(len(t) / 100) for t in texts]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_concurrent_misses_share_one_computation() -> None:
    metrics = Metrics()
    cache = PredictionCache(100_000, metrics)
    compute = Computer()
    tasks = [asyncio.create_task(cache.get_or_compute("v1", ["a", "bb", "a", "ccc"], compute)) for _ in range(10)]
    await settle()
    compute.gate.set()
    results = await asyncio.gather(*tasks)

    assert compute.calls == [["a", "bb", "ccc"]]  # distinct texts, one call, first-seen order
    expected = [prediction(len(t) / 100) for t in ["a", "bb", "a", "ccc"]]
    assert all(r == expected for r in results)
    assert cache.entries == 3
    assert sample(metrics, "sentiment_cache_misses_total") == 40

    again = await cache.get_or_compute("v1", ["ccc", "a"], compute)
    assert [p.cached for p in again] == [True, True]
    assert [p.score for p in again] == [expected[3].score, expected[0].score]
    assert len(compute.calls) == 1


async def test_hits_do_not_wait_for_computations_in_flight() -> None:
    cache = PredictionCache(100_000, Metrics())
    cache.put("v1", "known", prediction(0.9))
    compute = Computer()
    pending = asyncio.create_task(cache.get_or_compute("v1", ["unknown"], compute))
    await settle()

    hits = await asyncio.wait_for(cache.get_or_compute("v1", ["known", "known"], compute), timeout=1)

    assert [p.cached for p in hits] == [True, True]
    assert not pending.done()
    compute.gate.set()
    assert (await pending)[0].cached is False


async def test_a_call_overlapping_one_in_flight_computes_only_the_rest() -> None:
    cache = PredictionCache(100_000, Metrics())
    compute = Computer()
    first = asyncio.create_task(cache.get_or_compute("v1", ["a", "b"], compute))
    await settle()
    second = asyncio.create_task(cache.get_or_compute("v1", ["c", "b"], compute))
    await settle()
    compute.gate.set()
    assert [p.score for p in await second] == [prediction(0.01).score, prediction(0.01).score]
    await first
    assert compute.calls == [["a", "b"], ["c"]]


async def test_an_error_reaches_every_waiter_and_nothing_is_cached() -> None:
    cache = PredictionCache(100_000, Metrics())
    compute = Computer(error=ValueError("engine exploded"))
    tasks = [asyncio.create_task(cache.get_or_compute("v1", ["a", "b"], compute)) for _ in range(3)]
    await settle()
    compute.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert all(isinstance(r, ValueError) and str(r) == "engine exploded" for r in results)
    assert len(compute.calls) == 1
    assert cache.entries == 0

    compute.error = None  # not remembered as in flight: the next call computes again
    assert len(await cache.get_or_compute("v1", ["a"], compute)) == 1
    assert compute.calls[-1] == ["a"]


async def test_compute_returning_the_wrong_count_fails_the_waiters() -> None:
    cache = PredictionCache(100_000, Metrics())

    async def short(texts: list[str]) -> list[Prediction]:
        return [prediction(0.5)]

    with pytest.raises(RuntimeError, match="1 predictions for 2 texts"):
        await cache.get_or_compute("v1", ["a", "b"], short)


async def test_cache_disabled_still_single_flights() -> None:
    cache = PredictionCache(0, Metrics())
    compute = Computer()
    tasks = [asyncio.create_task(cache.get_or_compute("v1", ["a"], compute)) for _ in range(4)]
    await settle()
    compute.gate.set()
    await asyncio.gather(*tasks)
    assert len(compute.calls) == 1
    assert cache.entries == 0
    await cache.get_or_compute("v1", ["a"], compute)
    assert len(compute.calls) == 2


async def test_a_cancelled_caller_does_not_cancel_the_others() -> None:
    cache = PredictionCache(100_000, Metrics())
    compute = Computer()
    leaver = asyncio.create_task(cache.get_or_compute("v1", ["a"], compute))
    stayer = asyncio.create_task(cache.get_or_compute("v1", ["a"], compute))
    await settle()
    leaver.cancel()  # it started the computation the stayer joined: a task takes it over
    await settle()
    compute.gate.set()
    assert (await asyncio.wait_for(stayer, timeout=30))[0] == prediction(0.01)
    assert leaver.cancelled()
    assert cache.entries == 1


async def test_a_caller_no_one_joined_computes_in_its_own_task() -> None:
    cache = PredictionCache(100_000, Metrics())
    compute = Computer()
    tasks_before = len(asyncio.all_tasks())
    alone = asyncio.create_task(cache.get_or_compute("v1", ["a", "b"], compute))
    await settle()
    assert len(asyncio.all_tasks()) == tasks_before + 1  # the caller only: no computation task
    compute.gate.set()
    assert await alone == [prediction(0.01), prediction(0.01)]


async def test_a_cancelled_caller_no_one_joined_leaves_nothing_in_flight() -> None:
    cache = PredictionCache(100_000, Metrics())
    compute = Computer()
    leaver = asyncio.create_task(cache.get_or_compute("v1", ["a"], compute))
    await settle()
    leaver.cancel()
    await settle()
    assert leaver.cancelled() and len(compute.calls) == 1  # not computed again for no one
    compute.gate.set()
    assert (await asyncio.wait_for(cache.get_or_compute("v1", ["a"], compute), timeout=30))[0].cached is False
    assert len(compute.calls) == 2  # nothing was left in flight to wait for


async def test_results_computed_across_a_clear_are_answered_but_not_cached() -> None:
    cache = PredictionCache(100_000, Metrics())
    compute = Computer()
    pending = asyncio.create_task(cache.get_or_compute("v1", ["a"], compute))
    await settle()
    cache.clear()  # the model changed while the old one was computing
    compute.gate.set()
    assert len(await pending) == 1
    assert cache.entries == 0


async def test_cache_off_counts_no_hits_or_misses() -> None:
    metrics = Metrics()
    cache = PredictionCache(0, metrics)  # CACHE_MAX_BYTES=0 or ENABLE_MODEL_CACHING=false
    compute = Computer()
    compute.gate.set()
    await cache.get_or_compute("v1", ["a", "b", "a"], compute)
    await cache.get_or_compute("v1", ["a"], compute)
    assert cache.get("v1", "a") is None
    assert len(compute.calls) == 2  # it did compute: only the counting is off
    assert sample(metrics, "sentiment_cache_misses_total") == 0
    assert sample(metrics, "sentiment_cache_hits_total") == 0


async def test_a_failure_while_caching_answers_every_waiter_and_leaves_nothing_in_flight(monkeypatch, caplog) -> None:
    cache = PredictionCache(100_000, Metrics())

    def broken_put(version: str, text: str, prediction: Prediction) -> None:
        raise MemoryError("injected: the cache could not store the entry")

    monkeypatch.setattr(cache, "put", broken_put)
    compute = Computer()
    tasks = [asyncio.create_task(cache.get_or_compute("v1", ["a", "bb"], compute)) for _ in range(3)]
    await settle()
    compute.gate.set()

    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)  # a pending future would hang here

    assert all(r == [prediction(0.01), prediction(0.02)] for r in results)
    assert "caching 2 computed predictions failed" in caplog.text
    again = await asyncio.wait_for(cache.get_or_compute("v1", ["bb"], compute), timeout=30)
    assert again == [prediction(0.02)] and compute.calls == [["a", "bb"], ["bb"]]  # not stuck in flight


async def test_a_joiner_cancelled_before_its_starter_leaves_nothing_computed_for_no_one() -> None:
    cache = PredictionCache(100_000, Metrics())
    compute = Computer()
    starter = asyncio.create_task(cache.get_or_compute("v1", ["a"], compute))
    await settle()
    joiner = asyncio.create_task(cache.get_or_compute("v1", ["a"], compute))
    await settle()
    joiner.cancel()  # its client left first: no one waits for the computation but its starter
    await settle()
    starter.cancel()
    await settle()
    assert joiner.cancelled() and starter.cancelled()
    assert len(compute.calls) == 1  # not handed to a task computing "a" again for no one
    compute.gate.set()
    assert (await asyncio.wait_for(cache.get_or_compute("v1", ["a"], compute), timeout=30))[0].cached is False
    assert len(compute.calls) == 2  # nothing was left in flight to wait for


async def test_a_caller_that_also_joined_computes_its_own_texts_in_itself_for_no_one_once_cancelled() -> None:
    cache = PredictionCache(100_000, Metrics())
    compute = Computer()
    other = asyncio.create_task(cache.get_or_compute("v1", ["a"], compute))
    await settle()
    both = asyncio.create_task(cache.get_or_compute("v1", ["a", "b"], compute))  # joins "a", computes "b"
    await settle()
    assert compute.calls == [["a"], ["b"]]
    both.cancel()  # no one waits for its "b": that computation stops with it
    await settle()
    compute.gate.set()
    assert await asyncio.wait_for(other, timeout=30) == [prediction(0.01)] and both.cancelled()
    assert cache.get("v1", "b") is None and cache.get("v1", "a") is not None
    assert (await asyncio.wait_for(cache.get_or_compute("v1", ["b"], compute), timeout=30))[0].cached is False
    assert compute.calls == [["a"], ["b"], ["b"]]


async def test_a_cancelled_caller_that_also_joined_hands_its_computation_to_those_waiting() -> None:
    cache = PredictionCache(100_000, Metrics())
    compute = Computer()
    other = asyncio.create_task(cache.get_or_compute("v1", ["a"], compute))
    await settle()
    both = asyncio.create_task(cache.get_or_compute("v1", ["a", "bb"], compute))  # joins "a", computes "bb"
    await settle()
    waiter = asyncio.create_task(cache.get_or_compute("v1", ["bb"], compute))  # joins "bb"
    await settle()
    both.cancel()  # the waiter still waits for "bb": a task takes the computation over
    await settle()
    compute.gate.set()
    assert await asyncio.wait_for(waiter, timeout=30) == [prediction(0.02)]
    assert await asyncio.wait_for(other, timeout=30) == [prediction(0.01)] and both.cancelled()
    assert compute.calls[-1] == ["bb"] and cache.entries == 2  # computed for the waiter, and cached


async def test_a_request_is_not_held_behind_a_larger_one_that_shares_its_text() -> None:
    """A computation answers all its texts at once: a red team's one-text request that joined a request of 200 long
    texts for its one shared text waited 30 s for all of them and got 503 deadline (0.05 s alone)."""
    cache = PredictionCache(100_000, Metrics())
    large, small = Computer(), Computer()
    small.gate.set()
    held = asyncio.create_task(cache.get_or_compute("v1", ["shared", "long 1", "long 2"], large))
    await settle()
    alone = await asyncio.wait_for(cache.get_or_compute("v1", ["shared"], small), timeout=30)
    assert alone == [prediction(0.06)] and small.calls == [["shared"]] and not held.done()
    joined = asyncio.create_task(cache.get_or_compute("v1", ["other", "shared", "more", "yet more"], large))
    await settle()
    assert large.calls == [["shared", "long 1", "long 2"], ["other", "more", "yet more"]]  # a larger one joins
    large.gate.set()
    assert [p.score for p in await joined][1] == prediction(0.06).score
    await held


@pytest.mark.parametrize("request_texts", [["shared", "cached"], ["shared", "shared", "shared"]],
                         ids=["a-hit-beside", "repeated"])
async def test_what_a_request_finds_cached_or_repeats_does_not_let_it_join_a_longer_computation(request_texts):
    """The computation's size was compared with the request's texts, hits and repeats included: a request with one
    miss beside 199 hits still waited for a computation of 200 (review helper-101)."""
    cache = PredictionCache(100_000, Metrics())
    cache.put("v1", "cached", prediction(0.5))
    large, small = Computer(), Computer()
    small.gate.set()
    held = asyncio.create_task(cache.get_or_compute("v1", ["shared", "a longer text beside it"], large))
    await settle()
    answered = await asyncio.wait_for(cache.get_or_compute("v1", request_texts, small), timeout=30)
    assert answered[0] == prediction(0.06) and small.calls == [["shared"]] and not held.done()
    large.gate.set()
    await held


async def test_a_cancelled_caller_hands_over_only_the_texts_others_wait_for() -> None:
    """The whole computation was started again for one joined text: a request cancelled with 200 texts queued 200
    texts again for another's one."""
    cache = PredictionCache(100_000, Metrics())
    compute = Computer()
    leaver = asyncio.create_task(cache.get_or_compute("v1", ["a", "b", "c"], compute))
    await settle()
    stayer = asyncio.create_task(cache.get_or_compute("v1", ["a", "x", "y"], compute))  # joins "a"
    await settle()
    leaver.cancel()
    await settle()
    assert compute.calls[-1] == ["a"]  # computed again for the stayer alone
    compute.gate.set()
    assert await asyncio.wait_for(stayer, timeout=30) == [prediction(0.01)] * 3 and leaver.cancelled()
    assert cache.get("v1", "b") is None and cache.get("v1", "c") is None and cache.get("v1", "a") is not None
    later = await asyncio.wait_for(cache.get_or_compute("v1", ["b"], compute), timeout=30)
    assert later[0].cached is False and compute.calls[-1] == ["b"]  # nothing of the leaver's left in flight


@pytest.mark.parametrize("scope", ["key", "shared"])
def test_a_cached_prediction_serves_another_api_key_only_with_a_shared_cache_scope(make_settings, scope):
    """With one cache for all callers, any key could tell that another key had sent a text: ``"cached": true``,
    TEI's zero timing headers, or a share of its computation (red team helper-65). By default (``key``) each key,
    and the requests without one, has a scope of its own."""
    settings = make_settings(auth_mode="required", db_auto_migrate=True, cache_scope=scope)
    with TestClient(create_app(settings)) as client:
        keys = KeyStore(create_engine(settings.database_url))
        first, second = (keys.create(name, "predict")[1] for name in ("tenant one", "tenant two"))

        def cached(key: str, text: str) -> bool:
            answer = client.post("/predict", json={"text": text}, headers={"Authorization": f"Bearer {key}"})
            assert answer.status_code == 200, answer.text
            return answer.json()["predictions"][0]["cached"]

        assert not cached(first, "a text only the first tenant sent")
        assert cached(first, "a text only the first tenant sent")  # its own scope: a hit
        assert cached(second, "  a text only the first tenant sent ") is (scope == "shared")
        assert not cached(first, "another text only the first tenant sent")
        tei = client.post("/predict", json={"inputs": "another text only the first tenant sent"},
                          headers={"Authorization": f"Bearer {second}"})
        assert tei.status_code == 200 and (tei.headers["x-compute-tokens"] == "0") is (scope == "shared")
