"""Log a recurring trouble at most once per period, saying how many times it happened meanwhile."""

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
