"""Log lines are written by a thread of their own: an output that does not take them cannot stop the server."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

import httpx
import pytest

from scripts.benchlib.serverproc import start_server
from server import auth, log_writer
from server.log_writer import BackgroundLogHandler, LogWriter, OutputHandler
from server.metrics import Metrics


class HeldHandler(logging.Handler):
    """Writes nothing until ``opened`` is set, as a pipe nobody reads; then keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = threading.Event()
        self.holding = threading.Event()  # set once a record waits in ``emit``
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.holding.set()
        self.opened.wait()
        self.lines.append(self.format(record))


@pytest.fixture
def held(monkeypatch) -> HeldHandler:
    monkeypatch.setattr(log_writer, "QUEUE_RECORDS", 5)
    return HeldHandler()


def test_records_past_the_queue_are_dropped_counted_and_reported_once_the_output_takes_lines(held) -> None:
    handler = BackgroundLogHandler(LogWriter([held]))
    logger = logging.Logger("test.held")
    logger.addHandler(handler)
    logger.warning("line 0")
    assert held.holding.wait(5)  # taken by the held writer (on a loaded machine it took it after lines behind it
    # had been dropped: the drops were then reported in two parts, 8 and 6)
    for n in range(1, 20):  # 5 wait, the rest are dropped
        logger.warning("line %d", n)
    assert handler.writer.dropped == 14
    held.opened.set()
    assert handler.writer.flush(timeout=5)
    logger.warning("after")
    assert handler.writer.flush(timeout=5)
    dropped = [line for line in held.lines if "log lines were dropped" in line]
    assert dropped == [f"{handler.writer.dropped} log lines were dropped: the log's output did not take them as "
                       "fast as they came (a stalled pipe or log driver, a slow disk)"]
    kept = [line for line in held.lines if line not in dropped]
    assert kept[:2] == ["line 0", "line 1"] and kept[-1] == "after" and len(kept) == 21 - handler.writer.dropped
    handler.close()


def test_a_record_keeps_what_it_said_when_it_was_logged(held) -> None:
    """Arguments are merged and a traceback made text on the logging thread: they may change or be gone later."""
    handler = BackgroundLogHandler(LogWriter([held]))
    held.setFormatter(logging.Formatter("%(message)s|%(request_id)s"))
    logger = logging.Logger("test.held")
    logger.addHandler(handler)
    handler.addFilter(lambda record: setattr(record, "request_id", "rid-1") or True)
    values = ["before"]
    try:
        raise ValueError("the cause")
    except ValueError:
        logger.exception("value %s", values)
    values[0] = "after"
    held.opened.set()
    handler.close()
    assert held.lines[0].startswith("value ['before']|rid-1\nTraceback") and "ValueError: the cause" in held.lines[0]


def test_a_long_message_is_cut_where_it_is_logged(held) -> None:
    """A refusal's line names the path: 10,000 queued lines with a 60 KB path each held 600 MB."""
    handler = BackgroundLogHandler(LogWriter([held]))
    logger = logging.Logger("test.held")
    logger.addHandler(handler)
    logger.warning("path %s", "p" * 100_000)
    held.opened.set()
    handler.close()
    kept = log_writer.MESSAGE_CHARS
    assert held.lines == ["path " + "p" * (kept - 5) + f"… ({100_005 - kept} more characters)"]


def test_flush_and_close_give_up_after_their_timeout_when_the_output_never_takes_a_line(held, monkeypatch) -> None:
    """At exit (logging.shutdown flushes then closes) a stalled output must not hold the process for ever."""
    monkeypatch.setattr(log_writer, "FLUSH_TIMEOUT_S", 0.2)
    handler = BackgroundLogHandler(LogWriter([held]))
    logger = logging.Logger("test.held")
    logger.addHandler(handler)
    logger.warning("never written")
    assert handler.writer.flush(timeout=0.2) is False
    assert handler.writer.stalled  # logging.shutdown's close after its flush does not wait a second time
    done = threading.Thread(target=handler.close)
    done.start()
    done.join(5)
    assert not done.is_alive()
    held.opened.set()


def test_a_standard_output_that_cannot_be_written_costs_one_stderr_line_a_minute(capsys) -> None:
    """A closed pipe (EPIPE) or a full disk printed a 25-line traceback to standard error for every line."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    handler = OutputHandler(write_end)
    try:
        for n in range(300):
            handler.emit(logging.makeLogRecord({"msg": f"line {n}"}))
    finally:
        os.close(write_end)
    (said,) = capsys.readouterr().err.splitlines()
    assert said.startswith("ERROR standard output cannot be written (BrokenPipeError: [Errno 32]"), said
    assert handler.lost == 300


def test_a_standard_output_nobody_reads_does_not_stop_the_server(tiny_artifact, tmp_path) -> None:
    """Each refused key logs a WARNING (up to the minute's budget: 600 lines, about 90 KB); with the lines written on
    the event loop, the pipe filled after 373 of them and every request after, /health included, hung. Now they
    wait in the queue, and none is lost."""
    server = start_server({"MODEL_PATH": str(tiny_artifact), "AUTH_MODE": "required"}, tmp_path,
                          output=subprocess.PIPE)
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            refused = [client.post("/predict", json={"text": "x"}, headers={"X-API-Key": f"not-a-key-{n:04d}"})
                       for n in range(1000)]  # 600 lines logged, about 90 KB: the pipe holds 64 KiB
            assert {response.status_code for response in refused} == {401}
            assert client.get("/health").status_code == 200
        server.process.send_signal(signal.SIGTERM)
        output, _ = server.process.communicate(timeout=60)  # reads the pipe at last, to the end
    finally:
        server.process.kill()
    assert server.process.returncode == 0
    lines = output.decode().splitlines()  # refusals past the minute's budget are counted, not logged (server.auth)
    assert sum("security: 401" in line for line in lines) == auth.REFUSAL_LINES_PER_MINUTE
    assert sum("the rest are counted (sentiment_rejected_requests_total)" in line for line in lines) == 1
    assert "sentiment_rejected_requests_total" in Metrics().registry._names_to_collectors  # the line names a real one
    assert "shutdown: answered" in lines[-1] and not any("dropped" in line for line in lines)


def test_lines_lost_are_counted_in_the_metrics_by_why(held) -> None:
    """The log says it lost lines, but the log is what lost them: /metrics counts them too, as the root logger's
    writer and its outputs counted them."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # an output that refuses every line (EPIPE)
    handler = BackgroundLogHandler(LogWriter([held, OutputHandler(write_end)]))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        for n in range(20):
            logging.getLogger("test.lost").warning("line %d", n)
        dropped = handler.writer.dropped
        held.opened.set()
        assert handler.writer.flush(timeout=5)
        scraped = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                   for line in Metrics().render().decode().splitlines() if line.startswith("sentiment_log_lines")}
    finally:
        root.removeHandler(handler)
        handler.close()
        os.close(write_end)
    assert dropped >= 14
    assert scraped == {'sentiment_log_lines_lost_total{reason="queue_full"}': dropped,
                       'sentiment_log_lines_lost_total{reason="unwritable"}': 21 - dropped}  # + the dropped-count line
