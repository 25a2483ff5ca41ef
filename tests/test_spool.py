"""The write-ahead log (spool) on its own, and the store surviving database outages without losing or
duplicating a prediction, in both durability modes."""

from __future__ import annotations

import asyncio
import errno
import json
import os
from pathlib import Path

import orjson
import pytest

from server.metrics import Metrics
from server.store import wal as wal_module
from server.store.rejected import FILENAME as REJECTED
from server.store.rows import encode_lines, record_row
from server.store.spooldir import database_identity
from server.store.wal import RecordsTooLarge, SpoolUnavailable, WriteAheadLog, segment_name
from tests.store_fixtures import created_database, make_record, scraped, stored_ids, wait_until


def lines(*ids: str) -> bytes:
    return b"".join(orjson.dumps({"id": i}) + b"\n" for i in ids)


def read_ids(wal: WriteAheadLog, position: int | None = None, max_lines: int = 1000) -> list[str]:
    found, _ = wal.read(wal.start if position is None else position, wal.end, max_lines)
    return [json.loads(line)["id"] for line in found]


def open_wal(directory: Path, max_bytes: int = 1 << 30, **kwargs) -> WriteAheadLog:
    directory.mkdir(parents=True, exist_ok=True)
    wal = WriteAheadLog(directory, max_bytes, **kwargs)
    wal.open()
    return wal


def test_each_append_is_synced_and_read_back_in_order(tmp_path, monkeypatch):
    files_synced = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (files_synced.append(fd), real_fdatasync(fd)))
    wal = open_wal(tmp_path)
    assert wal.append(lines("a", "b")) == (0, 22)  # 11 bytes a line
    wal.append(lines("c"))
    wal.append(lines("d", "e", "f"))
    assert len(files_synced) == 3
    assert read_ids(wal) == ["a", "b", "c", "d", "e", "f"]
    assert read_ids(wal, position=22, max_lines=2) == ["c", "d"]
    assert wal.bytes == (tmp_path / segment_name(0)).stat().st_size == wal.end


def test_segments_rotate_and_are_released_only_when_wholly_in_the_database(tmp_path):
    wal = open_wal(tmp_path, segment_bytes=30, idle_retire_s=3600)
    ends = [wal.append(lines(f"r{i}"))[1] for i in range(6)]  # 12 bytes a line: two lines a segment
    assert sorted(p.name for p in tmp_path.glob("wal-*")) == [segment_name(0), segment_name(24), segment_name(48)]
    assert wal.release(ends[2]) == 24  # r2 is in the database, r3 (same segment) is not: one segment goes
    assert read_ids(wal, position=ends[2]) == ["r3", "r4", "r5"]
    assert wal.release(ends[5]) == 24  # the active segment stays while appends may still come
    assert wal.release(ends[5], force=True) == 24 and wal.bytes == 0 and not list(tmp_path.glob("wal-*"))
    assert wal.append(lines("next"))[0] == ends[5]  # positions keep growing after everything was released


def test_a_release_whose_directory_sync_fails_still_counts_the_segments_it_deleted(tmp_path, monkeypatch):
    """The bytes were counted down only after the directory's fsync: when it failed, the deleted segments stayed
    counted, and the spool read fuller than it was, for good (refusing appends as full at the end)."""
    wal = open_wal(tmp_path, segment_bytes=30, idle_retire_s=3600)
    ends = [wal.append(lines(f"r{i}"))[1] for i in range(4)]  # two segments of two lines
    def failing_fsync_dir(path: Path) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(wal_module, "fsync_dir", failing_fsync_dir)
    with pytest.raises(OSError):
        wal.release(ends[1])
    assert wal.bytes == sum(p.stat().st_size for p in tmp_path.glob("wal-*")) == 24


