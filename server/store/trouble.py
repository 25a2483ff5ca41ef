"""What kind of trouble a database error is, in words safe for /health: "connection refused", "authentication
failed", never the driver's text (it names hosts, ports and users; that goes to the log).

The runbook's first question about a database outage is which one it is: the server down or unreachable, a
timeout, bad credentials, a missing database, too many connections. /health said only "database unavailable
(OperationalError)" for all of them. PostgreSQL answers most with a SQLSTATE (psycopg's ``sqlstate``), whose class
says the kind once connected; a refusal while connecting (libpq keeps its SQLSTATE) or a connection that never
reached a server has none, and the driver's message is then the only witness, read here for a few fixed phrases
of PostgreSQL's, libpq's and the operating system's (and SQLite's, whose errors carry no SQLSTATE).
"""

from __future__ import annotations

import re

SQLSTATE_KINDS = {  # the code, or its class (the first two characters)
    "28": "authentication failed",  # invalid authorization: a wrong password, no pg_hba.conf entry
    "3D000": "no such database",
    "42501": "permission denied",
    "53300": "too many connections",
    "53100": "database disk full",
    "57014": "statement timeout (a lock held elsewhere, or a stalled server)",  # query_canceled
    "57P01": "database shutting down",
    "57P02": "database shutting down",
    "57P03": "database starting up or shutting down",
    "08": "connection failure",
}

MESSAGE_KINDS = tuple((re.compile(pattern), kind) for pattern, kind in (  # in the message, lower case -> the kind
    # PostgreSQL's refusals while connecting: libpq keeps their SQLSTATE to itself (English server messages)
    ("password authentication failed", "authentication failed"),
    ("no pg_hba.conf entry", "authentication failed"),
    ("role \"[^\"]*\" does not exist", "authentication failed"),
    ("database \"[^\"]*\" does not exist", "no such database"),
    ("permission denied for database", "permission denied"),
    ("too many clients", "too many connections"),
    ("the database system is starting up", "database starting up or shutting down"),
    ("the database system is shutting down", "database starting up or shutting down"),
    ("terminating connection due to administrator command", "database shutting down"),
    ("connection refused", "connection refused"),
    ("timeout expired", "connection timed out"),
    ("timed out", "connection timed out"),
    ("failed to resolve host", "host name not resolved"),
    ("could not translate host name", "host name not resolved"),
    ("name or service not known", "host name not resolved"),
    ("no route to host", "network unreachable"),
    ("network is unreachable", "network unreachable"),
    ("server closed the connection unexpectedly", "connection lost"),
    ("connection reset", "connection lost"),
    ("no such file or directory", "no server at the socket path"),  # a Unix socket that is not there
    # SQLite's own messages (fixed strings; they name no file)
    ("database is locked", "database locked"),
    ("database or disk is full", "disk full"),
    ("readonly database", "database read-only"),
    ("unable to open database file", "database file cannot be opened"),
    ("disk i/o error", "disk I/O error"),
    ("file is not a database", "not a database file"),
    ("database disk image is malformed", "database file corrupt"),
))


def trouble_kind(error: BaseException) -> str | None:
    """The kind of ``error`` (the driver's exception), or None when neither its SQLSTATE nor its message says."""
    code = getattr(error, "sqlstate", None)
    if isinstance(code, str) and code:
        return SQLSTATE_KINDS.get(code) or SQLSTATE_KINDS.get(code[:2]) or f"SQLSTATE {code[:5]}"
    message = str(error).lower()
    return next((kind for pattern, kind in MESSAGE_KINDS if pattern.search(message)), None)
