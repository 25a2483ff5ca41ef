"""Explicit replays, for `sentiment-analyzer spool ...`: a spool into a database, rejected rows after a fix.

- ``replay_spool``: every record of a spool directory's write-ahead log into a database, oldest first,
  deleting segments as they are done. It takes the directory's lock, so it refuses a spool a running
  server owns (that server replays its own spool); a set-aside ``foreign-*`` directory is removed once
  nothing is left in it.
- ``replay_rejected``: the rows of ``rejected.jsonl`` offered again (e.g. after a constraint was fixed);
  rows still refused go back to ``rejected.jsonl``. It works beside a running server (see
  ``server/store/rejected.py``); if the database refuses every row, nothing changes on disk.

Both are idempotent: running one twice, or after an interruption, inserts nothing twice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from server.store.rejected import RejectedFile, read_entries
from server.store.sink import DatabaseSink
from server.store.spooldir import FOREIGN_PREFIX, IDENTITY_FILE, LOCK_FILE, REPLAY, SpoolDirectory, fsync_dir
from server.store.wal import SpoolGap, WriteAheadLog

log = logging.getLogger(__name__)

CHUNK_ROWS = 1000


@dataclass
class ReplayReport:
    rows: int = 0  # lines read from the spool (records, and damaged lines that are not)
    written: int = 0  # of those, in the database now (inserted, or already there)
    already: int = 0  # of ``written``, already in the database (offered again: not inserted twice)
    rejected: int = 0  # refused for their content, now in rejected.jsonl
    damaged: int = 0  # of ``rejected``, lines that are not records at all (damaged on disk)
    removed: bool = False  # the (foreign) directory was removed, being empty
    gaps: list[SpoolGap] = field(default_factory=list)  # acknowledged records missing from the spool: not replayed


def replay_spool(directory: Path, sink: DatabaseSink, progress: Callable[[int, int], None] | None = None
                 ) -> ReplayReport:
    """Replay ``directory``'s spool into ``sink``'s database. Raises ``SpoolLocked`` if a server (or another
    replay) holds it."""
    spool = SpoolDirectory(directory)
    spool.lock(REPLAY)
    report = ReplayReport()
    try:
        wal = WriteAheadLog(directory, max_bytes=0)
        total = wal.open()
        report.gaps = wal.gaps
        cursor, end = wal.start, wal.end
        while cursor < end:
            lines, after = wal.read(cursor, end, CHUNK_ROWS)
            outcome = sink.write_lines(lines)
            cursor = after
            wal.release(cursor)
            report.rows += len(lines)
            report.written += outcome.written
            report.already += outcome.already
            report.rejected += outcome.rejected
            report.damaged += outcome.damaged
            if progress:
                progress(report.rows, total)
        wal.close()
        report.removed = _remove_if_empty(spool)
    finally:
        spool.unlock()
    return report


def replay_rejected(directory: Path, sink: DatabaseSink) -> ReplayReport:
    """Offer the rejected rows of ``directory`` again; raises ``DatabaseRefuses`` (nothing changed) if all fail,
    ``ReplayUnderWay`` while another replay of them runs."""
    rejected = RejectedFile(directory)
    with rejected.replaying():
        return _replay_taken(rejected, sink)


def _replay_taken(rejected: RejectedFile, sink: DatabaseSink) -> ReplayReport:
    report = ReplayReport()
    for path in rejected.take():
        still: list[dict] = []
        rows: list[dict] = []
        for entry, line in read_entries(path):
            if entry is not None and isinstance(entry.get("row"), dict):
                rows.append(entry["row"])
            else:  # not a row (an unreadable spool line): nothing to offer, kept as it was
                still.append(entry if entry is not None else {"error": "unreadable line", "line": line.decode(
                    errors="replace")})
            if len(rows) >= CHUNK_ROWS:
                _offer(sink, rows, still, report)
                rows = []
        _offer(sink, rows, still, report)
        if still:
            rejected.append(still)
        path.unlink()
        fsync_dir(rejected.directory)
    return report


def _offer(sink: DatabaseSink, rows: list[dict], still: list[dict], report: ReplayReport) -> None:
    if not rows:
        return
    outcome = sink.write(rows, set_aside=False)
    report.rows += len(rows)
    report.written += outcome.written
    report.already += outcome.already
    report.rejected += outcome.rejected
    still.extend(outcome.refused)


def _remove_if_empty(spool: SpoolDirectory) -> bool:
    """Remove a set-aside ``foreign-*`` directory once its records are all replayed and none was rejected."""
    path = spool.path
    if not path.name.startswith(FOREIGN_PREFIX):
        return False
    if {entry.name for entry in path.iterdir()} - {LOCK_FILE, IDENTITY_FILE}:
        return False
    for name in (IDENTITY_FILE, LOCK_FILE):
        (path / name).unlink(missing_ok=True)
    os.rmdir(path)
    fsync_dir(path.parent)
    return True
