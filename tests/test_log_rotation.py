"""LOG_FILE rotation by size (LOG_MAX_BYTES, LOG_BACKUPS) through the server's own logging set-up."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.config import load_settings
from server.exitcodes import StartupError
from server.logging_setup import SizeRotatingFileHandler, configure_logging
from server.preflight import writable_file

LINE = "x" * 100


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging replaces the root logger's handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


def log_lines(log_file: Path, count: int, **settings) -> None:
    configure_logging(load_settings(log_file=log_file, log_format="text", **settings))
    logger = logging.getLogger("test.rotation")
    for n in range(count):
        logger.warning("line %05d %s", n, LINE)
    flush_logging()


def flush_logging() -> None:
    """The lines are written by the log writer's thread: wait for them."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def numbers(path: Path) -> list[int]:
    return [int(line.split("line ")[1].split()[0]) for line in path.read_text().splitlines()]


def test_writing_past_the_size_rotates_and_keeps_log_backups_files(tmp_path, restore_logging) -> None:
    log = tmp_path / "logs" / "server.log"
    log_lines(log, 200, log_max_bytes=4096, log_backups=2)  # ~30 KB of lines: many rotations
    files = sorted(p.name for p in log.parent.iterdir())
    assert files == ["server.log", "server.log.1", "server.log.2"]
    for path in log.parent.iterdir():
        assert 0 < path.stat().st_size <= 4096, f"{path.name} is {path.stat().st_size} bytes"
    # the newest lines are in the live file, the older ones in .1 then .2, none duplicated
    kept = numbers(log.parent / "server.log.2") + numbers(log.parent / "server.log.1") + numbers(log)
    assert kept == list(range(kept[0], 200))


def test_no_backups_restarts_the_file_at_the_size(tmp_path, restore_logging) -> None:
    """The stdlib never rotates with backupCount=0; LOG_BACKUPS=0 must still bound the file."""
    log = tmp_path / "server.log"
    log_lines(log, 200, log_max_bytes=4096, log_backups=0)
    assert [p.name for p in tmp_path.iterdir()] == ["server.log"]
    assert log.stat().st_size <= 4096
    assert numbers(log)[-1] == 199


def test_zero_max_bytes_never_rotates(tmp_path, restore_logging) -> None:
    log = tmp_path / "server.log"
    log_lines(log, 200, log_max_bytes=0, log_backups=3)
    assert [p.name for p in tmp_path.iterdir()] == ["server.log"]
    assert numbers(log) == list(range(200))


def test_a_log_file_that_cannot_be_written_costs_one_stderr_line_a_minute_not_a_traceback_a_line(
        small_tmpfs, restore_logging, capfd) -> None:
    """A full disk under LOG_FILE printed a 25-line traceback to stderr for every record."""
    log_file = small_tmpfs / "server.log"
    log_lines(log_file, 1)
    filler = small_tmpfs / "filler"
    with open(filler, "wb", buffering=0) as out:  # the rest of the 64 KiB
        try:
            while out.write(b"\0" * 4096):
                pass
        except OSError:
            pass
    capfd.readouterr()
    logger = logging.getLogger("test.rotation")
    for n in range(200):
        logger.warning("line %05d %s", n, LINE)
    flush_logging()
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "Logging error" not in captured.err
    (said,) = captured.err.splitlines()
    assert said.startswith(f"ERROR LOG_FILE {log_file} cannot be written (OSError: [Errno 28]") and "lost" in said
    assert "line 00199" in captured.out  # standard output still has every line
    (handler,) = [h for h in logging.getLogger().handlers[0].writer.targets if isinstance(h, SizeRotatingFileHandler)]
    assert handler.lost >= 150  # the file's buffer took a few


@pytest.mark.parametrize("how", ["removed", "renamed"])
def test_a_log_file_removed_or_renamed_while_the_server_runs_is_written_again_at_its_path(tmp_path, restore_logging,
                                                                                          how) -> None:
    """Lines went on into the removed file (open, unlinked: unreadable, its space never freed), and a logrotate
    that renames the file left the new one empty (red team helper-74)."""
    log = tmp_path / "server.log"
    log_lines(log, 3, log_max_bytes=0)
    if how == "removed":
        log.unlink()
    else:
        log.rename(tmp_path / "server.log.old")
    logger = logging.getLogger("test.rotation")
    for n in range(3, 6):
        logger.warning("line %05d %s", n, LINE)
    flush_logging()
    assert numbers(log) == [3, 4, 5]
    if how == "renamed":
        assert numbers(tmp_path / "server.log.old") == [0, 1, 2]


def test_a_log_file_that_is_a_processs_open_file_is_refused_so_rotation_never_renames_it(tmp_path):
    """With standard output sent to a regular file, LOG_FILE=/dev/stdout passed as a regular file, and rotating it
    renamed the system's /dev/stdout (a link to /proc/self/fd/1) and left a regular file in its place (red team
    helper-90)."""
    with open(tmp_path / "output.txt", "w") as output:
        descriptor = Path(f"/proc/self/fd/{output.fileno()}")
        link = tmp_path / "stdout"
        link.symlink_to(descriptor)
        through_dev_fd = tmp_path / "app.log"
        through_dev_fd.symlink_to(f"/dev/fd/{output.fileno()}")  # /dev/fd is a link to /proc/self/fd (red team)
        for path in (Path("/dev/stdout"), descriptor, link, through_dev_fd, Path(f"/dev/fd/{output.fileno()}")):
            with pytest.raises(StartupError, match="a process's open file"):
                writable_file(path, "LOG_FILE")
    assert link.is_symlink()
    writable_file(tmp_path / "server.log", "LOG_FILE")  # a file of its own is still taken
