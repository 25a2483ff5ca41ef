"""The write-ahead log's segments as found on disk: a segment that runs past the next one's start (lines appended to
it by hand, or by a second process writing the same spool) is reported as damage and skips nothing on read."""

from __future__ import annotations

import concurrent.futures
import json
import logging
from pathlib import Path

import orjson
import pytest

from server.metrics import Metrics
from server.store.state import StoreState
from server.store.wal import WriteAheadLog, read_spool, segment_name

GARBAGE = b'{"not":"a record"}\n'  # 19 bytes: a line, not a record


def lines(*ids: str) -> bytes:
    return b"".join(orjson.dumps({"id": i}) + b"\n" for i in ids)


def overlapping_spool(directory: Path, garbage_lines: int) -> tuple[list[str], Path, int]:
    """Three segments of 30 records (13 bytes each: ``r00``..``r89``), then ``garbage_lines`` lines appended to the
    middle one, as the red team did; returns the ids, the middle segment and the bytes it now runs past the third."""
    directory.mkdir(parents=True, exist_ok=True)
    wal = WriteAheadLog(directory, 1 << 30, segment_bytes=390, idle_retire_s=3600)
    wal.open()
    ids = [f"r{i:02d}" for i in range(90)]
    for i in ids:
        wal.append(lines(i))
    wal.close()
    assert sorted(p.name for p in directory.glob("wal-*")) == [segment_name(0), segment_name(390), segment_name(780)]
    middle = directory / segment_name(390)
    with middle.open("ab") as handle:
        handle.write(GARBAGE * garbage_lines)
    return ids, middle, len(GARBAGE) * garbage_lines


def reopen(directory: Path) -> WriteAheadLog:
    wal = WriteAheadLog(directory, 1 << 30, segment_bytes=390, idle_retire_s=3600)
    wal.open()
    return wal


def read_all(wal: WriteAheadLog, max_lines: int) -> tuple[list[bytes], list[int]]:
    """Every line from the start, ``max_lines`` at a time as the writer reads a backlog; the positions it went by."""
    found, positions, position = [], [wal.start], wal.start
    while position < wal.end:
        got, position = wal.read(position, wal.end, max_lines)
        assert got or position > positions[-1], "the reader made no progress"
        found += got
        positions.append(position)
    return found, positions


@pytest.mark.parametrize("garbage_lines", [1, 300])  # into the third segment's first records; past all of it
def test_a_segment_running_past_the_next_ones_start_is_reported_as_damage(tmp_path, caplog, garbage_lines):
    _, middle, overlap = overlapping_spool(tmp_path, garbage_lines)
    wal = reopen(tmp_path)
    (gap,) = wal.gaps
    assert (gap.path, gap.overlap_bytes, gap.lost_bytes) == (middle, overlap, 0)  # /health sums no negative loss
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert [e for e in errors if f"{middle} runs {overlap} bytes past where the next segment begins" in e]
    assert not [e for e in errors if "cannot be replayed" in e]  # nothing is skipped: not said to be lost
    assert read_spool(tmp_path).gaps == (gap,)


def test_spool_status_reports_an_overlap(tmp_path, capsys):
    from server.cli import main

    _, middle, overlap = overlapping_spool(tmp_path / "spool", 300)
    assert main(["spool", "status", "--spool-dir", str(tmp_path / "spool")]) == 0
    status = capsys.readouterr().out
    assert f"overlapping: {middle} runs {overlap} bytes past where the next segment begins" in status
    assert "bytes of acknowledged predictions missing" not in status and "missing:" not in status


def test_health_says_an_overlap_is_the_spool_written_by_something_else_not_records_missing(tmp_path):
    _, middle, overlap = overlapping_spool(tmp_path, 300)
    state = StoreState(Metrics(), backend="sqlite", durability="ack", spool_limit=1 << 30,
                       rejected_path=tmp_path / "rejected.jsonl", spool_bytes=lambda: 0, call_age_s=lambda: 0.0,
                       stalled_after_s=5.0)
    state.gaps = reopen(tmp_path).gaps
    health = state.health()
    assert health["status"] == "degraded" and "the spool was written by something else" in health["reason"]
    assert "missing" not in health["reason"] and health["lost_bytes"] == 0
    assert health["spool_damage"] == [{"path": str(middle), "lost_bytes": 0, "estimated_rows": 0,
                                       "overlap_bytes": overlap}]


