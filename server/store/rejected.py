"""``SPOOL_DIR/rejected.jsonl``: rows the database refused for their content, kept until a fix lets them in.

Each line is ``{"error": ..., "rejected_at": ..., "row": {...}}`` (or ``"line"``: a spool line that is not a
row at all). Appends are fsynced. `sentiment-analyzer spool replay-rejected` offers the rows to the
database again while the server keeps running: it renames the file aside (an append that raced the
rename lands in the renamed file, which the command reads only once it holds the file's lock), and rows
still refused are appended back to a fresh ``rejected.jsonl``. Appenders lock the file with ``flock`` and
check that the name still points at the file they opened. A FIFO or device (or a link to one) under these names
is refused with ``NotRegularFile`` naming it, by every reader and appender, and never renamed aside.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from server.regular_file import open_regular
from server.store.rows import decode_line
from server.store.spooldir import count_lines, fsync_dir, write_all

log = logging.getLogger(__name__)

FILENAME = "rejected.jsonl"
TAKEN_PREFIX = "rejected.replaying-"


class ReplayUnderWay(RuntimeError):
    """Another ``replay-rejected`` holds the directory: two would both offer the taken files, and set the rows
    still refused aside twice."""


class RejectedFile:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / FILENAME

    def append(self, entries: list[dict[str, Any]]) -> None:
        """Write ``entries`` ({"error": ..., "row" or "line": ...}) and fsync before returning; ``OSError`` (a
        full disk) when they are not all kept, the file left as it was."""
        now = datetime.now(UTC).isoformat()
        payload = b"".join(orjson.dumps({"rejected_at": now, **entry}, option=orjson.OPT_APPEND_NEWLINE,
                                        default=str) for entry in entries)
        while True:
            created = not self.path.exists()
            fd = open_regular(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)  # read: a torn last line
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    current = os.stat(self.path).st_ino
                except FileNotFoundError:
                    current = None
                if current != os.fstat(fd).st_ino:
                    continue  # renamed away by replay-rejected between open and lock: open the new one
                try:
                    _append_whole(fd, payload)
                except OSError as error:  # say which file: the writer reports it, the replay commands print it
                    raise OSError(error.errno, error.strerror, str(self.path)) from error
            finally:
                os.close(fd)
            if created:
                fsync_dir(self.directory)
            return

    def count(self) -> int:
        """Rows waiting here (streamed: memory does not depend on the file's size), a torn last line too: the
        replay offers it (``read_entries``)."""
        total = 0
        for path in self._files():
            try:
                with open(open_regular(path), "rb") as handle:
                    total += count_lines(handle) + _ends_unterminated(handle.fileno())
            except FileNotFoundError:
                continue
        return total

    def signature(self) -> tuple[tuple[int, int], ...]:
        """Cheap summary (inode, size) of the files, to tell whether ``count`` must be run again."""
        found = []
        for path in self._files():
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            found.append((stat.st_ino, stat.st_size))
        return tuple(found)

    @contextmanager
    def replaying(self) -> Iterator[None]:
        """Hold the directory for one replay of the rejected rows (a ``flock`` on the directory itself, which
        appenders and the server's spool lock do not use); ``ReplayUnderWay`` while another holds it."""
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ReplayUnderWay(f"another `spool replay-rejected` is offering the rows of {self.directory} "
                                     "now: wait for it to end") from None
            yield
        finally:
            os.close(fd)

    def take(self) -> list[Path]:
        """Move ``rejected.jsonl`` aside for a replay; returns every file taken (earlier interrupted ones too).

        After this returns no appender can still be writing to a returned file. A FIFO or device named
        ``rejected.jsonl`` is refused where it is (``NotRegularFile``), not renamed to a name the operator never saw.
        """
        if self.path.exists():
            os.close(open_regular(self.path))
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            os.rename(self.path, self.directory / f"{TAKEN_PREFIX}{stamp}.jsonl")
            fsync_dir(self.directory)
        taken = sorted(self.directory.glob(f"{TAKEN_PREFIX}*.jsonl"))
        for path in taken:
            with open(open_regular(path), "rb") as handle:  # wait out an append that opened it before the rename
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        return taken

    def _files(self) -> list[Path]:
        return [self.path, *sorted(self.directory.glob(f"{TAKEN_PREFIX}*.jsonl"))]


def _ends_unterminated(fd: int) -> bool:
    """Whether the file's last line has no newline (an append torn by a crash, a hand edit)."""
    size = os.fstat(fd).st_size
    return bool(size) and os.pread(fd, 1, size - 1) != b"\n"


def _append_whole(fd: int, payload: bytes) -> None:
    """Append ``payload`` and fsync, or leave the file as it was and raise: the caller reports the rows as kept
    here (and deletes the spool segment they came from) only when they are, so on an error (a full disk) the file
    is cut back to its size before. A line torn earlier (a crash mid-append, a cut that failed) is ended first, so
    it stays a line of its own instead of spoiling the first new one."""
    size = os.fstat(fd).st_size
    if _ends_unterminated(fd):
        payload = b"\n" + payload
    try:
        write_all(fd, payload)
        os.fsync(fd)
    except OSError:
        try:
            os.ftruncate(fd, size)
        except OSError:
            log.exception("store: %s could not be cut back after a failed append", FILENAME)
        raise


def read_entries(path: Path) -> Iterator[tuple[dict[str, Any] | None, bytes]]:
    """Each line of a rejected file: (its entry, or None when unreadable; the raw line). A last line without its
    newline (a torn append, a hand edit) is read too: rows in it are still offered, and anything else is kept."""
    with open(open_regular(path), "rb") as handle:
        for line in handle:
            yield decode_line(line), line