def test_a_torn_tail_is_cut_off_at_open_and_never_glued_to_the_next_record(tmp_path):
    wal = open_wal(tmp_path)
    wal.append(lines("a", "b"))
    wal.close()
    with (tmp_path / segment_name(0)).open("ab") as handle:
        handle.write(b'{"id": "tor')  # a crash in the middle of an append: never acknowledged
    again = WriteAheadLog(tmp_path, 1 << 30)
    assert again.open() == 2
    again.append(lines("c"))
    assert read_ids(again) == ["a", "b", "c"]


def test_a_failed_append_is_cut_back_to_where_it_began_and_reported(tmp_path, monkeypatch):
    wal = open_wal(tmp_path)
    wal.append(lines("a"))
    size = wal.bytes
    real_write = os.write

    def half_then_full(fd, data):  # the disk fills in the middle of the group
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(SpoolUnavailable) as failure:
        wal.append(lines("b", "c"))
    assert failure.value.cause == "no_space" and failure.value.status_code == 503
    assert (tmp_path / segment_name(0)).stat().st_size == size == wal.bytes
    monkeypatch.setattr(os, "write", real_write)
    wal.append(lines("d"))
    assert read_ids(wal) == ["a", "d"]
    # The refused segment takes no more appends, so it can go once its records are in the database (on a
    # disk smaller than a segment it would otherwise stay, full, with the database up).
    assert sorted(p.name for p in tmp_path.glob("wal-*")) == [segment_name(0), segment_name(size)]
    assert wal.release(size) == size and read_ids(wal) == ["d"]
    wal.close()
    assert WriteAheadLog(tmp_path, 1 << 30).open() == 1


def test_segments_stay_under_a_quarter_of_spool_max_bytes(tmp_path):
    wal = open_wal(tmp_path, max_bytes=1 << 20)  # SEGMENT_BYTES (4 MiB) would never rotate under a 1 MiB cap
    ends = [wal.append(lines("x" * (100 << 10)))[1] for _ in range(7)]
    assert len(list(tmp_path.glob("wal-*"))) >= 3
    assert all(p.stat().st_size <= (1 << 20) // 4 for p in tmp_path.glob("wal-*"))
    assert wal.release(ends[-1]) > 0 and wal.bytes < (1 << 20) // 4  # only the active segment is left


def test_when_even_the_cut_fails_the_segment_is_sealed_and_its_garbage_skipped(tmp_path, monkeypatch):
    wal = open_wal(tmp_path)
    wal.append(lines("a"))
    real_write = os.write

    def torn_write(fd, data):
        real_write(fd, bytes(data[:5]))
        raise OSError(errno.EIO, "I/O error")

    def failing_truncate(fd, size):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "write", torn_write)
    monkeypatch.setattr(os, "ftruncate", failing_truncate)
    with pytest.raises(SpoolUnavailable) as failure:
        wal.append(lines("b"))
    assert failure.value.cause == "io_error"
    monkeypatch.undo()
    start, _ = wal.append(lines("c"))
    assert start == wal.bytes - len(lines("c"))
    assert len(list(tmp_path.glob("wal-*"))) == 2  # a new segment after the torn one
    assert read_ids(wal) == ["a", "c"]


def test_a_segment_deleted_while_in_use_is_not_appended_to_any_more(tmp_path):
    wal = open_wal(tmp_path)
    wal.append(lines("a"))
    (tmp_path / segment_name(0)).unlink()  # an operator "cleaning up" SPOOL_DIR under a running server
    start, _ = wal.append(lines("b"))
    assert (tmp_path / segment_name(start)).read_bytes() == lines("b")  # on disk again, in a new segment
    assert read_ids(wal) == ["b"]


def test_an_append_past_spool_max_bytes_is_refused_as_full(tmp_path):
    wal = open_wal(tmp_path, max_bytes=30)
    wal.append(lines("a", "b"))
    with pytest.raises(SpoolUnavailable) as failure:
        wal.append(lines("c"))
    assert failure.value.cause == "full" and "SPOOL_MAX_BYTES=30" in str(failure.value)
    assert failure.value.status_code == 503 and failure.value.retry_after
    assert read_ids(wal) == ["a", "b"]


