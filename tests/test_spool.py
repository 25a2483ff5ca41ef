"""The spool file, and the store surviving database outages without losing or duplicating a prediction."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from server.metrics import Metrics
from server.store.spool import REJECTED, Spool
from server.store.writer import record_row
from tests.store_fixtures import make_record, stored_ids, wait_until


def rows(*ids: str) -> list[dict]:
    return [{"id": i} for i in ids]


def test_append_fsyncs_each_batch_and_replay_keeps_order(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    spool = Spool(tmp_path)
    spool.append(rows("a", "b"))
    spool.append(rows("c"))
    spool.append(rows("d", "e", "f"))
    assert len(synced) == 3
    assert spool.rows == 6

    chunks: list[list[str]] = []
    assert spool.replay(lambda chunk: chunks.append([r["id"] for r in chunk]), chunk_rows=4) == 6
    assert chunks == [["a", "b", "c", "d"], ["e", "f"]]
    assert not spool.path.exists() and spool.rows == 0


def test_torn_last_line_is_cut_off_when_a_new_process_opens_the_spool(tmp_path):
    Spool(tmp_path).append(rows("a", "b"))
    with (tmp_path / "predictions.jsonl").open("ab") as handle:
        handle.write(b'{"id": "tor')  # a crash in the middle of an append

    spool = Spool(tmp_path)
    assert spool.open() == 2
    spool.append(rows("c"))
    seen: list[str] = []
    spool.replay(lambda chunk: seen.extend(r["id"] for r in chunk), chunk_rows=10)
    assert seen == ["a", "b", "c"]


def test_replay_after_a_failure_resumes_where_it_stopped(tmp_path):
    spool = Spool(tmp_path)
    spool.append(rows("a", "b", "c", "d"))
    offered: list[str] = []

    def flaky(chunk):
        if chunk[0]["id"] == "c" and "c" not in offered:
            offered.append("c")
            raise ConnectionError("database went away")
        offered.extend(r["id"] for r in chunk)

    with pytest.raises(ConnectionError):
        spool.replay(flaky, chunk_rows=2)
    assert spool.rows == 2 and spool.path.exists()
    spool.replay(flaky, chunk_rows=2)
    assert offered == ["a", "b", "c", "c", "d"]
    assert spool.rows == 0 and not spool.path.exists()


async def test_outage_in_mid_stream_loses_nothing_and_duplicates_nothing(store_db, store_settings, open_store):
    metrics = Metrics()
    store = await open_store(store_settings(db_pool_timeout_s=0.3), metrics, batch_rows=20)
    submitted: list[str] = []
    outage_seen = False
    for i in range(400):
        record = make_record(f"text {i}")
        store.submit(record)  # would raise out of the test if it ever raised
        submitted.append(record.id)
        if i == 100:
            await asyncio.to_thread(store_db.down)
        if i == 300:
            await wait_until(lambda: store.health()["spool_rows"] > 0, what="records to be spooled")
            outage_seen = store.health()["status"] == "degraded" and metrics.store_up._value.get() == 0
            await asyncio.to_thread(store_db.up)
        await asyncio.sleep(0.003)

    await wait_until(lambda: store.health()["status"] == "ok", what="the spool to be replayed")
    await store.close()  # writes what is still queued
    assert outage_seen
    assert store.health()["spool_rows"] == 0 and store.health()["queue_depth"] == 0
    ids = stored_ids(store_db.url)
    assert len(ids) == len(submitted)
    assert set(ids) == set(submitted)
    assert metrics.store_write_errors._value.get() >= 1
    assert metrics.store_replayed._value.get() >= 1
    assert metrics.store_written._value.get() + metrics.store_replayed._value.get() == len(submitted)
    assert metrics.store_up._value.get() == 1 and metrics.store_spool_rows._value.get() == 0


async def test_close_spools_while_down_and_next_start_replays(store_db, store_settings, open_store, caplog):
    settings = store_settings(db_pool_timeout_s=0.3)
    first = await open_store(settings)
    await asyncio.to_thread(store_db.down)
    records = [make_record(f"t{i}") for i in range(30)]
    for record in records:
        first.submit(record)
    await first.close()
    assert first.health()["spool_rows"] == 30
    assert "ERROR" in {r.levelname for r in caplog.records if "spooling predictions" in r.getMessage()}

    await asyncio.to_thread(store_db.up)
    metrics = Metrics()
    second = await open_store(settings, metrics)
    await wait_until(lambda: second.health()["status"] == "ok", what="the leftover spool to be replayed")
    assert sorted(stored_ids(store_db.url)) == sorted(r.id for r in records)
    assert metrics.store_replayed._value.get() == 30
    assert not (settings.spool_dir / "predictions.jsonl").exists()


async def test_start_with_the_database_down_is_degraded_not_fatal(store_db, store_settings, open_store):
    await asyncio.to_thread(store_db.down)
    store = await open_store(store_settings(db_pool_timeout_s=0.3))
    health = store.health()
    assert health["status"] == "degraded" and "database unavailable" in health["reason"]
    record = make_record()
    store.submit(record)
    await wait_until(lambda: store.health()["spool_rows"] == 1, what="the record to be spooled")
    await asyncio.to_thread(store_db.up)
    await wait_until(lambda: store.health()["status"] == "ok", what="recovery")
    assert stored_ids(store_db.url) == [record.id]


async def test_replaying_rows_already_written_is_harmless(store_db, store_settings, open_store):
    settings = store_settings()
    store = await open_store(settings)
    records = [make_record(f"t{i}") for i in range(5)]
    for record in records:
        store.submit(record)
    await store.close()
    # A crash between inserting and deleting the spool: the same rows are spooled again.
    Spool(settings.spool_dir).append([record_row(r, True) for r in records])

    metrics = Metrics()
    again = await open_store(settings, metrics)
    await wait_until(lambda: again.health()["status"] == "ok", what="replay")
    assert sorted(stored_ids(store_db.url)) == sorted(r.id for r in records)
    assert metrics.store_write_errors._value.get() == 0


async def test_a_row_the_database_refuses_is_set_aside_not_blocking(store_db, store_settings, open_store):
    settings = store_settings()
    metrics = Metrics()
    store = await open_store(settings, metrics)
    good, bad, later = make_record("one"), make_record("two", label=None), make_record("three")
    for record in (good, bad, later):
        store.submit(record)
    await wait_until(lambda: len(stored_ids(store_db.url)) == 2, what="the good rows")
    assert sorted(stored_ids(store_db.url)) == sorted([good.id, later.id])
    rejected = [json.loads(line) for line in (settings.spool_dir / REJECTED).read_text().splitlines()]
    assert [r["row"]["id"] for r in rejected] == [bad.id]
    assert store.health()["status"] == "ok"
    assert metrics.store_write_errors._value.get() == 1


async def test_a_malformed_spool_line_is_set_aside_and_replay_goes_on(store_db, store_settings, open_store):
    settings = store_settings()
    first, second = make_record("first"), make_record("second")
    Spool(settings.spool_dir).append([record_row(first, True), {"id": "broken"}, record_row(second, True)])
    store = await open_store(settings)
    await wait_until(lambda: store.health()["status"] == "ok", what="replay")
    assert sorted(stored_ids(store_db.url)) == sorted([first.id, second.id])
    assert '"id":"broken"' in (settings.spool_dir / REJECTED).read_text()
