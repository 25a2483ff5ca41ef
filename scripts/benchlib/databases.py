"""Throwaway databases with an outage switch, for the store tests and the chaos script.

A ``Database`` is a URL and a switch: ``down()`` makes writes fail the way an
outage does, ``up()`` ends the outage. On PostgreSQL, ``down()`` stops the
server (connections are refused); on SQLite another connection holds an
exclusive lock (``SqliteLock``), so writes wait for their busy timeout and
fail with "database is locked".

PostgreSQL is a real server started with pytest-postgresql's executor (no
pytest needed). PostgreSQL refuses to run as root, so when we run as root (CI
containers) the server runs as the ``postgres`` system user: the executor is
pointed at ``tests/pg_ctl_nonroot.sh`` (pg_ctl run through ``runuser``) and
the data directory is a ``postgres``-owned temp directory. psycopg and
pytest-postgresql (the ``dev``/``postgres`` extras) are imported only when a
PostgreSQL server is launched, so SQLite-only callers do not need them.
"""

from __future__ import annotations

import glob
import os
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.benchlib.serverproc import ROOT, free_port

PG_CTL_WRAPPER = ROOT / "tests" / "pg_ctl_nonroot.sh"
PG_MISSING = ("PostgreSQL server binaries not found: apt-get install postgresql (or set SAP_PG_CTL to pg_ctl)")


def real_pg_ctl() -> str | None:
    """The pg_ctl the wrapper runs: SAP_PG_CTL, else the newest /usr/lib/postgresql/*/bin/pg_ctl."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return os.environ.get("SAP_PG_CTL") or (candidates[-1] if candidates else None)


@dataclass
class Database:
    """A fresh, empty database and a switch to make it fail (blocking calls)."""

    backend: str
    url: str
    down: Callable[[], None]
    up: Callable[[], None]


@dataclass
class PgServer:
    """A PostgreSQL server of our own: fresh databases, and stop/start for outages."""

    executor: Any  # pytest_postgresql.executors.PostgreSQLExecutor
    workdir: Path | None = None  # removed by close() when set

    @classmethod
    def launch(cls) -> PgServer:
        """Start a server on a free port with its data in a new temp directory; ``close()`` removes both."""
        from pytest_postgresql.executors import PostgreSQLExecutor

        if real_pg_ctl() is None:
            raise RuntimeError(PG_MISSING)
        workdir = Path(tempfile.mkdtemp(prefix="sentiment-pg-"))
        if os.geteuid() == 0:
            shutil.chown(workdir, "postgres", "postgres")
        executor = PostgreSQLExecutor(
            executable=str(PG_CTL_WRAPPER), host="127.0.0.1", port=free_port(), datadir=str(workdir / "data"),
            unixsocketdir=str(workdir), logfile=str(workdir / "postgresql.log"), startparams="-w",
            dbname="postgres", user="postgres",
        )
        server = cls(executor, workdir)
        try:
            server.start()
        except BaseException:
            server.close()
            raise
        return server

    def close(self) -> None:
        if self.executor.running():
            self.executor.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://{self.executor.user}@{self.executor.host}:{self.executor.port}/{dbname}"

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        self.executor.stop()

    def start(self) -> None:
        """Start (unless running) and wait until it accepts connections, not just until its port is open."""
        import psycopg

        if not self.executor.running():
            self.executor.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                self._admin("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host=self.executor.host, port=self.executor.port, user=self.executor.user,
                             dbname="postgres", autocommit=True) as connection:
            connection.execute(sql)


class SqliteLock:
    """An outage for SQLite: another connection holds an exclusive lock, so writes time out as 'locked'."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._connection: sqlite3.Connection | None = None

    def acquire(self) -> None:
        self._connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._connection.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        if self._connection is not None:
            self._connection.rollback()
            self._connection.close()
            self._connection = None


@contextmanager
def sqlite_database(directory: Path, name: str = "store.db") -> Iterator[Database]:
    """A SQLite file in ``directory``; the lock is released on exit."""
    path = Path(directory) / name
    lock = SqliteLock(path)
    try:
        yield Database("sqlite", f"sqlite:///{path}", lock.acquire, lock.release)
    finally:
        lock.release()


@contextmanager
def postgres_database(server: PgServer) -> Iterator[Database]:
    """A new database on ``server``; dropped on exit (after restarting the server if an outage left it down)."""
    server.start()  # in case an earlier user stopped it and failed before starting it again
    name = server.create_database()
    try:
        yield Database("postgresql", server.url(name), server.stop, server.start)
    finally:
        server.start()
        server.drop_database(name)