def test_records_larger_than_the_whole_spool_are_too_large_to_retry_not_a_full_spool(tmp_path):
    wal = open_wal(tmp_path, max_bytes=30)
    with pytest.raises(RecordsTooLarge) as failure:
        wal.append(lines("a very long id that could never fit"))
    assert failure.value.cause == "too_large" and failure.value.status_code == 413
    assert failure.value.retry_after is None  # no retry can fit them
    assert "larger than the whole prediction spool (SPOOL_MAX_BYTES=30)" in failure.value.message
    assert wal.append(lines("a", "b")) == (0, 22)  # the spool itself takes what fits


def test_segments_already_in_the_database_make_room_before_an_append_is_refused(tmp_path):
    """The active segment is kept while appends may come (``IDLE_RETIRE_S``), even once wholly in the database:
    after one append of most of the cap, every append for that long was refused as full, the database up."""
    wal = open_wal(tmp_path, max_bytes=30)  # one segment: the cap is under the smallest segment size
    _, end = wal.append(lines("a", "b"))
    assert wal.release(end) == 0 and wal.bytes == 22  # in the database, still on disk: idle for less than 30 s
    assert wal.append(lines("c")) == (end, end + 11)  # its room was taken back first
    assert read_ids(wal, position=end) == ["c"] and wal.bytes == 11
    with pytest.raises(SpoolUnavailable) as failure:  # what is not in the database yet is never dropped
        wal.append(lines("d", "e"))
    assert failure.value.cause == "full" and read_ids(wal, position=end) == ["c"]


def test_a_full_disk_first_frees_the_segments_already_in_the_database(small_tmpfs):
    """On a 64 KiB disk, a segment of 40 KB already in the database (kept as the active one for IDLE_RETIRE_S) made
    the next append of 40 KB fail for want of space, though deleting it made room (red team helper-64)."""
    wal = open_wal(small_tmpfs / "spool")
    _, end = wal.append(lines("x" * 40_000))
    wal.release(end)  # in the database, still on disk
    start, _ = wal.append(lines("y" * 40_000))
    assert start == end and read_ids(wal, position=end) == ["y" * 40_000]
    with pytest.raises(SpoolUnavailable) as failure:  # what is not in the database yet is never dropped for room
        wal.append(lines("z" * 40_000))
    assert failure.value.cause == "no_space" and read_ids(wal, position=end) == ["y" * 40_000]


def test_the_room_made_on_a_full_disk_counts_even_when_the_directory_sync_fails(small_tmpfs, monkeypatch):
    """The segment was deleted, but a failing directory fsync had the room read as none, and no second try."""
    wal = open_wal(small_tmpfs / "spool")
    _, end = wal.append(lines("x" * 40_000))
    wal.release(end)

    real_fsync_dir, failed = wal_module.fsync_dir, []

    def fsync_dir_failing_once(path: Path) -> None:  # the deletion's; the new segment's succeeds
        if not failed:
            failed.append(path)
            raise OSError(errno.EIO, "I/O error")
        real_fsync_dir(path)

    monkeypatch.setattr(wal_module, "fsync_dir", fsync_dir_failing_once)
    assert wal.append(lines("y" * 40_000))[0] == end and failed


def test_a_real_full_disk_refuses_appends_and_leaves_only_whole_records(small_tmpfs):
    wal = open_wal(small_tmpfs / "spool")
    appended: list[str] = []
    failure = None
    for i in range(10_000):
        ids = [f"{i}-{n}-{'x' * 150}" for n in range(3)]
        try:
            wal.append(lines(*ids))
        except SpoolUnavailable as error:
            failure = error
            break
        appended += ids
    assert failure is not None and failure.cause == "no_space"
    assert read_ids(wal, max_lines=100_000) == appended  # whole records, nothing torn, nothing glued
    wal.release(wal.end)  # space comes back once the records are in the database (the refused segment is closed)
    wal.append(lines("after"))
    assert read_ids(wal) == ["after"]


# the store through outages

