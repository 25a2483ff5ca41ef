"""Exit codes of ``sentiment-analyzer serve``: one per cause, so an orchestrator or a person can tell them apart.

A failure before the server listens is a ``StartupError``: its message is the one
line logged (what is wrong and how to fix it), its ``exit_code`` the status.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    RUNTIME = 1        # failed after start-up, or a cause not listed here
    CONFIG = 2         # a setting is invalid (names the variable)
    MODEL = 3          # the model artifact cannot be served (names the file)
    DEVICE = 4         # DEVICE cannot be honoured (cuda without a usable GPU)
    PORT = 5           # HOST:PORT cannot be bound
    DATABASE = 6       # DATABASE_URL unusable at start (schema behind, unsupported dialect)
    SPOOL_LOCKED = 7   # another process holds SPOOL_DIR
    FILESYSTEM = 8     # a path the server must write (LOG_FILE, SPOOL_DIR, SQLite file) is not writable


class StartupError(Exception):
    """The server cannot start; ``str(error)`` is the one line to log. ``fix``, where the failure knows its own
    remedy better than its check's general one (doctor prints it), is also said in that line."""

    exit_code: ExitCode = ExitCode.RUNTIME

    def __init__(self, message: str, exit_code: ExitCode | None = None, fix: str | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
        self.fix = fix
