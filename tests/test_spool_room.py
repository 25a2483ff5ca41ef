"""``PredictionStore.room_for``: a request whose records the full spool could not take is refused before anything is
computed for it (red team helper-87: 256 clients of many cached texts each, with the spool full, OOM-killed a server
at 800 MiB while their records were built, encoded and refused one by one)."""

from __future__ import annotations

import asyncio

import pytest

from server.store import SpoolUnavailable
from server.store.prediction_store import RECORD_LINE_BYTES_AT_LEAST
from server.store.rows import encode_lines, record_row
from tests.store_fixtures import make_record

MIB = 1 << 20


async def fill(store, texts_per_request: int = 64) -> int:
    """Record requests until the spool refuses one as full; the records it took."""
    taken = 0
    while True:
        records = [make_record(f"text {taken + i}") for i in range(texts_per_request)]
        try:
            await store.record(records)
        except SpoolUnavailable as error:
            assert error.cause == "full"
            return taken
        taken += len(records)


@pytest.mark.parametrize("store_db", ["sqlite"], indirect=True)
async def test_a_request_the_full_spool_cannot_take_is_refused_before_its_records_exist(store_db, store_settings,
                                                                                        open_store):
    await asyncio.to_thread(store_db.down)  # nothing leaves the spool
    store = await open_store(store_settings(spool_max_bytes=MIB, db_pool_timeout_s=0.3))
    assert await fill(store) > 0
    with pytest.raises(SpoolUnavailable) as refused:
        store.room_for(["a fine film"] * 64)
    assert refused.value.cause == "full" and "records of requests under way" in str(refused.value)
    with store.room_for(["a"]):  # one short record still fits what is left
        pass
    await asyncio.to_thread(store_db.up)


@pytest.mark.parametrize("store_db", ["sqlite"], indirect=True)
async def test_room_promised_to_requests_under_way_is_not_promised_twice_and_comes_back(store_db, store_settings,
                                                                                        open_store):
    await asyncio.to_thread(store_db.down)
    store = await open_store(store_settings(spool_max_bytes=MIB, db_pool_timeout_s=0.3))
    half = ["x" * 1000] * (MIB // 2 // (1000 + RECORD_LINE_BYTES_AT_LEAST))  # about half the spool
    with store.room_for(half):
        with pytest.raises(SpoolUnavailable):
            store.room_for(half + half[:50])  # both cannot be promised at once
        with store.room_for(half[:10]):
            pass
    with store.room_for(half + half[:50]):  # once the first is done, the room is back
        pass
    await asyncio.to_thread(store_db.up)


def test_a_record_line_is_never_shorter_than_the_least_room_promised():
    """The promise is a lower bound: nothing the spool could take is refused for a promise too large."""
    least = make_record("", request_id="r", label="x", model_name="m", model_version="1", device="cpu",
                        probabilities={"x": 1.0}, score=1.0, latency_ms=0.0)
    for store_text in (True, False):
        assert len(encode_lines([record_row(least, store_text)])) >= RECORD_LINE_BYTES_AT_LEAST


async def test_without_ack_nothing_is_promised(store_settings, open_store):
    store = await open_store(store_settings(store_durability="async"))
    with store.room_for(["a"] * 100_000):
        pass


@pytest.mark.parametrize("store_db", ["sqlite"], indirect=True)
async def test_records_larger_than_the_whole_spool_are_left_to_the_append_to_refuse_413(store_settings, open_store):
    """Refused here they would have been a 503 to retry for ever; the append refuses them as too large (413)."""
    store = await open_store(store_settings(spool_max_bytes=MIB))
    with store.room_for(["x" * 20_000] * 60):
        pass