async def submit_stream(store, store_db, count: int, *, down_at: int, up_at: int, metrics: Metrics) -> tuple:
    submitted: list[str] = []
    outage_seen = False
    for i in range(count):
        record = make_record(f"text {i}")
        store.submit(record)  # would raise out of the test if it ever raised
        submitted.append(record.id)
        if i == down_at:
            await asyncio.to_thread(store_db.down)
        if i == up_at:
            await wait_until(lambda: store.health()["spool_rows"] > 0, what="records to be spooled")
            outage_seen = store.health()["status"] == "degraded" and scraped(store, metrics.store_up) == 0
            await asyncio.to_thread(store_db.up)
        await asyncio.sleep(0.003)
    return submitted, outage_seen


@pytest.mark.parametrize("durability", ["ack", "async"])
async def test_outage_in_mid_stream_loses_nothing_and_duplicates_nothing(store_db, store_settings, open_store,
                                                                         durability):
    metrics = Metrics()
    store = await open_store(store_settings(db_pool_timeout_s=0.3, store_durability=durability), metrics,
                             batch_rows=20)
    submitted, outage_seen = await submit_stream(store, store_db, 400, down_at=100, up_at=300, metrics=metrics)
    await wait_until(lambda: store.health()["status"] == "ok" and store.health()["spool_rows"] == 0,
                     timeout=30, what="the spool to be replayed")
    await store.close()  # writes what is still held
    assert outage_seen
    assert store.health()["spool_rows"] == 0 and store.health()["queue_depth"] == 0
    ids = stored_ids(store_db.url)
    assert len(ids) == len(submitted)
    assert set(ids) == set(submitted)
    assert metrics.store_write_errors._value.get() >= 1
    assert metrics.store_replayed._value.get() >= 1
    assert metrics.store_written._value.get() + metrics.store_replayed._value.get() == len(submitted)
    assert scraped(store, metrics.store_up) == 1 and scraped(store, metrics.store_spool_rows) == 0
    assert scraped(store, metrics.store_replaying) == 0


@pytest.mark.parametrize("durability", ["ack", "async"])
async def test_close_spools_while_down_and_next_start_replays(store_db, store_settings, open_store, caplog,
                                                              durability):
    settings = store_settings(db_pool_timeout_s=0.3, store_durability=durability)
    first = await open_store(settings)
    await asyncio.to_thread(store_db.down)
    records = [make_record(f"t{i}") for i in range(30)]
    for record in records:
        first.submit(record)
    await first.close()
    assert first.health()["spool_rows"] == 30 and first.health()["queue_depth"] == 0
    if durability == "async":  # in ack mode nothing was written before close: no failure to report
        assert "ERROR" in {r.levelname for r in caplog.records if "spooling predictions" in r.getMessage()}

    await asyncio.to_thread(store_db.up)
    metrics = Metrics()
    second = await open_store(settings, metrics)
    await wait_until(lambda: second.health()["status"] == "ok", what="the leftover spool to be replayed")
    assert sorted(stored_ids(store_db.url)) == sorted(r.id for r in records)
    assert metrics.store_replayed._value.get() == 30
    await second.close()
    assert not list(settings.spool_dir.glob("wal-*"))  # a clean shutdown leaves no segment behind


async def test_start_with_the_database_down_is_degraded_not_fatal(store_db, store_settings, open_store):
    await asyncio.to_thread(store_db.down)
    store = await open_store(store_settings(db_pool_timeout_s=0.3))
    health = store.health()
    assert health["status"] == "degraded" and health["state"] == "down"
    assert "database unavailable" in health["reason"]
    record = make_record()
    await store.record([record])  # ack mode: durable in the spool although the database is down
    await wait_until(lambda: store.health()["spool_rows"] == 1, what="the record to count as spooled")
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
    # A crash between inserting and deleting the segment: the same records are in the spool again.
    wal = WriteAheadLog(settings.spool_dir, 1 << 30)
    wal.open()
    wal.append(encode_lines([record_row(r, True) for r in records]))
    wal.close()

    metrics = Metrics()
    again = await open_store(settings, metrics)
    await wait_until(lambda: again.health()["status"] == "ok", what="replay")
    assert sorted(stored_ids(store_db.url)) == sorted(r.id for r in records)
    assert metrics.store_write_errors._value.get() == 0


