"""The SQLite database the store writes to must be the one its path named when the process first opened it: no
commit goes to a file removed or replaced under a running server.

SQLite writes through the descriptors it opened: with the database file or its write-ahead log (``-wal``) removed
(``rm predictions.db``) or replaced (a backup moved over it) under a running server, its pooled connections went on
committing into files no path names any more. Every record answered after that went there; the spool released them
as stored, /health said the database was up, and at a clean shutdown (or a SIGKILL, for the log) they were gone
(a red team lost 1,982 of 1,982).

``watch`` hooks an SQLite engine so that, once the database file has existed:

* the file at the path must stay the one first opened (device and inode), and the write-ahead log the one first
  committed through: a commit that would go elsewhere fails before SQLite makes it, as the database being
  unavailable (``SqliteFileChanged``, an ``sqlite3.OperationalError``, raised as it is: ``db.UNAVAILABLE`` names
  it beside SQLAlchemy's errors). The writer marks the database down, keeps the records in the spool and retries; a
  feedback or key call is answered 503 (red team helper-104: 500, with a traceback). Once the log has changed, a
  connection's checkout fails so too, reads included: one opened after the log's removal saw none of its rows (a
  feedback on an answered prediction was 404 "no prediction");
* a pooled connection to another file is discarded at checkout, and no connection is opened while the path names
  another file or none. SQLite would make a new, empty database at an empty path, and a file put in place of the
  first one would be opened with the first one's ``-wal`` and ``-shm`` (a red team's restored backup ended up
  corrupt so). The database stays down, saying why, until the first file is back at the path (``mv`` back) or the
  server is restarted, which takes whatever the path names then;
* a connection to a moved or removed file checkpoints before it is dropped (``checkpoint``), so the file holds what
  was committed to it and no log of it is left at the path;
* a new connection is refused, naming the file, while the ``-wal`` or ``-shm`` at the path is not a regular file
  (``check_regular``): SQLite's own error for a FIFO there names none;
* a commit fails, as for the log, once the ``-shm`` (the index the processes using the database share) is not the
  one first committed through: with it removed, ``keys create`` beside the server printed a key and the server's
  later commits overwrote it (red team helper-62). A ``-shm`` truncated under a running server is beyond this:
  SQLite maps it into memory, and the process dies of SIGBUS at its next access (README: the files not to touch).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from pathlib import Path

from sqlalchemy import Engine, event, exc

log = logging.getLogger(__name__)
FILE = "sqlite_file"  # a connection record's info key: the (device, inode) of the file the connection opened


class SqliteFileChanged(sqlite3.OperationalError):
    """The SQLite database file, or its write-ahead log, is not the one the store first opened: removed, replaced
    or unreachable."""


def identity(path: Path) -> tuple[int, int] | None:
    """The file at ``path`` as (device, inode), or None when there is none; ``SqliteFileChanged`` when the path
    cannot be followed (a link loop, a file where a folder was, no permission)."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise SqliteFileChanged(f"the SQLite database {path} cannot be reached ({error.strerror}): restore the path "
                                "(predictions are spooled on disk until it is back)") from None
    return found.st_dev, found.st_ino


def check_regular(companion: Path) -> None:
    """A ``-wal`` or ``-shm`` SQLite would open must be a regular file, where there is one: SQLite names neither
    when it is not (a FIFO as ``-shm`` is its "disk I/O error"), so /health said only "database unavailable"."""
    try:
        mode = os.stat(companion).st_mode
    except FileNotFoundError:  # SQLite makes it
        return
    except OSError as error:
        raise SqliteFileChanged(f"the SQLite file {companion} cannot be reached ({error.strerror}): restore the "
                                "path (predictions are spooled on disk until it is back)") from None
    if not stat.S_ISREG(mode):
        raise SqliteFileChanged(f"the SQLite file {companion} is not a regular file (a FIFO, device or folder): "
                                "remove it (predictions are spooled on disk until it is gone)")


