"""Engine factory: the one place that knows how SQLite and PostgreSQL differ.

Blocking SQLAlchemy calls run in threads (``run_db``) rather than through an
async driver: SQLite has none worth the dependency, and the writer batches
anyway. Every PostgreSQL call is bounded in time (connect timeout, statement
timeout, TCP keepalives and user timeout, and ``server.store.stall`` for a
server that stops answering without failing), so a hung network or server
turns into an error the writer can spool around instead of a stalled thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, exc, make_url
from sqlalchemy.engine import URL

from server.config import ConfigError, Settings
from server.primitives import ServerError
from server.store import sqlite_file
from server.store.stall import MARGIN_S, StallBreaker

log = logging.getLogger(__name__)
T = TypeVar("T")

STATEMENT_TIMEOUT_MS = 30_000
# A call still waiting then has a server that stopped answering (when the connection's own timeout is unknown).
UNANSWERED_AFTER_S = STATEMENT_TIMEOUT_MS / 1000 + MARGIN_S
# Errors that mean "the database is not answering", as opposed to a bug in a statement: SQLAlchemy's, and the SQLite
# file check's, which its event hooks raise as the driver's own error (``sqlite_file``) and SQLAlchemy does not wrap.
UNAVAILABLE = (exc.OperationalError, exc.InterfaceError, exc.TimeoutError, sqlite_file.SqliteFileChanged)
DATABASE_FAILED = (exc.SQLAlchemyError, sqlite_file.SqliteFileChanged)  # any failure of a database call


class StoreUnavailable(ServerError):
    """The database cannot be reached; answered with 503 and Retry-After."""

    status_code = 503
    retry_after = 5.0


def database_url(raw: str) -> URL:
    """Parse DATABASE_URL; bare ``postgresql://`` / ``postgres://`` mean the psycopg 3 driver."""
    if not raw.strip():  # said as '<unparseable>' by ``redact``
        raise ConfigError("invalid configuration: DATABASE_URL is empty: unset it for the default "
                          f"({Settings.model_fields['database_url'].default}), or use sqlite:///path/to/file.db or "
                          "postgresql://user:password@host:5432/dbname")
    if raw != raw.strip():  # an --env-file slip: another file, or a database name with a space (config's check)
        raise ConfigError(f"invalid configuration: DATABASE_URL={redact(raw.strip())!r} starts or ends with "
                          "whitespace, which would name another database: remove it")
    try:
        url = make_url(raw.replace("postgres://", "postgresql://", 1) if raw.startswith("postgres://") else raw)
    except (exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        url = None
    if url is None or url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(f"invalid configuration: DATABASE_URL={redact(raw)!r}: use sqlite:///path/to/file.db "
                          "or postgresql://user:password@host:5432/dbname")
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        # Each connection of the pool would get its own empty database, and every record would go when the process
        # does: nothing the spool replays could be checked against it.
        raise ConfigError(f"invalid configuration: DATABASE_URL={redact(raw)!r} is an in-memory SQLite database, "
                          "which keeps no record past the process; name a file: sqlite:///path/to/file.db")
    if url.get_backend_name() == "sqlite" and (url.query or url.database.startswith("file:")):
        # The server sets the driver's options itself (its timeout, threads): one given here failed start-up with a
        # traceback after the model load, and a ``file:`` URI was read by the file checks as a relative path, so a
        # file that is no database (or a read-only one) passed them and the store stayed down (red team helper-85).
        raise ConfigError(f"invalid configuration: DATABASE_URL={redact(raw)!r}: a SQLite URL names a file and "
                          "nothing else (no ?options, no file: URI); use sqlite:///relative/path.db or "
                          "sqlite:////absolute/path.db")
    if url.host and "@" in url.host:  # the host would be the password's end: every error message would show it
        raise ConfigError(f"invalid configuration: DATABASE_URL={redact(raw)!r}: an @ in the user name or password "
                          "must be written %40")
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() == "postgresql":
        unknown = unknown_connection_option(url)
        if unknown:
            raise ConfigError(f"invalid configuration: DATABASE_URL={redact(raw)!r}: {unknown}; use libpq's names "
                              "(https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PARAMKEYWORDS)")
    return url


def unknown_connection_option(url: URL) -> str | None:
    """What psycopg says of a URL query parameter that is no libpq connection option (``?sslmod=require``), or None.
    Every connection fails on it, before the network: the server started and reported the database down for ever
    (red team helper-74), where the URL itself is wrong. None without psycopg (the driver check says that)."""
    try:
        from psycopg import ProgrammingError
        from psycopg.conninfo import make_conninfo
    except ImportError:
        return None
    try:
        make_conninfo("", **{name: value if isinstance(value, str) else value[-1] for name, value in url.query.items()})
    except ProgrammingError as error:
        return str(error).strip()
    return None


def sqlite_path(raw: str) -> Path | None:
    """The SQLite database file DATABASE_URL names, or None (PostgreSQL, or refused: ``database_url`` says why)."""
    try:
        url = database_url(raw)
    except ConfigError:
        return None
    return Path(url.database) if url.get_backend_name() == "sqlite" else None


def redact(raw: str) -> str:
    """DATABASE_URL without its password, for messages: the user's (everything before the last @ of an address
    whose password holds an unescaped @) and libpq's ``password`` and ``sslpassword`` parameters."""
    try:
        url = make_url(raw)
    except (exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        return "<unparseable>"
    hidden = {name: "***" for name in url.query if "password" in name.lower()}
    rendered = url.update_query_dict(hidden).render_as_string(hide_password=True).replace("%2A%2A%2A", "***")
    if url.host and "@" in url.host:
        scheme, _, rest = rendered.partition("://")
        rendered = f"{scheme}://***@{rest.rpartition('@')[2]}"
    return rendered


def make_engine(settings: Settings) -> Engine:
    """An engine with the pool settings; SQLite in WAL mode with foreign keys and a busy timeout."""
    url = database_url(settings.database_url)
    pool = {"pool_size": settings.db_pool_size, "pool_timeout": settings.db_pool_timeout_s, "pool_pre_ping": True}
    if url.get_backend_name() == "sqlite":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": settings.db_pool_timeout_s,
                                                  "check_same_thread": False}, **pool)
        event.listen(engine, "connect", _sqlite_pragmas)
        sqlite_file.watch(engine, Path(url.database))
        return engine
    connect_args: dict[str, Any] = {
        "connect_timeout": max(2, math.ceil(settings.db_pool_timeout_s)),
        "options": with_statement_timeout(url.query.get("options")),
        "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
        "tcp_user_timeout": STATEMENT_TIMEOUT_MS,  # data sent and never acknowledged: a network that drops it
    }
    engine = create_engine(url, connect_args=connect_args, **{**pool, "pool_pre_ping": False})  # StallBreaker pings
    StallBreaker(UNANSWERED_AFTER_S).install(engine)
    return engine


def with_statement_timeout(options: str | tuple[str, ...] | None) -> str:
    """libpq's ``options`` with the statement timeout first: the URL's own (a ``search_path``, a longer timeout)
    come after it and win. Set in ``connect_args`` alone, it replaced the URL's, and records went to another
    schema than the one the URL names (red team helper-68)."""
    own = " ".join(options) if isinstance(options, tuple) else (options or "")
    return f"-c statement_timeout={STATEMENT_TIMEOUT_MS} {own}".strip()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def describe(error: BaseException) -> str:
    """The first line of a database error, short enough for /health and a log line."""
    inner = getattr(error, "orig", None) or error
    first = (str(inner).strip().splitlines() or [""])[0]
    return f"{type(inner).__name__}: {first}"[:300]


async def run_db(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking store call in a thread; an unreachable database becomes ``StoreUnavailable`` (503)."""
    try:
        return await asyncio.to_thread(fn, *args)
    except UNAVAILABLE as error:
        log.error("database unavailable: %s", describe(error))
        raise StoreUnavailable("the prediction database is unavailable; retry shortly (see /health)") from error
