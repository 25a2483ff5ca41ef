"""The SQLite database file the store writes to must be the one its path names: no commit goes to a file removed or
replaced under a running server.

SQLite writes through the descriptor it opened: with the file removed (``rm predictions.db``) or replaced (a backup
moved over it) under a running server, its pooled connections went on committing into the file no path names any
more. Every record answered after that went there; the spool released them as stored, /health said the database
was up, and at a clean shutdown they were gone with the file (a red team lost 1,982 of 1,982).

``watch`` hooks an SQLite engine so that:

* each connection remembers which file (device and inode) it opened;
* a commit on a connection whose file is no longer at the path fails as the database being unavailable
  (``SqliteFileChanged``, an ``sqlite3.OperationalError``), before SQLite commits: the writer marks the database
  down, keeps the records in the spool and retries; a feedback or key write is answered 503;
* a pooled connection to such a file is discarded at checkout, so a file put back (a restored backup) is written to
  by new connections from the next retry on;
* once the file has existed, no connection is opened while the path names none: SQLite would make a new, empty
  database there, and the store would write records into a file without the operator's history. The database
  stays down, and says why, until the file is restored or the server is restarted (which makes a new database).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from sqlalchemy import Engine, event, exc

FILE = "sqlite_file"  # a connection record's info key: the (device, inode) of the file the connection opened


class SqliteFileChanged(sqlite3.OperationalError):
    """The SQLite database file is not the one the store's connection opened: removed or replaced."""


def identity(path: Path) -> tuple[int, int] | None:
    """The file at ``path`` as (device, inode), or None when there is none."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def watch(engine: Engine, path: Path) -> None:
    """Hook ``engine`` (SQLite, database file ``path``) as the module docstring says."""
    existed = [identity(path) is not None]

    def removed() -> SqliteFileChanged:
        return SqliteFileChanged(
            f"the SQLite database {path} was removed while the server ran: restore it (predictions are spooled on "
            "disk until it is back) or restart the server to begin a new, empty database")

    @event.listens_for(engine, "do_connect")
    def refuse_to_make_a_new_file(_dialect, _record, _args, _kwargs):
        if existed[0] and identity(path) is None:
            raise removed()

    @event.listens_for(engine, "connect")
    def remember_the_file(_dbapi_connection, record) -> None:
        record.info[FILE] = identity(path)
        existed[0] = existed[0] or record.info[FILE] is not None

    @event.listens_for(engine, "checkout")
    def discard_a_connection_to_another_file(_dbapi_connection, record, _proxy) -> None:
        if record.info.get(FILE) != identity(path):
            raise exc.DisconnectionError("the SQLite database file changed since this connection opened it")

    @event.listens_for(engine, "commit")
    def commit_only_to_the_file_at_the_path(connection) -> None:
        opened, now = connection.connection.info.get(FILE), identity(path)
        if now is None:
            raise removed()
        if now != opened:
            raise SqliteFileChanged(
                f"the SQLite database {path} was replaced while the server ran: this commit was not made, and the "
                "store writes to the file now there from its next connection on")
