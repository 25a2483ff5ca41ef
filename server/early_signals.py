"""A SIGHUP before the event loop handles signals: remembered, not fatal (its default action kills the process).

Its own module, importing nothing but ``signal``, so that ``sentiment-analyzer serve`` installs the handler before
it imports anything heavy: installed after the settings and the web stack were imported, a SIGHUP in the first
1.3 s of start-up ended the process silently (exit 129, an empty log: red team helper-67). ``server.lifecycle``
hands a remembered SIGHUP to the server once its loop runs, and the reload runs once the server is ready.
"""

from __future__ import annotations

import signal

_hangup_seen = False


def remember_early_hangups() -> None:
    """Until the event loop handles signals, a SIGHUP only sets a flag."""
    signal.signal(signal.SIGHUP, _remember_hangup)


def take_early_hangup() -> bool:
    """Whether a SIGHUP arrived since the last call (the flag is cleared)."""
    global _hangup_seen
    seen, _hangup_seen = _hangup_seen, False
    return seen


def _remember_hangup(signum: int, frame: object) -> None:
    global _hangup_seen
    _hangup_seen = True
