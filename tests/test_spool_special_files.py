"""Something other than a regular file under a name the spool reads (a FIFO, a link to /dev/zero or to a FIFO):
``rejected.jsonl``, a segment ``wal-<LSN>.jsonl``, ``database.json`` or an earlier release's ``predictions.jsonl``.
Opening a FIFO waited for a writer for ever and /dev/zero was read for ever, so `serve`, `spool status` and the
replays hung (and serve deleted a segment or ``predictions.jsonl`` as an empty file); now each refuses the file
by its path and says to remove it: one line and a non-zero exit (FILESYSTEM for serve), never a hang.

LOG_FILE and the SQLite file, which start-up and doctor probe for writing, are held to the same: a FIFO there
hung both.

Every command runs in a process of its own with a timeout, and in-process calls on a thread with a deadline, so
that a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from scripts.benchlib.serverproc import ROOT, start_server, stop_server, wait_exit
from server.exitcodes import ExitCode
from server.store.rejected import FILENAME as REJECTED
from server.store.rejected import RejectedFile
from server.store.spooldir import IDENTITY_FILE, LEGACY_SPOOL
from server.store.wal import SpoolUnavailable, WriteAheadLog, segment_name
from tests.store_fixtures import created_database

SEGMENT = segment_name(0)
TIMEOUT_S = 30


def plant(path: Path, kind: str) -> None:
    """Put ``kind`` at ``path``: a FIFO, or a symbolic link to /dev/zero or to a FIFO beside the spool."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "link to /dev/zero":
        path.symlink_to("/dev/zero")
    else:
        fifo = path.parent.parent / f"{path.name}.fifo"
        os.mkfifo(fifo)
        path.symlink_to(fifo)


def cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    """The real CLI on ``tmp_path/spool``; killed after TIMEOUT_S (``subprocess.run``), which fails the test."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPOOL_DIR": str(tmp_path / "spool"),
           "DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}
    return subprocess.run([sys.executable, "-m", "server.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=env)


def refused_in_one_line(result: subprocess.CompletedProcess, path: Path) -> None:
    err = result.stderr.strip()
    assert result.returncode != 0, (result.stdout, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("ERROR "), err
    assert str(path) in err and "not a regular file" in err and "remove it" in err, err
    assert "server's user" not in err and "spool's disk" not in err, err  # advice for other causes


KINDS = ["fifo", "link to /dev/zero", "link to a fifo"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", [REJECTED, SEGMENT, IDENTITY_FILE])
def test_spool_status_refuses_a_special_file_in_one_line(tmp_path, name, kind):
    plant(tmp_path / "spool" / name, kind)
    refused_in_one_line(cli(tmp_path, "spool", "status"), tmp_path / "spool" / name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("command", "name"), [("replay-rejected", REJECTED), ("replay", SEGMENT)])
def test_spool_replays_refuse_a_special_file_in_one_line(tmp_path, command, name, kind):
    """replay-rejected hung on the FIFO it had renamed aside; replay deleted it as an empty segment."""
    planted = tmp_path / "spool" / name
    plant(planted, kind)
    into = created_database(f"sqlite:///{tmp_path}/x.db")
    refused_in_one_line(cli(tmp_path, "spool", command, "--into", into), planted)
    assert os.path.lexists(planted)  # left where it was, for the operator to look at and remove


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero"])
@pytest.mark.parametrize("name", [REJECTED, SEGMENT, LEGACY_SPOOL])
def test_serve_refuses_to_start_on_a_special_file_and_names_it(tiny_artifact, tmp_path, name, kind):
    """rejected.jsonl hung start-up; a segment, and an earlier release's predictions.jsonl, were deleted as empty
    and the server started as if nothing was there."""
    planted = tmp_path / "spool" / name
    plant(planted, kind)
    server = start_server({"MODEL_PATH": str(tiny_artifact)}, tmp_path, wait_ready=False)
    assert wait_exit(server, timeout=TIMEOUT_S) == ExitCode.FILESYSTEM, server.log()
    log = server.log()
    assert "Traceback" not in log and f"{planted} is not a regular file" in log and "remove it" in log, log
    assert os.path.lexists(planted)  # left where it was, for the operator to look at and remove


def test_a_fifo_planted_as_the_next_segment_while_serving_is_named_in_the_log_not_in_the_answer(tiny_artifact,
                                                                                                tmp_path):
    """The 503 said "not a regular file ... remove it" (rightly naming no path to the client), and so did the ERROR
    line: the operator was told to remove a file nobody named."""
    server = start_server({"MODEL_PATH": str(tiny_artifact)}, tmp_path)
    try:
        planted = tmp_path / "spool" / SEGMENT
        os.mkfifo(planted)
        answer = httpx.post(server.url + "/predict", json={"text": "a fine film"}, timeout=TIMEOUT_S)
    finally:
        stop_server(server)
    assert answer.status_code == 503 and "not a regular file" in answer.text, answer.text
    assert str(tmp_path) not in answer.text, answer.text
    errors = [line for line in server.log().splitlines() if " ERROR " in line and "not a regular file" in line]
    assert errors and all(str(planted) in line and "remove it" in line for line in errors), server.log()


def finished_within(seconds: float, call: Callable[[], object], fifo: Path) -> BaseException | None:
    """What ``call`` raised (None if it returned), run on a thread. If it is still blocked after ``seconds`` the
    test fails, once ``fifo`` has been opened at both ends for an instant to let the thread go."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as error:  # noqa: BLE001 (handed to the test)
            raised.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))  # a reader and a writer: the blocked open returns
        thread.join(seconds)
        pytest.fail(f"still blocked on {fifo} after {seconds} s")
    return raised[0] if raised else None