@pytest.mark.parametrize("max_lines", [1000, 7, 1])
@pytest.mark.parametrize("garbage_lines", [1, 300])
def test_every_segment_is_read_from_its_own_first_byte_past_an_overlap(tmp_path, garbage_lines, max_lines):
    """Red team: the reader went on from the end of the middle segment into the middle of the third, skipping its
    first records (11 acknowledged ones lost) or all of them, and nothing said so."""
    ids, _, _ = overlapping_spool(tmp_path, garbage_lines)
    wal = reopen(tmp_path)
    found, positions = read_all(wal, max_lines)
    assert positions == sorted(set(positions)) and positions[-1] == wal.end  # one place per position, in order
    records = [json.loads(line)["id"] for line in found if b'"id"' in line]
    assert records == ids
    assert found.count(GARBAGE) == garbage_lines  # the middle segment is finished first: a replay sets them aside


def test_an_overlap_is_released_like_any_segment_and_appends_go_on_after_it(tmp_path):
    ids, middle, overlap = overlapping_spool(tmp_path, 1)
    wal = reopen(tmp_path)
    end = wal.end
    assert end == 1170 + overlap  # every byte on disk has its own position
    assert wal.append(lines("new")) == (end, end + 13)
    wal.close()
    again = reopen(tmp_path)  # the new segment is named where the bytes on disk end: no gap found before it
    assert [(g.path, g.overlap_bytes, g.lost_bytes) for g in again.gaps] == [(middle, overlap, 0)]
    found, positions = read_all(again, 10)
    assert [json.loads(line)["id"] for line in found if b'"id"' in line] == [*ids, "new"]
    for position in positions:
        again.release(position, force=True)
    assert again.bytes == 0 and not list(tmp_path.glob("wal-*"))


def test_a_spool_without_overlaps_reads_and_names_as_before(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    ids, middle, _ = overlapping_spool(tmp_path, 0)
    wal = reopen(tmp_path)
    assert wal.gaps == [] and not caplog.records
    assert (wal.start, wal.end) == (0, 1170)
    found, positions = read_all(wal, 7)
    assert [json.loads(line)["id"] for line in found] == ids
    assert positions == [*range(0, 1170, 91), 1170]
    assert wal.append(lines("new")) == (1170, 1183)
    assert (tmp_path / segment_name(1170)).exists()


def test_appends_after_an_overlap_whose_next_segment_was_only_a_torn_tail_are_named_after_the_overlap(tmp_path):
    """The third segment, all of it a torn append, is removed at open: the next segment is named where the middle
    one ends on disk, so a reopen finds neither a gap nor an overlap."""
    _, middle, overlap = overlapping_spool(tmp_path, 1)
    (tmp_path / segment_name(780)).write_bytes(b'{"id": "to')
    wal = reopen(tmp_path)
    assert wal.end == 780 + overlap and not (tmp_path / segment_name(780)).exists()
    wal.append(lines("new"))
    wal.close()
    assert (tmp_path / segment_name(780 + overlap)).exists()
    again = reopen(tmp_path)
    assert again.gaps == []
    found, _ = read_all(again, 1000)
    assert [json.loads(line)["id"] for line in found if b'"id"' in line][-2:] == ["r59", "new"]


def test_bytes_kept_follows_appends_and_releases_and_is_read_without_waiting_for_an_append(tmp_path):
    """The loop reads ``bytes_kept`` per request (ack mode's room check); an append holds the lock across its
    fdatasync, so a read that waited for the lock stalled the loop behind the disk (up to 7 ms at 256 clients)."""
    wal = WriteAheadLog(tmp_path, 1 << 30, segment_bytes=390, idle_retire_s=3600)
    wal.open()
    for i in range(45):  # a segment of 30 records, then 15 in the active one
        wal.append(lines(f"r{i:02d}"))
    assert wal.bytes_kept() == 45 * 13
    wal.release(390)  # the first segment is in the database: deleted, so it is not kept
    assert wal.bytes_kept() == 15 * 13
    wal.release(wal.end)  # the active one wholly in the database too, kept while it takes appends
    assert wal.bytes_kept() == 0 and wal.bytes == 15 * 13
    wal.append(lines("r45"))  # appended to: the active segment is kept again, all of it
    assert wal.bytes_kept() == 16 * 13
    with wal._lock:  # an append in progress on another thread (its write and sync)
        read = concurrent.futures.ThreadPoolExecutor(1).submit(wal.bytes_kept)
        assert read.result(timeout=2) == 16 * 13
