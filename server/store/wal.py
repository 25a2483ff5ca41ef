"""The write-ahead log (WAL): every record is here, synced to disk, before the database has it.

Layout: ``SPOOL_DIR/wal-<LSN>.jsonl`` segments, one JSON record per line (``server/store/rows.py``). An
LSN (log sequence number) is a byte offset in the whole log, so a segment's name is the LSN of its first
byte and a position anywhere in the log is one integer; the writer keeps one: "everything before it is in
the database".

- **Append** (the group committer's thread, or an engine worker syncing a lone request's records: one at a
  time, under the committer's order lock, ``committer.py``): the lines of every request finishing together are
  written with one ``write`` and one ``fdatasync`` (what fsync does for the data and the file's size,
  without the timestamp updates that made fsync's p90 ten times longer on the development VM: 2.5 ms
  against 0.3 ms). If either fails (ENOSPC, EIO) the segment is truncated back to where the append began
  and synced, so a torn line can never glue onto the next record, and the failure is raised as
  ``SpoolUnavailable``. Should the truncation fail as well, the segment is
  sealed (its readable end remembered). Either way the next append starts a new segment, so the failed
  one is deleted as soon as its records are in the database (a disk smaller than a segment frees up).
- **Capacity**: an append that would take the log past ``SPOOL_MAX_BYTES`` fails with cause ``full``, once the
  segments already wholly in the database are deleted (the active one too: a single large append kept it, and
  the cap with it, filled for ``IDLE_RETIRE_S`` with the database up). An append larger than the whole cap can
  never fit: it fails with ``RecordsTooLarge`` (413, no Retry-After), not as a full spool to retry. An append the
  disk refuses for want of space (ENOSPC) is tried once more after the same deletion.
- **Rotation and release**: a new segment when the active one would pass ``SEGMENT_BYTES`` (at most a
  quarter of ``SPOOL_MAX_BYTES``, so a full spool always holds segments the database can free). A segment is
  deleted, and the directory fsynced, once every line in it is in the database; the active one too once
  it is fully released and has had no append for ``IDLE_RETIRE_S``, so an idle server's spool is empty.
- **Open**: segments are found by name; a torn tail on the last one (a crash in mid-append: those
  records were never acknowledged) is cut off. Any other segment must run up to where the next one starts (its
  name): one that ends short of it, mid-line or not, lost acknowledged records to damage on disk (a cut, a
  removal by hand), which is reported as such (``SpoolGap``: an ERROR naming the file and the bytes missing,
  /health degraded, ``spool status``), never as a torn append. One that runs past it (lines appended to it by hand,
  or by a second process writing the same spool) is reported there too (``SpoolGap.overlap_bytes``), and the
  segments after it are given positions moved up by as much, so every byte on disk has a position of its own: the
  reader finishes that segment and reads the next from its first byte (positions in its name's range would have
  sought into the middle of the next one, skipping acknowledged records unsaid: red team). Lines are counted by
  streaming the files, so the memory a start needs does not depend on the spool's size. A FIFO or device (or a
  link to one) named like a segment is refused with ``NotRegularFile`` naming it (the server does not start), never
  waited on, read or deleted.

One lock covers the segment list: appends (committer or engine worker), reads and releases (the store's database
thread) and the CLI never see it half-changed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from server.primitives import ServerError
from server.regular_file import open_regular
from server.store.rows import decode_line
from server.store.spooldir import READ_CHUNK, count_lines, fsync_dir, write_all

log = logging.getLogger(__name__)

SEGMENT_BYTES = 4 << 20
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
IDLE_RETIRE_S = 30.0  # long enough that a quiet server does not create and sync a new segment per request
_SEGMENT_NAME = re.compile(r"^wal-(\d{20})\.jsonl$")


class SpoolUnavailable(ServerError):
    """The write-ahead log cannot take records; ``cause`` is ``full``, ``no_space``, ``io_error`` or ``too_large``.

    ``message`` is the client's answer and names no file (where the server keeps its files is its own business);
    ``str()``, what the log and /health say, is ``detail`` when given: it names the file at fault, so that the
    operator knows what to fix (a FIFO planted as the next segment was "not a regular file ... remove it", naming
    nothing to remove)."""

    status_code = 503
    error_type = "store_unavailable"
    retry_after = 5.0

    def __init__(self, cause: str, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        self.detail = detail or message

    def __str__(self) -> str:
        return self.detail


class RecordsTooLarge(SpoolUnavailable):
    """One request's records are larger than the whole spool (``SPOOL_MAX_BYTES``): no retry can fit them, so
    the answer is 413 without Retry-After, and the spool itself is not refusing anything (cause ``too_large``)."""

    status_code = 413
    error_type = "too_large"
    retry_after = None

    def __init__(self, size: int, max_bytes: int) -> None:
        super().__init__("too_large", f"these records ({size} bytes) are larger than the whole prediction spool "
                                      f"(SPOOL_MAX_BYTES={max_bytes}): send fewer or shorter texts per request")


def segment_name(lsn: int) -> str:
    return f"wal-{lsn:020d}.jsonl"


def is_segment(name: str) -> bool:
    return _SEGMENT_NAME.match(name) is not None


@dataclass
class Segment:
    start: int  # the LSN of its first byte: its name's, moved up past a segment that overlaps it (``open``)
    path: Path
    size: int
    readable_end: int | None = None  # set when a failed append could not be cut off: read no further
    cut_short: bool = False  # ends mid-record before the next segment's start: its last bytes are a lost record's

    @property
    def end(self) -> int:
        return self.start + self.size


class WriteAheadLog:
    def __init__(self, directory: Path, max_bytes: int, *, segment_bytes: int = SEGMENT_BYTES,
                 idle_retire_s: float = IDLE_RETIRE_S) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._segment_bytes = min(segment_bytes, max(64 << 10, max_bytes // 4))  # several segments under the cap
        self._idle_retire_s = idle_retire_s
        self._lock = threading.Lock()
        self._segments: list[Segment] = []
        self._fd: int | None = None  # open on the last segment while it takes appends
        self._bytes = 0
        self._end_lsn = 0  # the next append's LSN; kept when every segment has been released
        self._shift = 0  # a new segment's LSN less the one in its name: what overlaps moved the last segment by
        self._released = 0  # everything before this LSN is in the database (the latest ``release``)
        self._last_append = 0.0
        self._kept = 0  # ``bytes_kept``, counted as each change under the lock ends (``_changing``)
        self.gaps: list[SpoolGap] = []  # acknowledged records found missing at ``open`` (or segments overlapping)

    @property
    def bytes(self) -> int:
        """Bytes of every segment on disk (what SPOOL_MAX_BYTES caps)."""
        return self._bytes

    @property
    def start(self) -> int:
        with self._lock:
            return self._segments[0].start if self._segments else self._end()

    @property
    def end(self) -> int:
        with self._lock:
            return self._end()

    def _end(self) -> int:
        return self._end_lsn

    def bytes_kept(self) -> int:
        """Bytes on disk once every segment wholly in the database is deleted: what the next append finds at best
        (``_make_room``), as of the last change. Read without the lock: the event loop asks per request
        (``PredictionStore.room_for``), and the lock is held across each append's fdatasync, so waiting for it
        stalled the loop behind the spool's disk (12 us per request on average, up to 7 ms, at 256 clients)."""
        return self._kept

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """The lock, for a change to the segments; ``bytes_kept`` is counted again before it is let go."""
        with self._lock:
            try:
                yield
            finally:
                self._kept = self._bytes - sum(s.size for s in self._segments if s.end <= self._released)

    def open(self) -> int:
        """Find the segments a previous process left, report missing ranges (``gaps``), cut off a torn tail;
        returns how many lines they hold."""
        with self._changing():
            found = sorted((int(m.group(1)), p) for p in self.directory.iterdir()
                           if (m := _SEGMENT_NAME.match(p.name)))
            scans = [_scan(start, path) for start, path in found]
            self.gaps = find_gaps(scans)
            for gap in self.gaps:
                if gap.overlap_bytes:
                    log.error("spool: %s", gap.describe())
                else:
                    log.error("spool: %s; they cannot be replayed. %s", gap.describe(), GAP_ADVICE)
            cut_short = {gap.path for gap in self.gaps if gap.cut_bytes}
            overlaps = {gap.path: gap.overlap_bytes for gap in self.gaps if gap.overlap_bytes}
            segments, removed, lines, shift = [], False, 0, 0
            for scan in scans:  # a torn tail holds no newline: the count stands after its cut
                if scan.size == 0:
                    scan.path.unlink()
                    removed = True
                else:
                    segments.append(Segment(scan.start + shift, scan.path, scan.size,
                                            cut_short=scan.path in cut_short))
                    lines += scan.lines
                shift += overlaps.get(scan.path, 0)  # the segments after one that overlaps start where it ends
            if segments and not _cut_torn_tail(segments[-1]):
                segments.pop()
                removed = True
            if removed:
                fsync_dir(self.directory)
            self._segments = segments
            self._bytes = sum(s.size for s in segments)
            self._end_lsn = segments[-1].end if segments else 0
            # New segments are named on from the last one's name, where its bytes end: a reopen finds no gap there.
            self._shift = segments[-1].start - _name_lsn(segments[-1].path) if segments else 0
        return lines

    def append(self, payload: bytes) -> tuple[int, int]:
        """Write and sync ``payload`` (whole lines); returns its (start, end) LSN. Raises ``SpoolUnavailable``."""
        with self._changing():
            if len(payload) > self.max_bytes:
                raise RecordsTooLarge(len(payload), self.max_bytes)
            if self._bytes + len(payload) > self.max_bytes:
                self._make_room()
            if self._bytes + len(payload) > self.max_bytes:
                raise SpoolUnavailable("full", f"the prediction spool is full ({self._bytes} bytes of "
                                               f"SPOOL_MAX_BYTES={self.max_bytes})")
            try:
                return self._write(payload)
            except OSError as error:
                if error.errno not in NO_SPACE or not self._make_room():
                    raise _unavailable(error) from error
            try:  # once more, in the room segments already in the database left on the disk (red team helper-64)
                return self._write(payload)
            except OSError as error:
                raise _unavailable(error) from error

    def _make_room(self) -> int:
        """Delete the segments already in the database, the active one too; the bytes freed. What cannot be
        deleted stays counted, and the writer's next release reports why."""
        before = self._bytes  # counted down per segment deleted, also when a later one or the directory sync fails
        with contextlib.suppress(OSError):
            self._drop_released(force=True)
        return before - self._bytes

    def _write(self, payload: bytes) -> tuple[int, int]:
        """Append and sync ``payload`` under the lock; an ``OSError`` leaves no part of it in the log."""
        segment, fd = self._writable(len(payload))
        begin = segment.size
        try:
            write_all(fd, payload)
            os.fdatasync(fd)
        except OSError:
            self._cut_back(segment, fd, begin)
            self._retire_active()
            raise
        segment.size += len(payload)
        self._bytes += len(payload)
        self._end_lsn = segment.end
        self._last_append = time.monotonic()
        return segment.start + begin, segment.end

    def read(self, position: int, stop: int, max_lines: int) -> tuple[list[bytes], int]:
        """Up to ``max_lines`` whole lines from ``position`` (an LSN) up to ``stop``; returns them and the next LSN.

        A fragment without its newline (the end of a segment sealed after a failed append) is skipped: no
        append that wrote it ever returned. Memory is bounded by ``max_lines``, not by the segment.
        """
        with self._lock:
            plan = [(s.start, s.path, min(stop, s.readable_end or s.end), s.cut_short) for s in self._segments]
        lines: list[bytes] = []
        for start, path, limit, cut_short in plan:
            if limit <= position:
                continue
            position = max(position, start)  # a gap, reported as lost at ``open`` (``gaps``), is skipped
            try:
                with open(open_regular(path), "rb") as handle:
                    handle.seek(position - start)
                    while position < limit and len(lines) < max_lines:
                        line = handle.readline(limit - position)
                        if not line:
                            log.error("spool: %s ends before the log says it does; skipping to the next segment",
                                      path)
                            position = limit
                            break
                        position += len(line)
                        if line.endswith(b"\n"):
                            lines.append(line)
                        elif cut_short:
                            log.error("spool: skipping %d bytes of an acknowledged record cut short at the end of "
                                      "%s (lost: reported at start)", len(line), path)
                        else:
                            log.warning("spool: skipping %d bytes of a torn append at the end of %s (never "
                                        "acknowledged)", len(line), path)
            except FileNotFoundError:
                log.error("spool: segment %s disappeared before its records reached the database", path)
                position = limit
            if len(lines) >= max_lines or position >= stop:
                break
        return lines, position

    def release(self, upto: int, *, force: bool = False) -> int:
        """Delete segments whose every line is before ``upto`` (in the database); returns the bytes freed.

        The active segment goes too when fully released and idle for ``IDLE_RETIRE_S`` (or ``force``).
        """
        with self._changing():
            self._released = max(self._released, upto)
            return self._drop_released(force)

    def _drop_released(self, force: bool) -> int:
        """Delete the segments wholly before ``_released`` (the active one only when idle, or ``force``); the
        bytes freed. Under the lock."""
        freed = 0
        while self._segments and self._segments[0].end <= self._released:
            segment = self._segments[0]
            active = len(self._segments) == 1 and self._fd is not None
            if active and not force and time.monotonic() - self._last_append < self._idle_retire_s:
                break
            if active:
                os.close(self._fd)
                self._fd = None
            segment.path.unlink(missing_ok=True)
            self._segments.pop(0)
            self._bytes -= segment.size  # counted as it goes: a failing unlink or directory sync leaves it exact
            freed += segment.size
        if freed:
            fsync_dir(self.directory)
        return freed

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # appends, under the lock

    def _writable(self, size: int) -> tuple[Segment, int]:
        if self._fd is not None and os.fstat(self._fd).st_nlink == 0:
            # Deleted by hand (e.g. SPOOL_DIR emptied during an incident): what is written there would not
            # survive the process, so start a new segment; what it held is read back from memory or lost.
            log.error("spool: segment %s was deleted while in use; starting a new one", self._segments[-1].path)
            os.close(self._fd)
            self._fd = None
        elif self._fd is not None and self._segments[-1].size \
                and self._segments[-1].size + size > self._segment_bytes:
            os.close(self._fd)
            self._fd = None
        if self._fd is None:
            segment = Segment(self._end(), self.directory / segment_name(self._end() - self._shift), 0)
            self._fd = open_regular(segment.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                fsync_dir(self.directory)
            except OSError:
                os.close(self._fd)
                self._fd = None
                segment.path.unlink(missing_ok=True)
                raise
            self._segments.append(segment)
        return self._segments[-1], self._fd

    def _retire_active(self) -> None:
        """After a failed append, stop appending to the active segment, so it can be deleted like the others
        once its records are in the database: on a disk smaller than a segment it would otherwise never
        rotate, and the spool would stay full with the database up. An empty one is removed at once."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._segments and self._segments[-1].size == 0:
            self._segments.pop().path.unlink(missing_ok=True)

    def _cut_back(self, segment: Segment, fd: int, size: int) -> None:
        """Undo a failed append: truncate to ``size``; if even that fails, seal the segment at ``size``."""
        try:
            os.ftruncate(fd, size)
            os.fdatasync(fd)
            return
        except OSError as error:
            log.error("spool: could not cut a failed append off %s (%s); sealing it and starting a new segment",
                      segment.path, error)
        try:
            actual = os.fstat(fd).st_size
        except OSError:
            actual = size
        segment.readable_end = segment.start + size
        self._bytes += actual - segment.size
        segment.size = actual
        self._end_lsn = segment.end
        os.close(fd)
        self._fd = None


def _unavailable(error: OSError) -> SpoolUnavailable:
    """The client's message names no file; the log's (``detail``) names the one the error is about, if any."""
    if error.errno in NO_SPACE:
        return SpoolUnavailable("no_space", "no space left on the prediction spool's disk (SPOOL_DIR)")
    said, why = "the prediction spool (SPOOL_DIR) cannot be written: ", error.strerror or type(error).__name__
    return SpoolUnavailable("io_error", said + why, f"{said}{error.filename}: {why}" if error.filename else None)


def count_spool(directory: Path) -> tuple[int, int]:
    """Lines and bytes in the segments of a spool directory (streamed, not parsed: the server's report of a spool it
    set aside; ``read_spool`` tells records from damaged lines, for ``spool status``)."""
    rows = size = 0
    for path in Path(directory).iterdir():
        if is_segment(path.name):
            try:
                segment_size, segment_rows = _size_and_lines(path)
                size, rows = size + segment_size, rows + segment_rows
            except FileNotFoundError:  # released (replayed into the database) since the listing: nothing left
                continue
    return rows, size


@dataclass(frozen=True)
class SpoolContents:
    """What the segments of a spool directory hold, read line by line (``read_spool``)."""

    records: int
    damaged: int  # lines that are not records at all (not a JSON object): a replay sets them aside
    bytes: int
    gaps: tuple[SpoolGap, ...] = ()  # acknowledged records missing between segments (damage on disk)


LINE_LIMIT = 64 << 20  # a longer line is counted damaged, never held (a record needs MAX_TEXT_CHARS in the millions)


def read_spool(directory: Path) -> SpoolContents:
    """Records, damaged lines, bytes and missing ranges (``find_gaps``) in the segments of a spool directory, each
    line parsed as a replay would (``spool status``: counting lines called a damaged one a prediction, and a segment
    cut short went unmentioned). Streamed: a line at a time."""
    records = damaged = 0
    scans = []
    for path in Path(directory).iterdir():
        if is_segment(path.name):
            try:
                with open(open_regular(path), "rb") as handle:
                    size = os.fstat(handle.fileno()).st_size
                    whole = _last_line_end(handle, size)
                    handle.seek(0)
                    good, bad = _records_and_damaged(handle)
            except FileNotFoundError:  # released (replayed into the database) since the listing: nothing left
                if os.path.lexists(path):  # still there: a link to nothing, which a replay cannot read either
                    raise
                continue
            records, damaged = records + good, damaged + bad
            scans.append(_Scan(_name_lsn(path), path, size, good + bad, size - whole))
    scans.sort(key=lambda scan: scan.start)
    return SpoolContents(records, damaged, sum(scan.size for scan in scans), tuple(find_gaps(scans)))


GAP_ADVICE = ("Check SPOOL_DIR's disk (dmesg, fsck) and whatever else writes there; if a backup or snapshot holds "
              "the segment whole, copy it into an empty directory and run `sentiment-analyzer spool replay "
              "--spool-dir DIR --into DATABASE_URL` (records already stored are not inserted twice); otherwise "
              "those predictions are lost: their ids are not in the database")


@dataclass(frozen=True)
class SpoolGap:
    """Bytes missing between a segment and the next one's start (its name): acknowledged records lost to damage on
    disk (a cut, a removal by hand). Never a torn append: only the last segment takes appends, so only it can end
    in one. The records cannot be counted, their bytes being gone: ``estimated_rows`` is an estimate.

    Or the opposite, ``overlap_bytes``: the segment runs that many bytes past the next one's start (lines appended
    to it by hand, or by a second process writing the same spool). Damage all the same (something other than this
    spool's writer wrote there), reported where gaps are, but nothing is missing: ``lost_bytes``, ``cut_bytes`` and
    ``estimated_rows`` are 0, so /health's lost bytes stay a sum of bytes lost, and the reader skips none of it."""

    path: Path  # the segment that ends short (or runs past)
    lost_bytes: int  # from its end to where the next segment starts
    cut_bytes: int  # the head of a record it ends with, cut mid-line (unreadable: its rest is in the lost bytes)
    estimated_rows: int | None  # records lost, from the spool's average line; None with no whole line to go by
    average_bytes: int | None  # that average
    overlap_bytes: int = 0  # from where the next segment starts to its end (then lost_bytes is 0)

    def describe(self) -> str:
        if self.overlap_bytes:
            return (f"{self.path} runs {self.overlap_bytes} bytes past where the next segment begins: written there by "
                    "something other than this spool's writer (by hand, or a second process on the same SPOOL_DIR). "
                    "Nothing is skipped: its lines are read to its end, then the next segment's from its first byte; "
                    "find what else writes SPOOL_DIR")
        cut = f", in the middle of a record ({self.cut_bytes} bytes of it left)" if self.cut_bytes else ""
        about = (f"about {self.estimated_rows} records (an estimate from the spool's average record of "
                 f"{self.average_bytes} bytes)" if self.estimated_rows else "records that cannot be counted")
        return (f"{self.path} ends {self.lost_bytes} bytes before the next segment begins{cut}: acknowledged "
                f"predictions are missing from the spool (the file was cut short or removed on disk): {about}")


@dataclass(frozen=True)
class _Scan:
    """One segment as found on disk."""

    start: int
    path: Path
    size: int
    lines: int  # whole lines
    cut_bytes: int  # bytes after its last newline


def _scan(start: int, path: Path) -> _Scan:
    """A segment's bytes, lines and unterminated tail, read once it is known to be a regular file: a FIFO or a link to
    a device has size 0, and was deleted as an empty segment, hiding what had been planted there."""
    with open(open_regular(path), "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        whole = _last_line_end(handle, size)
        handle.seek(0)
        return _Scan(start, path, size, count_lines(handle), size - whole)


def find_gaps(scans: list[_Scan]) -> list[SpoolGap]:
    """Every segment but the last that ends before the next one starts, or after it (``overlap_bytes``), in log
    order (``scans`` too)."""
    lines = sum(scan.lines for scan in scans)
    average = round(sum(scan.size - scan.cut_bytes for scan in scans) / lines) if lines else None
    gaps = []
    for scan, after in zip(scans, scans[1:], strict=False):
        lost = after.start - (scan.start + scan.size)
        if lost > 0:
            estimate = max(1, round((lost + scan.cut_bytes) / average)) if average else None
            gaps.append(SpoolGap(scan.path, lost, scan.cut_bytes, estimate, average))
        elif lost < 0:
            gaps.append(SpoolGap(scan.path, 0, 0, 0, average, overlap_bytes=-lost))
    return gaps


def _records_and_damaged(handle: BinaryIO) -> tuple[int, int]:
    """The whole lines from ``handle`` that are records and that are not; a torn tail (no newline) is neither,
    as for ``count_lines``."""
    records = damaged = 0
    while line := handle.readline(LINE_LIMIT):
        if not line.endswith(b"\n"):
            if len(line) < LINE_LIMIT or not _skip_to_next_line(handle):
                break
            damaged += 1
        elif decode_line(line) is None:
            damaged += 1
        else:
            records += 1
    return records, damaged


def _skip_to_next_line(handle: BinaryIO) -> bool:
    """Read past the next newline; False at the end of the file without one."""
    while chunk := handle.read(READ_CHUNK):
        newline = chunk.find(b"\n")
        if newline >= 0:
            handle.seek(newline + 1 - len(chunk), os.SEEK_CUR)
            return True
    return False


def _name_lsn(path: Path) -> int:
    """The LSN a segment's name gives."""
    return int(_SEGMENT_NAME.match(path.name).group(1))


def _size_and_lines(path: Path) -> tuple[int, int]:
    """A segment's bytes and newlines (``_scan``)."""
    scan = _scan(0, path)
    return scan.size, scan.lines


def _last_line_end(handle: BinaryIO, size: int) -> int:
    """The offset just after the file's last newline (0 without one), read backwards a block at a time."""
    if size == 0:
        return 0
    handle.seek(size - 1)
    if handle.read(1) == b"\n":
        return size
    position = size
    while position > 0:
        step = min(64 * 1024, position)
        position -= step
        handle.seek(position)
        found = handle.read(step).rfind(b"\n")
        if found >= 0:
            return position + found + 1
    return 0


def _cut_torn_tail(segment: Segment) -> bool:
    """Truncate the segment after its last newline; False if nothing whole is left (the file is removed)."""
    with open(open_regular(segment.path, os.O_RDWR), "rb+") as handle:
        end = segment.size
        keep = _last_line_end(handle, end)
        if keep == end:
            return True
        log.warning("spool %s: cutting off a torn last line of %d bytes (a crash in mid-append; never acknowledged)",
                    segment.path, end - keep)
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
    segment.size = keep
    if keep == 0:
        segment.path.unlink()
        return False
    return True
