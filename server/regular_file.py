"""Opening a file that must be a regular file, without waiting on anything else planted under its name.

A FIFO's ``open`` waits for its other end and /dev/zero is read for ever, so a FIFO or device (or a link to one)
under the name of a file the server opens (a spool file, LOG_FILE, the SQLite database) hung start-up, the CLI or
doctor. ``open_regular`` opens with ``O_NONBLOCK`` (a no-op for a regular file) and refuses anything else with
``NotRegularFile``, an ``OSError`` naming the file and saying to remove it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_KINDS = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


class NotRegularFile(OSError):
    """A FIFO, device, socket or directory (or a link to one) where a regular file must be: an ``OSError``, so
    each caller treats it as it treats a file it cannot read; ``str()`` names it and says what to do."""

    def __init__(self, path: Path, mode: int) -> None:
        kind = _KINDS.get(stat.S_IFMT(mode), "a special file")
        if Path(path).is_symlink():
            kind = f"a link to {kind}"
        self.kind = kind
        self.system = system_file(Path(path), mode)
        what_to_do = "a system file, not to be removed: name a regular file instead" if self.system else "remove it"
        super().__init__(errno.EINVAL, f"not a regular file but {kind}: {what_to_do}", str(path))

    def __str__(self) -> str:
        return f"{self.filename} is {self.strerror}"


SYSTEM_TREES = ("/dev/", "/proc/", "/sys/")


def system_file(path: Path, mode: int) -> bool:
    """Whether it is the system's, not one planted in the server's places (those are to be removed, a link to a
    device too): a device itself, or anything under /dev, /proc or /sys (``LOG_FILE=/dev/stdout``, a container
    habit, was told "remove it": as root, that deletes /dev/stdout)."""
    if str(path.absolute()).startswith(SYSTEM_TREES):
        return True
    return not path.is_symlink() and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode))


def process_descriptor(path: Path, hops: int = 40) -> str | None:
    """The ``/proc/...`` name ``path`` leads to, itself or through links (``/dev/stdout`` is a link to
    ``/proc/self/fd/1``), or None. Such a name is a process's open file, not a file of its own: with standard
    output sent to a regular file, ``LOG_FILE=/dev/stdout`` passed as a regular file, and rotating it renamed the
    system's ``/dev/stdout`` (red team helper-90)."""
    current = Path(os.path.abspath(path))
    for _ in range(hops):
        current = Path(os.path.realpath(current.parent)) / current.name  # /dev/fd is itself a link into /proc
        if str(current).startswith("/proc/"):
            return str(current)
        try:
            target = os.readlink(current)
        except OSError:  # not a link (or not there): the end of the chain
            return None
        current = Path(os.path.abspath(current.parent / target))
    return None


def open_regular(path: Path, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """``os.open`` for a file that must be a regular one, else ``NotRegularFile``: with ``O_NONBLOCK`` a
    FIFO's open returns at once instead of waiting for its other end (a no-op for a regular file), and ``fstat``
    follows links, so a link to /dev/zero (read for ever) or to a FIFO is refused as well."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK, mode)
    except OSError as error:
        if error.errno != errno.ENXIO:  # ENXIO: a FIFO opened to write with no reader, a socket
            raise
        raise NotRegularFile(path, os.stat(path).st_mode) from error
    file_mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(file_mode):
        os.close(fd)
        raise NotRegularFile(path, file_mode)
    return fd
