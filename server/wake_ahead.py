"""Wake the event loop shortly before a lone batch is due back from its engine worker.

While a lone batch runs, the loop has nothing to do and its thread sleeps; the CPU it slept on goes idle, and
on a VM an idle vCPU is halted and descheduled by the host. The worker's hand-back then waits for that CPU to
be woken and rescheduled: on this project's 2-vCPU VM 0.08-0.16 ms from the hand-back to the loop running it
(``sentiment_engine_handoff_seconds{way="to_loop"}``), against 0.035-0.05 ms when the loop had been woken a
moment before. So when a batch starts with nothing else running or waiting, the loop arms a timer to wake
itself ``LEAD_S`` or more before the batch is expected back (the duration of the lone batches before it),
runs nothing on it, and is awake (or was a moment ago) when the hand-back comes. Under load the loop is busy
and no timer is armed. The cost is one wake-up of an idle loop per lone batch.

The loop's timers count whole milliseconds (uvloop rounds a delay to the nearest one), so the delay is rounded
down: the wake comes between ``LEAD_S`` and ``LEAD_S`` + 1 ms ahead. A batch expected back within that is not
worth a wake, and one that comes back before its timer cancels it.
"""

from __future__ import annotations

import asyncio
import math

LEAD_S = 0.0002
LEARN = 0.3  # weight of the newest lone batch in the expected duration (an exponential moving average)


def _nothing() -> None:
    """The wake-up itself: the loop running at all is the point."""


class WakeAhead:
    def __init__(self, loop: asyncio.AbstractEventLoop, lead_s: float = LEAD_S) -> None:
        self._loop = loop
        self._lead_s = lead_s
        self._expected_s: float | None = None  # formed to handed back, for a batch that ran alone
        self._timer: asyncio.TimerHandle | None = None

    def started_alone(self) -> None:
        """A batch started with no other running or waiting: arm the wake for when it is expected back."""
        self.cancel()
        if self._expected_s is None:
            return
        delay_ms = math.floor((self._expected_s - self._lead_s) * 1000)
        if delay_ms >= 1:
            self._timer = self._loop.call_later(delay_ms / 1000, _nothing)

    def back(self, took_s: float, alone: bool) -> None:
        """A batch was handed back after ``took_s`` (formed to handed back): learn from it if it ran alone."""
        self.cancel()
        if alone:
            self._expected_s = took_s if self._expected_s is None else \
                self._expected_s + LEARN * (took_s - self._expected_s)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
