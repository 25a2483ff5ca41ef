"""LOG_FORMAT=text: text from a client or an admin cannot start a log line of its own (``TextFormatter``)."""

from __future__ import annotations

import logging
import re

from server.logging_setup import TextFormatter

FORGED = "2026-01-01 00:00:00,000 ERROR server.forged: injected"
LINE_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def formatted(message: str, *args: object, exc_info=None, sinfo: str | None = None) -> str:
    record = logging.LogRecord("server.test", logging.ERROR, __file__, 1, message, args, exc_info, sinfo=sinfo)
    return TextFormatter().format(record)


def record_starts(text: str) -> list[str]:
    return [line for line in text.split("\n") if LINE_START.match(line)]


def test_a_message_holding_line_breaks_and_escapes_stays_on_one_line():
    text = formatted("model reload from %s failed", f"/srv/a\n{FORGED}\r\u2028\x1b[2J\ttab")
    assert text.count("\n") == 0 and "\r" not in text and "\x1b" not in text and "\u2028" not in text
    assert f"/srv/a\\n{FORGED}\\r\\u2028\\x1b[2J\\ttab failed" in text
    assert formatted("plain é and ünïcode").endswith("ERROR server.test: plain é and ünïcode")


def test_a_traceback_is_indented_so_its_message_cannot_forge_a_line():
    try:
        raise ValueError(f"boom\n{FORGED}\x1b[31m")
    except ValueError as error:
        exc_info = (type(error), error, error.__traceback__)
    text = formatted("the reload failed", exc_info=exc_info)
    assert record_starts(text) == [text.split("\n")[0]]  # the record's own line, and none the message made
    assert "\n  Traceback (most recent call last):\n" in text and "\n  ValueError: boom\n" in text
    assert f"\n  {FORGED}\\x1b[31m" in text


def test_a_stack_is_indented_too():
    text = formatted("where", sinfo=f"Stack (most recent call last):\n  File \"x\", line 1\n{FORGED}")
    assert record_starts(text) == [text.split("\n")[0]] and f"\n  {FORGED}" in text