async def test_a_row_the_database_refuses_is_set_aside_not_blocking(store_db, store_settings, open_store):
    settings = store_settings()
    metrics = Metrics()
    store = await open_store(settings, metrics, flush_interval_s=0.5)
    good, bad, later = make_record("one"), make_record("two", label=None), make_record("three")
    await store.record([good, bad, later])  # one batch: the bad row is split off, the others written
    await wait_until(lambda: len(stored_ids(store_db.url)) == 2, what="the good rows")
    assert sorted(stored_ids(store_db.url)) == sorted([good.id, later.id])
    rejected = [json.loads(line) for line in (settings.spool_dir / REJECTED).read_text().splitlines()]
    assert [r["row"]["id"] for r in rejected] == [bad.id]
    await wait_until(lambda: store.health()["rejected_rows"] == 1, what="/health to count the refused row")
    health = store.health()
    assert health["status"] == "ok"
    assert health["rejected_path"] == str(settings.spool_dir / REJECTED)
    assert metrics.store_rejected._value.get() == 1 and metrics.store_write_errors._value.get() == 0


async def test_a_malformed_spool_line_is_set_aside_and_replay_goes_on(store_db, store_settings, open_store):
    settings = store_settings()
    first, second = make_record("first"), make_record("second")
    settings.spool_dir.mkdir(parents=True)
    wal = WriteAheadLog(settings.spool_dir, 1 << 30)
    wal.open()
    wal.append(encode_lines([record_row(first, True), {"id": "broken"}]) + b"not json\n"
               + encode_lines([record_row(second, True)]))
    wal.close()
    (settings.spool_dir / "database.json").write_text(json.dumps(database_identity(settings.database_url)))
    store = await open_store(settings)
    await wait_until(lambda: store.health()["status"] == "ok", what="replay")
    assert sorted(stored_ids(store_db.url)) == sorted([first.id, second.id])
    kept = (settings.spool_dir / REJECTED).read_text()
    assert '"id":"broken"' in kept and '"line":"not json\\n"' in kept
    assert store.health()["rejected_rows"] == 2


# A segment that is not the last cut short or removed on disk: acknowledged records lost, never a torn append