def checkpoint(dbapi_connection: sqlite3.Connection) -> None:
    """Write what the write-ahead log holds into the database file this connection opened, and empty the log.

    For a connection whose file was moved or removed: SQLite skips its own checkpoint at close then, so what was
    committed stayed only in the ``-wal`` left at the path. A moved file (``mv p.db p.away``) then lacked it (a red
    team's held not even its tables); a restart beside an empty path deleted that log, and beside a backup put in
    its place applied it to the backup, which came out corrupt."""
    try:
        dbapi_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error as error:  # what stays in the log is still in the spool, unreleased
        log.warning("store: could not checkpoint the SQLite database that was moved or removed: %s", error)


def watch(engine: Engine, path: Path) -> None:
    """Hook ``engine`` (SQLite, database file ``path``) as the module docstring says."""
    wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
    try:
        opened = identity(path)
    except SqliteFileChanged:  # the first connection says why
        opened = None
    first = {"file": opened, "log": None}  # what the process opened first; None: not yet

    def changed(now: tuple[int, int] | None) -> SqliteFileChanged:
        if now is None:
            return SqliteFileChanged(
                f"the SQLite database {path} was removed while the server ran: put it back (predictions are "
                "spooled on disk until it is back), or restart the server to begin a new, empty database")
        return SqliteFileChanged(
            f"the SQLite database {path} was replaced while the server ran: this server writes only to the file it "
            "opened (put it back), or restart the server to use the file now there (predictions are spooled on disk "
            "meanwhile)")

    @event.listens_for(engine, "do_connect")
    def refuse_another_file(_dialect, _record, _args, _kwargs) -> None:
        if first["file"] is not None and (now := identity(path)) != first["file"]:
            raise changed(now)
        for companion in (wal, shm):
            check_regular(companion)

    @event.listens_for(engine, "connect")
    def remember_the_file(_dbapi_connection, record) -> None:
        record.info[FILE] = identity(path)
        first["file"] = first["file"] or record.info[FILE]

    @event.listens_for(engine, "checkout")
    def discard_a_connection_to_another_file(dbapi_connection, record, _proxy) -> None:
        if record.info.get(FILE) != identity(path):
            checkpoint(dbapi_connection)
            raise exc.DisconnectionError("the SQLite database file changed since this connection opened it")
        if first["log"] is not None:  # a read too: a connection opened after the log's removal saw none of its rows
            refuse_another_log((identity(wal), identity(shm)))

    @event.listens_for(engine, "close")
    def leave_nothing_in_the_log_of_a_moved_file(dbapi_connection, record) -> None:
        try:
            moved = record.info.get(FILE) != identity(path)
        except SqliteFileChanged:
            moved = True
        if moved:
            checkpoint(dbapi_connection)

    @event.listens_for(engine, "commit")
    def commit_only_to_the_files_first_opened(_connection) -> None:
        if (now := identity(path)) != first["file"]:
            raise changed(now)
        now_log = identity(wal), identity(shm)
        if first["log"] is None:
            first["log"] = now_log
        refuse_another_log(now_log)

    def refuse_another_log(now_log: tuple) -> None:
        """``SqliteFileChanged`` when the ``-wal`` or ``-shm`` is not the one first committed through."""
        if now_log[0] != first["log"][0]:
            raise SqliteFileChanged(
                f"the SQLite database's write-ahead log {wal} was removed or replaced while the server ran: what "
                "was committed since is only in the log the server still holds open; restart the server "
                "(predictions are spooled on disk meanwhile and replayed at the start)")
        if now_log[1] != first["log"][1]:
            raise SqliteFileChanged(
                f"the SQLite database's shared index {shm} was removed or replaced while the server ran: its "
                "commits and another process's (sentiment-analyzer keys) would no longer see each other, and one "
                "overwrites the other's; restart the server (predictions are spooled on disk meanwhile and replayed "
                "at the start)")
