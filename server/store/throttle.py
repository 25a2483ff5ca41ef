"""Log a recurring trouble at most once per period, saying how many times it happened meanwhile (``Throttle``),
or events each on a line of its own up to a number of lines per period (``LineBudget``)."""

from __future__ import annotations

import logging
import time
from typing import Any

PERIOD_S = 60.0


class Throttle:
    def __init__(self, logger: logging.Logger, period_s: float = PERIOD_S) -> None:
        self._log = logger
        self._period_s = period_s
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}  # occurrences not logged since the last line

    def log(self, kind: str, level: int, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self._period_s) < self._period_s:
            self._quiet[kind] = self._quiet.get(kind, 0) + 1
            return
        self._last[kind] = now
        quiet = self._quiet.pop(kind, 0)
        if quiet:
            message += f" (and {quiet} more like it in the last {self._period_s:.0f} s)"
        self._log.log(level, message, *args)

    def reset(self, kind: str) -> None:
        """The trouble is over: its next occurrence is logged at once."""
        self._last.pop(kind, None)
        self._quiet.pop(kind, None)


class LineBudget:
    """Each event on a line of its own, at most ``lines`` per period; past that one line says so and the rest are
    counted, and the first line logged in a later period says how many were not. For lines worth reading one by one
    (a security refusal names its client and key fingerprint) that a flood must not turn into the whole log: 56
    clients sending bad keys wrote 9,171 lines in 20 s (red team helper-69), and a rotated LOG_FILE keeps only so
    many bytes."""

    def __init__(self, logger: logging.Logger, lines: int, over: str, unlogged: str,
                 period_s: float = PERIOD_S) -> None:
        """``over``: the line when a period's budget runs out, formatted with ``lines`` and the period's seconds;
        ``unlogged``: the line that counts what was not logged, formatted with that number, the seconds it spans
        and ``lines``."""
        self._log = logger
        self._lines = lines
        self._over_line = over
        self._unlogged_line = unlogged
        self._period_s = period_s
        self._period_began = -period_s
        self._logged = self._unlogged = 0

    def log(self, level: int, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._period_began >= self._period_s:
            if self._unlogged:
                self._log.log(level, self._unlogged_line, self._unlogged, now - self._period_began, self._lines)
            self._period_began, self._logged, self._unlogged = now, 0, 0
        if self._logged < self._lines:
            self._logged += 1
            self._log.log(level, message, *args)
            return
        if not self._unlogged:
            self._log.log(level, self._over_line, self._lines, self._period_s)
        self._unlogged += 1
