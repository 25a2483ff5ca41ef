"""One polling helper for the tests that wait on a server, a process or a container, instead of a copy in each."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(condition: Callable[[], object], what: str, timeout: float = 30.0, every: float = 0.05) -> object:
    """Poll ``condition()`` every ``every`` s until it returns something truthy, and return that.

    Raises AssertionError naming ``what`` once ``timeout`` s have passed (``condition`` is called at least once, its
    last call past the deadline). An exception from ``condition`` propagates: it is not retried.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(every)