def test_a_segment_removed_between_two_others_is_reported_as_a_loss_not_skipped_silently(tmp_path, caplog):
    wal = open_wal(tmp_path, segment_bytes=30, idle_retire_s=3600)
    for i in range(6):
        wal.append(lines(f"r{i}"))  # 12 bytes a line: segments at 0, 24 and 48
    wal.close()
    (tmp_path / segment_name(24)).unlink()
    again = WriteAheadLog(tmp_path, 1 << 30)
    assert again.open() == 4
    (gap,) = again.gaps
    assert (gap.path, gap.lost_bytes, gap.cut_bytes, gap.estimated_rows) == (tmp_path / segment_name(0), 24, 0, 2)
    (error,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert str(tmp_path / segment_name(0)) in error.getMessage() and "24 bytes" in error.getMessage()
    assert read_ids(again) == ["r0", "r1", "r4", "r5"]


def test_a_torn_append_sealed_in_a_segment_is_not_a_gap(tmp_path):
    """A failed append whose cut also failed leaves its fragment in a segment the next one starts right after
    (``WriteAheadLog._cut_back``): never acknowledged, so nothing was lost."""
    wal = open_wal(tmp_path, segment_bytes=30, idle_retire_s=3600)
    wal.append(lines("a"))
    wal.close()
    with (tmp_path / segment_name(0)).open("ab") as handle:
        handle.write(b'{"id": "to')  # 10 bytes: the next segment starts after them
    (tmp_path / segment_name(21)).write_bytes(lines("b"))
    again = WriteAheadLog(tmp_path, 1 << 30)
    assert again.open() == 2 and again.gaps == []
    assert read_ids(again) == ["a", "b"]


def cut_short_spool(spool_dir: Path, database_url: str) -> tuple[Path, int, int]:
    """A spool of 40 records in several segments, as a previous process left it, the second segment then cut in
    mid-line at about half its size, as the red team did; returns that segment, the bytes removed and the records
    they held (the one cut in two, and those after it)."""
    spool_dir.mkdir(parents=True)
    (spool_dir / "database.json").write_text(json.dumps(database_identity(database_url)))
    wal = WriteAheadLog(spool_dir, 1 << 30, segment_bytes=4000)
    wal.open()
    for i in range(40):  # records of one size: the estimate can be checked
        wal.append(encode_lines([record_row(make_record(f"t{i:03d}"), True)]))
    wal.close()
    segments = sorted(spool_dir.glob("wal-*"))
    assert len(segments) >= 3
    damaged = segments[1]
    data = damaged.read_bytes()
    cut = data.rfind(b"\n", 0, len(data) // 2) + 30
    os.truncate(damaged, cut)
    return damaged, len(data) - cut, data[cut:].count(b"\n")


def test_spool_status_reports_a_segment_cut_short(tmp_path, capsys):
    """`spool status` said "35 predictions" of a spool that had lost 5 answered ones in a cut segment."""
    from server.cli import main

    spool = tmp_path / "spool"
    damaged, lost, lost_records = cut_short_spool(spool, f"sqlite:///{tmp_path}/p.db")
    assert main(["spool", "status", "--spool-dir", str(spool)]) == 0
    status = capsys.readouterr().out
    assert f"{40 - lost_records} predictions, {lost} bytes of acknowledged predictions missing" in status
    assert f"missing: {damaged} ends {lost} bytes before the next segment begins" in status
    assert f"about {lost_records} records" in status and "spool replay" in status


def test_spool_replay_reports_a_segment_cut_short(tmp_path, capsys):
    """A replay of a spool that lost records says so, beside what it replayed, rather than only "replayed 35"."""
    from server.cli import main

    spool, url = tmp_path / "spool", created_database(f"sqlite:///{tmp_path}/p.db")
    damaged, lost, lost_records = cut_short_spool(spool, url)
    assert main(["spool", "replay", "--spool-dir", str(spool), "--into", url]) == 0
    said = capsys.readouterr().out
    assert f"replayed {40 - lost_records} predictions" in said
    assert f"missing: {damaged} ends {lost} bytes before the next segment begins" in said
    assert len(stored_ids(url)) == 40 - lost_records


async def test_a_segment_cut_short_is_reported_as_lost_records_in_the_log_and_on_health(
        store_db, store_settings, open_store, caplog):
    """Red team 68: segment 2 of several cut in mid-line lost 228 answered records, yet the log said "a torn append
    ... (never acknowledged)" and /health said ok with lost_rows 0."""
    settings = store_settings()
    damaged, lost, lost_records = cut_short_spool(settings.spool_dir, settings.database_url)
    metrics = Metrics()
    store = await open_store(settings, metrics)
    await wait_until(lambda: store.health()["state"] == "up", what="the spool to be replayed")
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and str(damaged) in r.getMessage()]
    assert errors and f"ends {lost} bytes before the next segment begins" in errors[0]
    assert not [r for r in caplog.records if "never acknowledged" in r.getMessage()]
    health = store.health()
    assert health["status"] == "degraded" and health["lost_bytes"] == lost
    assert f"{lost} bytes" in health["reason"] and "spool replay" in health["reason"]
    assert health["spool_damage"] == [{"path": str(damaged), "lost_bytes": lost, "estimated_rows": lost_records,
                                       "overlap_bytes": 0}]
    assert scraped(store, metrics.store_spool_lost_bytes) == lost
    assert len(stored_ids(store_db.url)) == 40 - lost_records
