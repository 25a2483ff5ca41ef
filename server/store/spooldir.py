"""SPOOL_DIR itself: who may use it (a lock), which database its records belong to, and spools set aside.

- **Lock.** One process at a time: ``fcntl.flock`` on ``SPOOL_DIR/.lock`` (released by the kernel when the
  process dies, so a SIGKILLed server never leaves a stale lock). A second server on the same directory
  refuses to start with ``SpoolLocked`` (exit code SPOOL_LOCKED). A lock file can be removed under its holder
  (a "stale lock" cleanup, a tmp cleaner): a second server then started on the same spool, and records both
  wrote were lost (red team helper-88). So the lock taken is the file at the path once locked (checked after
  the ``flock``), and a running server looks again (``keep_lock``): a lock file removed or replaced is taken
  again, and one another process holds by then is reported, never ignored.
- **Identity.** ``SPOOL_DIR/database.json`` names the database the records are bound for: dialect, host,
  port, database, user; never the password. SQLite's database is the file's absolute path.
- **Foreign spools.** A non-empty spool whose identity is not DATABASE_URL's (or unknown: a spool of an
  earlier release) is never replayed into it. At start it is moved, untouched, to
  ``SPOOL_DIR/foreign-<UTC time>/`` and reported on /health until `sentiment-analyzer spool replay
  --spool-dir DIR --into URL` has replayed it (the command removes the directory once it is empty).

Every create, rename and remove is followed by an fsync of the directory, so that it survives a power cut.

Every file the store opens in SPOOL_DIR (the lock, ``database.json``, segments, ``rejected.jsonl``, an earlier
release's ``predictions.jsonl``) is opened with ``open_regular``: anything else under its name (a FIFO, a device, a
link to either) is refused with ``NotRegularFile``, naming it and saying to remove it, instead of being waited on or
read for ever.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy.engine import URL

from server.exitcodes import ExitCode, StartupError
from server.regular_file import NotRegularFile, open_regular
from server.store.db import database_url

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
IDENTITY_FILE = "database.json"
FOREIGN_PREFIX = "foreign-"
IDENTITY_KEYS = {"dialect", "host", "port", "database", "user"}  # what ``database_identity`` records
LEGACY_SPOOL = "predictions.jsonl"  # the single spool file of releases before the write-ahead log


SERVER, REPLAY = "server", "replay"  # what holds the lock, written after its pid in the lock file
LOCK_ATTEMPTS = 5  # tries to lock the lock file that is at the path, should it be replaced meanwhile


class SpoolLocked(StartupError):
    """Another process holds SPOOL_DIR: a server, or a `spool replay` (``holder``; "" from an older release)."""

    exit_code = ExitCode.SPOOL_LOCKED

    def __init__(self, path: Path, pid: str, holder: str) -> None:
        self.holder = holder
        if holder == REPLAY:
            what, fix = "`sentiment-analyzer spool replay`", "wait for the replay to end, or stop it"
        else:
            what = "a server" if holder == SERVER else "a server or a `sentiment-analyzer spool replay`"
            fix = "give each server its own SPOOL_DIR, or stop the other one"
        super().__init__(f"SPOOL_DIR={path} is in use by another process (pid {pid}, {what}): {fix}")


class SpoolDirUnusable(StartupError):
    exit_code = ExitCode.FILESYSTEM


def write_all(fd: int, payload: bytes) -> None:
    """Write all of ``payload``: ``os.write`` may write part of it (a full disk raises only once nothing fits)."""
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view):]


READ_CHUNK = 1 << 20  # bytes read at a time by ``count_lines``


def count_lines(handle: BinaryIO) -> int:
    """The newlines from ``handle``'s position on, read a chunk at a time (memory does not grow with the file):
    the spool's segments and ``rejected.jsonl`` hold a record a line."""
    count = 0
    while chunk := handle.read(READ_CHUNK):
        count += chunk.count(b"\n")
    return count


def regular_size(path: Path) -> int:
    """The size of a file that must be a regular one, else ``NotRegularFile`` (``open_regular``): a FIFO's or a
    device's size is 0, so one planted under a spool file's name was deleted as an empty file, without a word."""
    fd = open_regular(path)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


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


# libpq parameters of a URL's query that choose another database, server or schema than its address alone
TARGET_PARAMETERS = ("service", "options")