def test_an_append_to_a_fifo_planted_as_the_next_segment_is_refused_not_blocked(tmp_path):
    """Its open for writing waited for a reader for ever, holding the spool's lock: every append behind it too."""
    wal = WriteAheadLog(tmp_path, 1 << 30)
    wal.open()
    os.mkfifo(tmp_path / SEGMENT)
    error = finished_within(5, lambda: wal.append(b'{"id": "a"}\n'), tmp_path / SEGMENT)
    assert isinstance(error, SpoolUnavailable) and error.cause == "io_error", error
    assert "not a regular file" in str(error), error
    wal.close()


def test_a_segment_replaced_by_a_fifo_is_refused_when_read(tmp_path):
    """The store's database thread read it: its open waited for a writer for ever."""
    wal = WriteAheadLog(tmp_path, 1 << 30)
    wal.open()
    wal.append(b'{"id": "a"}\n')
    wal.close()
    (tmp_path / SEGMENT).unlink()
    os.mkfifo(tmp_path / SEGMENT)
    error = finished_within(5, lambda: wal.read(wal.start, wal.end, 10), tmp_path / SEGMENT)
    assert isinstance(error, OSError) and f"{tmp_path / SEGMENT} is not a regular file" in str(error), error


def test_rows_set_aside_into_a_fifo_are_refused_with_its_name(tmp_path):
    """The writer's append wrote into the pipe's buffer (more than it holds: blocked for ever) and then failed
    with EINVAL from fsync, naming nothing."""
    os.mkfifo(tmp_path / REJECTED)
    entry = {"error": "refused", "row": {"id": "a", "text": "x" * 100}}
    error = finished_within(5, lambda: RejectedFile(tmp_path).append([entry]), tmp_path / REJECTED)
    assert isinstance(error, OSError), error
    assert f"{tmp_path / REJECTED} is not a regular file" in str(error) and "remove it" in str(error), error
    assert [p.name for p in tmp_path.iterdir()] == [REJECTED]  # nothing written anywhere else


@pytest.mark.parametrize("kind", ["fifo", "link to a fifo", "link loop"])
@pytest.mark.parametrize("variable", ["LOG_FILE", "DATABASE_URL"])
def test_serve_and_doctor_refuse_a_special_file_as_log_file_or_sqlite_file(tiny_artifact, tmp_path, variable, kind):
    planted = tmp_path / "files" / "target"
    if kind == "link loop":
        planted.parent.mkdir()
        planted.symlink_to(planted)
    else:
        plant(planted, kind)
    env = {"MODEL_PATH": str(tiny_artifact),
           variable: str(planted) if variable == "LOG_FILE" else f"sqlite:///{planted}"}
    server = start_server(env, tmp_path, wait_ready=False)
    assert wait_exit(server, timeout=TIMEOUT_S) == ExitCode.FILESYSTEM, server.log()
    said = "not a regular file" if kind != "link loop" else "Too many levels of symbolic links); remove the link"
    assert "Traceback" not in server.log() and str(planted) in server.log() and said in server.log(), server.log()
    doctor = subprocess.run([sys.executable, "-m", "server.cli", "doctor"], cwd=ROOT, capture_output=True, text=True,
                            timeout=TIMEOUT_S, env={**server.env, "PYTHONPATH": str(ROOT)})
    assert doctor.returncode != 0 and str(planted) in doctor.stdout and said in doctor.stdout, doctor
