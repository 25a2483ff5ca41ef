"""A PostgreSQL server that stops answering without failing: its connections are closed under the calls waiting.

Why: PostgreSQL's ``statement_timeout`` is enforced by the server, and TCP keepalives by the kernels. A server
process that is stopped or frozen (SIGSTOP, a paused VM, a hung storage stack) has a kernel that still
acknowledges every packet, so neither ever fires, and libpq has no read timeout of its own: the writer's call
waited as long as the stall (80 s in a red team's run, helper-68), the store never turned ``down``, and with
``STORE_DURABILITY=async`` a crash then lost every record answered meanwhile; a key lookup that took such a
connection never answered its request.

What it does: the engine marks a connection as waiting on the server from the moment it is checked out (its
liveness ping, done here rather than by the pool so that it is covered) and before each statement, commit and
rollback, and clears the mark when a statement returns or the connection goes back to the pool. A watchdog thread
shuts down the socket of a connection that has waited its statement timeout and ``MARGIN_S``: a server that is
alive has cancelled the statement by then. The call then fails as on a dropped network (``OperationalError``),
the pool discards the connection, and the store spools and reports the database down.

The timeout is the one the server enforces on that connection, read once when it connects: the server's own
30 s, or what the URL's ``options`` set instead (a longer one for a long migration; the README promises that
they win). A fixed allowance cut such a statement at 32 s. A connection whose timeout is off (0) is not cut:
its operator asked for statements that may run for ever. One whose timeout cannot be read keeps
``fallback_after_s``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from sqlalchemy import Engine, event, exc

log = logging.getLogger(__name__)

CHECK_EVERY_S = 0.5
MARGIN_S = 2.0  # past the statement timeout: a live server has cancelled the statement and said so by then
ALLOWANCE = "stall_breaker_allowance_s"  # in a pooled connection's ``info``: its seconds, or None (never cut)
TIMEOUT_QUERY = "SELECT setting::bigint FROM pg_settings WHERE name = 'statement_timeout'"  # in ms, 0 = off


class StallBreaker:
    def __init__(self, fallback_after_s: float) -> None:
        self.fallback_after_s = fallback_after_s
        # id(DBAPI connection) -> (connection, waiting since, seconds allowed)
        self._waiting: dict[int, tuple[Any, float, float]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def install(self, engine: Engine) -> None:
        """Mark and clear ``engine``'s connections (the liveness ping on checkout included)."""
        event.listen(engine, "connect", self._connected)
        event.listen(engine, "checkout", self._checked_out)
        event.listen(engine, "checkin", lambda dbapi_connection, _record: self._clear(dbapi_connection))
        event.listen(engine, "before_cursor_execute", self._before_statement)
        event.listen(engine, "after_cursor_execute", self._after_statement)
        for ending in ("commit", "rollback"):
            event.listen(engine, ending, self._ending)

    def _connected(self, dbapi_connection, record) -> None:
        """Learn the statement timeout the server enforces on this new connection (``ALLOWANCE``)."""
        self._mark(dbapi_connection, self.fallback_after_s)
        try:
            with dbapi_connection.cursor() as cursor:
                cursor.execute(TIMEOUT_QUERY)
                timeout_ms = cursor.fetchone()[0]
            dbapi_connection.rollback()  # the query's implicit transaction: the pool hands the connection out idle
        finally:
            self._clear(dbapi_connection)
        record.info[ALLOWANCE] = timeout_ms / 1000 + MARGIN_S if timeout_ms > 0 else None

    def _checked_out(self, dbapi_connection, record, _proxy) -> None:
        """The pool's liveness check (``pool_pre_ping``, which runs before this event and unmarked): a connection
        that fails it is replaced by a fresh one."""
        self._mark(dbapi_connection, self._allowance(record.info))
        try:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SELECT 1")
        except Exception as error:  # the driver's own errors: the pool retries with a new connection
            self._clear(dbapi_connection)
            raise exc.DisconnectionError(str(error)) from error
        self._clear(dbapi_connection)

    def _ending(self, connection) -> None:
        """A commit or rollback about to be sent; none on a connection already invalidated (its socket is gone)."""
        if not connection.invalidated:
            self._mark_pooled(connection.connection)

    def _before_statement(self, connection, _cursor, _statement, _parameters, _context, _executemany) -> None:
        self._mark_pooled(connection.connection)

    def _after_statement(self, connection, _cursor, _statement, _parameters, _context, _executemany) -> None:
        self._clear(connection.connection.dbapi_connection)

    def _allowance(self, info: dict) -> float | None:
        return info.get(ALLOWANCE, self.fallback_after_s)

    def _mark_pooled(self, pooled) -> None:
        self._mark(pooled.dbapi_connection, self._allowance(pooled.info))

    def _mark(self, dbapi_connection, allowed_s: float | None) -> None:
        if allowed_s is None:
            return
        with self._lock:
            self._waiting[id(dbapi_connection)] = (dbapi_connection, time.monotonic(), allowed_s)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="store-stall-breaker", daemon=True)
                self._thread.start()

    def _clear(self, dbapi_connection) -> None:
        with self._lock:
            self._waiting.pop(id(dbapi_connection), None)

    def _watch(self) -> None:
        while True:
            time.sleep(CHECK_EVERY_S)
            now = time.monotonic()
            with self._lock:
                stalled = [(key, connection, now - since) for key, (connection, since, allowed_s)
                           in self._waiting.items() if now - since >= allowed_s]
                for key, _connection, _waited in stalled:
                    del self._waiting[key]
            for _key, connection, waited in stalled:
                log.error("the database has not answered for %.0f s (a server stopped or frozen, or a network "
                          "that drops packets): closing its connection so that the call fails and the store "
                          "spools its records", waited)
                shut_down(connection)


def shut_down(dbapi_connection) -> None:
    """Shut the connection's socket down under whoever waits on it (psycopg 3's ``pgconn.socket``)."""
    try:
        duplicate = os.dup(dbapi_connection.pgconn.socket)
    except Exception as error:  # closed already, or not a psycopg connection
        log.debug("no socket to shut down: %s", error)
        return
    with socket.socket(fileno=duplicate) as sock:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError as error:
            log.debug("socket shutdown failed: %s", error)