def write_json_atomically(target: Path, value: Any, mode: int) -> None:
    """``value`` as JSON in ``target``, created with ``mode`` (less the umask): a crash leaves the old file or the
    new one, never half of one. The file written is always a new one: a ``.partial`` left from before (or put
    there) kept its own mode, and an API key snapshot (mode 0600) became readable by all (red team helper-104)."""
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    with open(open_regular(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "w") as handle:
        json.dump(value, handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, target)
    fsync_dir(target.parent)


def database_identity(raw_url: str) -> dict[str, Any]:
    """What a spool records about its database: enough to tell two apart, nothing secret. libpq also takes the
    host, port, database and user from the URL's query (``?host=/run/postgresql&port=5433``, a socket directory):
    read from the address alone, two servers on the same port but different socket directories had the same
    identity, and one's spool was replayed into the other (red team helper-68)."""
    url: URL = database_url(raw_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        return {"dialect": "sqlite", "host": None, "port": None, "user": None,
                "database": str(Path(url.database).resolve())}
    query = {name: value[-1] if isinstance(value, tuple) else value for name, value in url.query.items()}
    port = url.port or query.get("port") or 5432
    identity = {"dialect": backend, "host": url.host or query.get("host") or query.get("hostaddr") or "localhost",
                "port": int(port) if str(port).isdigit() else port,
                "database": url.database or query.get("dbname"), "user": url.username or query.get("user")}
    for name in TARGET_PARAMETERS:  # present only when set: spools written before they were recorded still match
        if query.get(name):
            identity[name] = query[name]
    return identity


def describe_identity(identity: dict[str, Any] | None) -> str:
    """``postgresql://user@host:5432/db`` or ``sqlite:////abs/path.db``, for log lines and the CLI."""
    if not identity:
        return "an unknown database (a spool written before spools recorded their database)"
    if identity["dialect"] == "sqlite":
        return f"sqlite:///{identity['database']}"
    user = f"{identity['user']}@" if identity.get("user") else ""
    query = "&".join(f"{name}={identity[name]}" for name in TARGET_PARAMETERS if identity.get(name))
    return (f"{identity['dialect']}://{user}{identity['host']}:{identity['port']}/{identity['database']}"
            + (f"?{query}" if query else ""))


@dataclass(frozen=True)
class ForeignSpool:
    path: Path
    identity: dict[str, Any] | None


class SpoolDirectory:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    # lock

    def lock(self, holder: str = SERVER) -> None:
        """Take SPOOL_DIR for this process (``holder``: SERVER or REPLAY, recorded beside the pid for the message
        a second process gets), or raise ``SpoolLocked`` naming the holder."""
        try:
            make_dir(self.path)
        except OSError as error:
            raise self._unusable(error) from error
        self._lock_fd = self._take_at_path(holder)

    def _take_at_path(self, holder: str) -> int:
        """The lock file at the path, opened, locked and holding our pid; ``SpoolLocked`` / ``SpoolDirUnusable``."""
        for _ in range(LOCK_ATTEMPTS):
            fd = self._open_lock_file(os.O_CREAT)
            self._take(fd)
            if self._at_path(fd):
                break
            os.close(fd)  # removed or replaced between its open and its lock: lock the one there now
        else:
            raise SpoolDirUnusable(f"SPOOL_DIR={self.path}: its lock file {LOCK_FILE} kept being replaced while it "
                                   "was taken: stop whatever removes it")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {holder}\n".encode(), 0)
        except OSError as error:  # a full volume (ENOSPC) ended start-up in a traceback
            os.close(fd)
            raise self._unusable(error) from error
        return fd

    def _at_path(self, fd: int) -> bool:
        """Whether ``fd`` is the file now at ``SPOOL_DIR/.lock``."""
        try:
            at_path = os.stat(self.path / LOCK_FILE)
        except OSError:
            return False
        held = os.fstat(fd)
        return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)

    def keep_lock(self, holder: str = SERVER) -> str | None:
        """While the lock is held: None when its file is still the one at the path (or was taken again, logged at
        ERROR), else what is wrong, for /health: another process holds the lock file now there, or it cannot be
        made. Blocking (a few system calls)."""
        if self._lock_fd is None or self._at_path(self._lock_fd):
            return None
        try:
            fd = self._take_at_path(holder)
        except SpoolLocked as locked:
            return (f"SPOOL_DIR's lock file {self.path / LOCK_FILE} was removed or replaced while this server held it, "
                    f"and {locked}: two processes writing one spool lose records; stop one of them")
        except SpoolDirUnusable as error:
            return f"SPOOL_DIR's lock file was removed while this server held it and cannot be made again: {error}"
        os.close(self._lock_fd)
        self._lock_fd = fd
        log.error("store: SPOOL_DIR's lock file %s was removed or replaced while this server held it: taken again. "
                  "Another server could have started on SPOOL_DIR meanwhile: make sure none writes it, and never "
                  "remove the lock file of a running server", self.path / LOCK_FILE)
        return None

    def check_unlocked(self) -> None:
        """Raise what ``lock`` would (``SpoolLocked``: another process holds SPOOL_DIR; ``SpoolDirUnusable``: its
        lock file cannot be opened as ``lock`` opens it); creates nothing and keeps nothing (doctor: ``serve`` would
        refuse to start). The lock is taken for an instant to test it."""
        try:
            fd = self._open_lock_file(0)
        except SpoolDirUnusable as unusable:
            if isinstance(unusable.__cause__, FileNotFoundError):  # nobody has held the directory yet
                return
            raise
        self._take(fd)
        os.close(fd)  # releases it

    def _open_lock_file(self, create: int) -> int:
        """The lock file, read-write, as a regular file (``open_regular``): a FIFO planted under its name is
        refused rather than waited on (doctor hung on one; serve died on its ``ftruncate`` with a traceback)."""
        try:
            return open_regular(self.path / LOCK_FILE, os.O_RDWR | create)
        except NotRegularFile as error:
            raise SpoolDirUnusable(f"SPOOL_DIR={self.path} is not usable: {self.path / LOCK_FILE} is not a regular "
                                   "file: remove it, or point SPOOL_DIR at a directory of the server's own") from error
        except OSError as error:
            raise self._unusable(error) from error

    def cannot_use(self, error: OSError) -> SpoolDirUnusable:
        """Why serve refuses to start when a file of SPOOL_DIR cannot be opened (a ``NotRegularFile`` names it and
        says to remove it); doctor refuses with the same line."""
        return SpoolDirUnusable(f"SPOOL_DIR={self.path} cannot be used: {error}")

    def _unusable(self, error: OSError) -> SpoolDirUnusable:
        fix = "free space on its volume, or point SPOOL_DIR at another" if error.errno in (errno.ENOSPC, errno.EDQUOT) \
            else "point SPOOL_DIR at a directory the server's user can write"
        return SpoolDirUnusable(f"SPOOL_DIR={self.path} is not usable ({error.strerror or error}): {fix}")

    def _take(self, fd: int) -> None:
        """``flock`` ``fd`` or close it and raise ``SpoolLocked`` naming the holder (pid and what it is)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, what = os.pread(fd, 64, 0).decode(errors="replace").strip().partition(" ")
            os.close(fd)
            raise SpoolLocked(self.path, pid or "unknown", what) from None

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # identity

    def read_identity(self) -> dict[str, Any] | None:
        """The recorded database, or None when there is none or it is not one ``database_identity`` writes (not
        JSON, another shape, keys missing): such a spool's database is unknown, like a spool of an earlier release.
        A FIFO or device under its name raises ``NotRegularFile``, as an unreadable file raises its OSError."""
        try:
            with open(open_regular(self.path / IDENTITY_FILE), "rb") as handle:
                identity = json.loads(handle.read())
        except FileNotFoundError:
            return None
        except (ValueError, RecursionError):  # not JSON; nested past the parser's depth
            identity = None
        if isinstance(identity, dict) and IDENTITY_KEYS <= identity.keys():
            return identity
        log.error("spool: %s does not name a database; treating the spool's database as unknown",
                  self.path / IDENTITY_FILE)
        return None

    def write_identity(self, identity: dict[str, Any]) -> None:
        write_json_atomically(self.path / IDENTITY_FILE, identity, 0o666)

    def keep_identity(self, identity: dict[str, Any]) -> None:
        """Write ``identity`` again if its file is gone: removed under a running server (``rm SPOOL_DIR/*``, or the
        directory removed and made again), the next start set every record spooled since aside as bound for an
        unknown database (red team helper-99, review helper-101). Blocking."""
        if not (self.path / IDENTITY_FILE).exists():
            self.write_identity(identity)
            log.warning("store: %s was removed under the running server: written again", self.path / IDENTITY_FILE)

    def set_aside(self, names: list[str], identity: dict[str, Any] | None) -> ForeignSpool:
        """Move ``names`` into a new ``foreign-<time>`` subdirectory, unchanged, with ``identity`` recorded there."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
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
