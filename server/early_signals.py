"""Signals before the event loop handles them: a SIGHUP is remembered, not fatal (its default action kills the
process); so is a SIGTERM or SIGINT, and ``serve`` stops at the next step without loading the model.

Its own module, importing nothing but ``signal`` and ``os``, so that ``sentiment-analyzer serve`` installs the
handlers before it imports anything heavy: installed after the settings and the web stack were imported, a SIGHUP
in the first 1.3 s of start-up ended the process silently (exit 129, an empty log: red team helper-67).
``server.lifecycle`` hands a remembered SIGHUP to the server once its loop runs, and the reload runs once the server
is ready. A SIGTERM in that time took its default action too (exit 143, nothing in the log). It is now remembered
and looked at after the checks (``server.cli.serve``) and once the loop handles signals, before the model load
(``server.lifecycle``): the server stops there, with status 0 and a line saying so. A second one, while the
first waits to be looked at (the checks can wait on a database), takes the signal's default action at once.
An exception raised from the handler would stop it at once, but one raised while a module is being imported can
be lost (seen: the start-up went on to serve).
"""

from __future__ import annotations

import os
import signal

_hangup_seen = False
_stop_seen: str | None = None


def handle_early_signals() -> None:
    """``serve``'s first step: SIGHUP, SIGTERM and SIGINT remembered until the event loop handles them."""
    remember_early_hangups()
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, _remember_stop)


def take_early_stop() -> str | None:
    """The name of the SIGTERM or SIGINT that came before the event loop handled them, if one did (cleared)."""
    global _stop_seen
    seen, _stop_seen = _stop_seen, None
    return seen


def _remember_stop(signum: int, frame: object) -> None:
    global _stop_seen
    if _stop_seen is None:
        _stop_seen = signal.Signals(signum).name
        return
    signal.signal(signum, signal.SIG_DFL)  # a second one: what it would have done without the handler
    os.kill(os.getpid(), signum)


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
