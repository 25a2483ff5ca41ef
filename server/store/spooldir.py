"""SPOOL_DIR itself: who may use it (a lock), which database its records belong to, and spools set aside.

- **Lock.** One process at a time: ``fcntl.flock`` on ``SPOOL_DIR/.lock`` (released by the kernel when the
  process dies, so a SIGKILLed server never leaves a stale lock). A second server on the same directory
  refuses to start with ``SpoolLocked`` (exit code SPOOL_LOCKED).
- **Identity.** ``SPOOL_DIR/database.json`` names the database the records are bound for: dialect, host,
  port, database, user; never the password. SQLite's database is the file's absolute path.
- **Foreign spools.** A non-empty spool whose identity is not DATABASE_URL's (or unknown: a spool of an
  earlier release) is never replayed into it. At start it is moved, untouched, to
  ``SPOOL_DIR/foreign-<UTC time>/`` and reported on /health until `sentiment-analyzer spool replay
  --spool-dir DIR --into URL` has replayed it (the command removes the directory once it is empty).

Every create, rename and remove is followed by an fsync of the directory, so that it survives a power cut.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

from server.exitcodes import ExitCode, StartupError
from server.store.db import database_url

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
IDENTITY_FILE = "database.json"
FOREIGN_PREFIX = "foreign-"
LEGACY_SPOOL = "predictions.jsonl"  # the single spool file of releases before the write-ahead log


class SpoolLocked(StartupError):
    exit_code = ExitCode.SPOOL_LOCKED


class SpoolDirUnusable(StartupError):
    exit_code = ExitCode.FILESYSTEM


def write_all(fd: int, payload: bytes) -> None:
    """Write all of ``payload``: ``os.write`` may write part of it (a full disk raises only once nothing fits)."""
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(path: Path) -> None:
    """Make a create, rename or remove in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(path: Path) -> None:
    """``mkdir -p`` that fsyncs the parent of every directory it creates."""
    missing = []
    current = Path(path)
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        fsync_dir(directory.parent)


def database_identity(raw_url: str) -> dict[str, Any]:
    """What a spool records about its database: enough to tell two apart, nothing secret."""
    url: URL = database_url(raw_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        return {"dialect": "sqlite", "host": None, "port": None, "user": None,
                "database": str(Path(url.database).resolve())}
    return {"dialect": backend, "host": url.host or "localhost", "port": url.port or 5432,
            "database": url.database, "user": url.username}


def describe_identity(identity: dict[str, Any] | None) -> str:
    """``postgresql://user@host:5432/db`` or ``sqlite:////abs/path.db``, for log lines and the CLI."""
    if not identity:
        return "an unknown database (a spool written before spools recorded their database)"
    if identity["dialect"] == "sqlite":
        return f"sqlite:///{identity['database']}"
    user = f"{identity['user']}@" if identity.get("user") else ""
    return f"{identity['dialect']}://{user}{identity['host']}:{identity['port']}/{identity['database']}"


@dataclass(frozen=True)
class ForeignSpool:
    path: Path
    identity: dict[str, Any] | None


class SpoolDirectory:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    # lock

    def lock(self) -> None:
        """Take SPOOL_DIR for this process, or raise ``SpoolLocked`` naming the holder."""
        try:
            make_dir(self.path)
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise SpoolDirUnusable(f"SPOOL_DIR={self.path} is not usable ({error.strerror or error}): "
                                   "point SPOOL_DIR at a writable directory") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SpoolLocked(f"SPOOL_DIR={self.path} is in use by another process (pid {holder}): give each "
                              "server its own SPOOL_DIR, or stop the other one") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # identity

    def read_identity(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / IDENTITY_FILE).read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            log.error("spool: %s is unreadable; treating the spool's database as unknown", self.path / IDENTITY_FILE)
            return None

    def write_identity(self, identity: dict[str, Any]) -> None:
        """Atomically: a crash leaves the old file or the new one, never half of one."""
        target = self.path / IDENTITY_FILE
        partial = target.with_name(IDENTITY_FILE + ".partial")
        with partial.open("w") as handle:
            json.dump(identity, handle, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, target)
        fsync_dir(self.path)

    def set_aside(self, names: list[str], identity: dict[str, Any] | None) -> ForeignSpool:
        """Move ``names`` into a new ``foreign-<time>`` subdirectory, unchanged, with ``identity`` recorded there."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        target = self.path / f"{FOREIGN_PREFIX}{stamp}"
        target.mkdir()
        fsync_dir(self.path)
        for name in names:
            # The legacy single file (always set aside alone) becomes the first segment of a write-ahead log.
            destination = "wal-00000000000000000000.jsonl" if name == LEGACY_SPOOL else name
            os.rename(self.path / name, target / destination)
        if identity is not None:
            SpoolDirectory(target).write_identity(identity)
        fsync_dir(target)
        fsync_dir(self.path)
        return ForeignSpool(target, identity)

    def foreign_spools(self) -> list[ForeignSpool]:
        """Set-aside spools still waiting for `spool replay`, oldest first."""
        found = []
        for entry in sorted(self.path.glob(f"{FOREIGN_PREFIX}*")):
            if entry.is_dir():
                found.append(ForeignSpool(entry, SpoolDirectory(entry).read_identity()))
        return found
