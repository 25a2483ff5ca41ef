"""Log lines written by one thread of their own, so that no output the server logs to can stop it.

Each handler wrote its line on the thread that logged it, the event loop for most. A standard output that did not
take it (a pipe whose reader or log driver does not keep up: the pipe's 64 KiB fill, and the write waits) stopped
the whole server: measured with a pipe nobody read, 373 requests with a bad key (one WARNING each) and every
request after them, ``/health`` included, hung. A slow disk under ``LOG_FILE`` did the same a little at a time,
and the time a line took to write showed in the answer it was logged for.

``BackgroundLogHandler`` takes a record on the thread that logs it (the message merged with its arguments, a
traceback made text: what may change or go away after the call) and queues it; ``LogWriter``'s thread formats and
writes it to the real handlers. At most ``QUEUE_RECORDS`` wait: past that a record is dropped and counted rather
than waiting (an output stalled for good would otherwise hold every record in memory), and the count is written
as a WARNING once the output takes lines again. ``flush`` (called by ``logging.shutdown`` at exit) waits at most
``FLUSH_TIMEOUT_S`` for the queue to be written, so a stalled output cannot hold the process at exit either.
A ``kill -9`` loses what is queued: a few lines, written within milliseconds otherwise.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import queue
import sys
import threading
import time

QUEUE_RECORDS = 10_000  # each message at most MESSAGE_CHARS: about 20 MB at most, minutes of a busy server's lines
MESSAGE_CHARS = 2_000  # a longer message is cut (a 60 KB path in a refusal's line: 10,000 of them held 600 MB)
FLUSH_TIMEOUT_S = 5.0
_EXCEPTIONS = logging.Formatter()  # only its formatException: a traceback as the standard text


class LogWriter:
    """The thread that writes queued records to ``targets``, the handlers that used to be the root logger's."""

    def __init__(self, targets: list[logging.Handler]) -> None:
        self.targets = targets
        self.queue: queue.Queue[logging.LogRecord | threading.Event | None] = queue.Queue(QUEUE_RECORDS)
        self.dropped = 0  # records refused by a full queue
        self._dropping = threading.Lock()  # several threads log: the engine's, the store's, the event loop
        self._said_dropped = 0  # of those, how many a WARNING has already reported; only the writer reads it
        self.stalled = False  # a flush gave up: the output takes nothing, and no later flush waits for it again
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def put(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            with self._dropping:
                self.dropped += 1

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record queued before this call is written (True), or ``timeout`` seconds (default
        ``FLUSH_TIMEOUT_S``; False)."""
        timeout = FLUSH_TIMEOUT_S if timeout is None else timeout
        if self.stalled or not self._thread.is_alive():
            return False
        written = threading.Event()
        try:
            self.queue.put(written, timeout=timeout)
        except queue.Full:
            self.stalled = True
            return False
        self.stalled = not written.wait(timeout)
        return not self.stalled

    def close(self) -> None:
        """Write what is queued (within ``FLUSH_TIMEOUT_S``), end the thread, close the targets. A target still
        writing after that is left as it is: closing a file waits for its write."""
        if not self.flush():
            return
        try:  # lines logged since the flush are written too, but no longer waited for than it
            self.queue.put(None, timeout=FLUSH_TIMEOUT_S)
        except queue.Full:
            return
        self._thread.join(FLUSH_TIMEOUT_S)
        if self._thread.is_alive():
            return
        for target in self.targets:
            target.close()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if isinstance(item, threading.Event):
                for target in self.targets:
                    target.flush()
                item.set()
                continue
            self._say_dropped()
            self._write(item)

    def _say_dropped(self) -> None:
        dropped = self.dropped
        if dropped > self._said_dropped:
            record = logging.LogRecord("server.logging", logging.WARNING, __file__, 0,
                                       "%d log lines were dropped: the log's output did not take them as fast as "
                                       "they came (a stalled pipe or log driver, a slow disk)",
                                       (dropped - self._said_dropped,), None)
            self._said_dropped = dropped
            self._write(record)

    def _write(self, record: logging.LogRecord) -> None:
        """``emit``, not ``handle``: only this thread uses the targets, and a write stalled here must hold no lock
        that ``logging.shutdown`` takes at exit."""
        for target in self.targets:
            if record.levelno >= target.level:
                target.emit(record)


class CountsLostLines:
    """For a handler: a line it cannot write is counted, and said in one line on standard error at most once a
    minute, where the stdlib printed a 25-line traceback for every line: on a full disk or a closed pipe, any
    client sending a bad key could fill standard error with them."""

    REPORT_EVERY_S = 60.0
    lost = 0  # lines this handler could not write
    _reported_at = -math.inf
    output = "?"  # what cannot be written, as the line names it
    remedy = "?"  # where the lines are instead, and what to do

    def handleError(self, record: logging.LogRecord | None) -> None:
        self.lost += 1
        now = time.monotonic()
        if now - self._reported_at < self.REPORT_EVERY_S:
            return
        self._reported_at = now
        error = sys.exc_info()[1]
        try:
            sys.stderr.write(f"ERROR {self.output} cannot be written ({type(error).__name__}: {error}); {self.lost} "
                             f"lines lost from it so far; {self.remedy}\n")
        except OSError:
            pass


class OutputHandler(CountsLostLines, logging.Handler):
    """Each line written straight to a file descriptor (standard output's), nothing buffered or locked on the
    way: a write stalled on a full pipe then holds nothing the interpreter flushes at exit (``sys.stdout``'s
    buffer would be, and the exit would abort or wait for it)."""

    output = "standard output"
    remedy = "its reader has gone or its disk is full (LOG_FILE has the lines, when set)"

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = memoryview((self.format(record) + "\n").encode("utf-8", "backslashreplace"))
            while data:
                data = data[os.write(self.fd, data):]
        except Exception:
            self.handleError(record)


def standard_output() -> logging.Handler:
    """An ``OutputHandler`` on standard output's descriptor; a plain stream handler where ``sys.stdout`` has no
    descriptor (replaced by a test's capture)."""
    try:
        return OutputHandler(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        return logging.StreamHandler(sys.stdout)


def lost_log_lines() -> dict[str, int]:
    """Log lines this process lost so far, by why (``sentiment_log_lines_lost_total``): ``queue_full``, dropped
    while the output stalled; ``unwritable``, refused by an output (a full disk, a closed pipe). Read from the
    root logger's ``BackgroundLogHandler``, which ``server.logging_setup`` installs; none, none lost."""
    lost = {"queue_full": 0, "unwritable": 0}
    for handler in logging.getLogger().handlers:
        if isinstance(handler, BackgroundLogHandler):
            lost["queue_full"] += handler.writer.dropped
            lost["unwritable"] += sum(target.lost for target in handler.writer.targets
                                      if isinstance(target, CountsLostLines))
    return lost


class BackgroundLogHandler(logging.Handler):
    """Queues each record for ``LogWriter``; ``filters`` run here, on the logging thread (a request id is read
    from that thread's context)."""

    def __init__(self, writer: LogWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.put(self._detached(record))
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        super().close()

    @staticmethod
    def _detached(record: logging.LogRecord) -> logging.LogRecord:
        """A copy that holds nothing the logging thread may change or free: the message with its arguments
        merged, a traceback as text."""
        record = copy.copy(record)
        message = record.getMessage()
        if len(message) > MESSAGE_CHARS:
            message = f"{message[:MESSAGE_CHARS]}… ({len(message) - MESSAGE_CHARS} more characters)"
        record.msg, record.args = message, None
        if record.exc_info:
            record.exc_text = record.exc_text or _EXCEPTIONS.formatException(record.exc_info)
            record.exc_info = None
        return record
