"""Append-only spool file: where prediction rows wait while the database is down.

JSON lines, fsynced once per appended batch, replayed oldest first. Only the
store's writer task uses a spool, one call at a time, so it needs no locks.
A crash in the middle of an append can leave a torn last line; it is cut off
when the spool is opened, because the records on it were never acknowledged
as spooled (their batch's append had not returned).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FILENAME = "predictions.jsonl"


class Spool:
    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / FILENAME
        self.rows = 0  # rows in the file not yet replayed
        self._replayed_bytes = 0  # prefix of the file already in the database (this process)

    def open(self) -> int:
        """Count the rows a previous process left behind (cutting off a torn last line)."""
        if not self.path.exists():
            return 0
        with self.path.open("rb+") as handle:
            data = handle.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                log.warning("spool %s: dropping a torn last line of %d bytes (a crash in mid-write)",
                            self.path, len(data) - end)
                handle.truncate(end)
                os.fsync(handle.fileno())
        self.rows = data.count(b"\n", 0, end)
        return self.rows

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Write rows and fsync before returning: once this returns they survive a crash."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = b"".join(json.dumps(row, separators=(",", ":")).encode() + b"\n" for row in rows)
        with self.path.open("ab") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        self.rows += len(rows)

    def replay(self, insert: Callable[[list[dict[str, Any]]], None], chunk_rows: int) -> int:
        """Feed the rows to ``insert`` in order, ``chunk_rows`` at a time; delete the file when all are in.

        ``insert`` must be idempotent: after a failure, or a crash before the file
        is deleted, rows already inserted are offered again.
        """
        if not self.rows:
            return 0
        if not self.path.exists():
            log.error("spool %s disappeared with %d rows not yet replayed", self.path, self.rows)
            self.rows = self._replayed_bytes = 0
            return 0
        replayed = 0
        with self.path.open("rb") as handle:
            handle.seek(self._replayed_bytes)
            while True:
                lines = [line for line in (handle.readline() for _ in range(chunk_rows)) if line]
                if not lines:
                    break
                insert([row for row in map(_decode, lines) if row is not None])
                self._replayed_bytes = handle.tell()
                self.rows -= len(lines)
                replayed += len(lines)
        self.path.unlink()
        self._replayed_bytes = 0
        self.rows = 0
        return replayed


def _decode(line: bytes) -> dict[str, Any] | None:
    try:
        return json.loads(line)
    except ValueError:
        log.error("spool: skipping an unreadable line: %r", line[:200])
        return None


REJECTED = "rejected.jsonl"


def quarantine(directory: Path, row: dict[str, Any], reason: str) -> Path:
    """Keep a row the database refuses (not retried: it would block the rows behind it)."""
    path = Path(directory) / REJECTED
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"error": reason, "row": row}, separators=(",", ":")) + "\n")
    return path
