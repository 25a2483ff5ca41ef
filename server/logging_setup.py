"""Structured logging: JSON lines for containers, text for humans, request ids on every line.

ERROR lines keep the literal level name in both formats so the runbook's
``docker logs sentiment-analyzer | grep ERROR`` finds them.

A text line's message never breaks the line: its unprintable characters (line breaks, tabs, escape sequences)
are written escaped (``one_line``), so text a client or an admin sent (a reload's ``model_path`` holding a newline
and a forged timestamp) cannot start a line of its own. A traceback follows its message on lines of its own,
each indented (``indented``), so no line of it starts as a log line does. JSON lines escape them by JSON's own
rules.

``LOG_FILE`` is rotated by size: past ``LOG_MAX_BYTES`` it becomes
``LOG_FILE.1`` (older copies shift to ``.2`` ... up to ``LOG_BACKUPS``, the
oldest is deleted), so the file and its copies never hold more than about
``LOG_MAX_BYTES × (LOG_BACKUPS + 1)``. ``LOG_BACKUPS=0`` starts the file
afresh at the size (no copy kept); ``LOG_MAX_BYTES=0`` never rotates (for an
external logrotate: a file it moves or removes is written again at its path).
One process writes the file: the server runs its engine workers as threads,
never as processes.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
from datetime import UTC, datetime
from logging.handlers import RotatingFileHandler
from pathlib import Path

from server.config import Settings
from server.log_writer import BackgroundLogHandler, CountsLostLines, LogWriter, standard_output

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id"}


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", None):
            entry["request_id"] = record.request_id
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:  # what BackgroundLogHandler leaves of a traceback
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


def one_line(text: str) -> str:
    """``text`` with its unprintable characters escaped as Python writes them (``\\n``, ``\\t``, ``\\x1b``)."""
    return text if text.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """``logging.Formatter.format`` with the message on one line and a traceback's lines indented."""
        rid = getattr(record, "request_id", None)
        record.rid = f" [{rid}]" if rid else ""
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        text = self._fmt % {**vars(record), "message": one_line(record.message)}
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for more in (record.exc_text, record.stack_info and self.formatStack(record.stack_info)):
            if more:
                text += "\n" + indented(more)
        return text


def indented(text: str) -> str:
    """A traceback's lines, each indented and on one line: an exception's message holding a line break and a
    forged timestamp would otherwise start a line of its own (red team helper-61)."""
    return "\n".join("  " + one_line(line) for line in text.splitlines())


class SizeRotatingFileHandler(CountsLostLines, RotatingFileHandler):
    """The stdlib's size rotation, which also bounds the file with no backups (the stdlib then never rotates).
    A line it cannot write (a full disk, a removed folder) is counted (``CountsLostLines``); every line still goes
    to standard output. A file removed or renamed under it (``rm``, a logrotate that moves it) is opened again at
    its path before the next line, as the stdlib's ``WatchedFileHandler`` does: lines went on into the removed
    file, which nobody could read and whose space was never freed (red team helper-74)."""

    remedy = "they are on standard output; free space there or point LOG_FILE elsewhere"
    _written: tuple[int, int] | None = None  # (device, inode) of the file the stream writes

    @property
    def output(self) -> str:
        return f"LOG_FILE {self.baseFilename}"

    def _open(self):
        return self._remembered(super()._open())

    def _remembered(self, stream):
        status = os.fstat(stream.fileno())
        self._written = (status.st_dev, status.st_ino)
        return stream

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is not None and not self._still_at_its_path():
            stream, self.stream = self.stream, None  # FileHandler.emit opens it again (or counts the line lost)
            try:
                stream.close()
            except OSError:
                self.handleError(record)
        super().emit(record)

    def _still_at_its_path(self) -> bool:
        try:
            status = os.stat(self.baseFilename)
        except OSError:
            return False
        return (status.st_dev, status.st_ino) == self._written

    def flush(self) -> None:
        """Also where a write fails (the stream buffers): handled here, as in ``close``, so neither can raise."""
        try:
            super().flush()
        except OSError:
            self.handleError(None)

    def close(self) -> None:
        try:
            super().close()  # closing the stream writes what it buffered
        except OSError:
            self.handleError(None)

    def doRollover(self) -> None:
        if self.backupCount > 0:
            super().doRollover()
            return
        if self.stream:
            self.stream.close()
        self.stream = self._remembered(open(self.baseFilename, "w", encoding=self.encoding,  # noqa: SIM115
                                            errors=self.errors))


def file_handler(path: Path, max_bytes: int, backups: int) -> logging.Handler:
    """LOG_FILE, rotated at LOG_MAX_BYTES keeping LOG_BACKUPS copies (0 bytes: never rotated)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return SizeRotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")


def configure_logging(settings: Settings) -> None:
    """Route the root logger (and uvicorn's) to stdout (so `docker logs … | grep` sees it) and LOG_FILE, both
    written by the thread of ``server.log_writer`` (a stalled output cannot stop the server)."""
    formatter: logging.Formatter = JsonFormatter() if settings.log_format == "json" else TextFormatter()
    targets: list[logging.Handler] = [standard_output()]
    if settings.log_file is not None:
        targets.append(file_handler(settings.log_file, settings.log_max_bytes, settings.log_backups))
    for target in targets:
        target.setFormatter(formatter)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    handler = BackgroundLogHandler(LogWriter(targets))
    handler.addFilter(RequestIdFilter())  # on the logging thread, whose context holds the request id
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    if settings.log_format == "json":
        # ONNX Runtime's own logger writes coloured text to stderr, past these handlers: keep it to fatal errors so
        # every line is JSON. What matters reaches the log as the server's own lines (e.g. the CUDA fallback).
        import onnxruntime

        onnxruntime.set_default_logger_severity(4)
