"""Start-up matrix: each bad setting or artifact stops `sentiment-analyzer serve` with one line and its exit code.

Real ``serve`` subprocesses, all started at once (each fails within a second or two of its imports), so the
whole matrix costs about as much as the slowest case.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from scripts.benchlib.serverproc import LiveServer, start_server, stop_server
from server.config import load_settings
from server.exitcodes import ExitCode, StartupError
from server.preflight import check_database_url, writable_directory, writable_file
from tests.broken_artifacts import broken_copy


@dataclass(frozen=True)
class Case:
    env: dict[str, str]  # "{tiny}" / "{broken}" / "{tmp}" are filled in
    code: ExitCode
    names: tuple[str, ...]  # what the one error line must name
    breaker: str | None = None


CASES = {
    "rehashed corrupt weights": Case({"MODEL_PATH": "{broken}"}, ExitCode.MODEL, ("non-finite",),
                                     "rehashed_nan_weights"),
    "garbage onnx": Case({"MODEL_PATH": "{broken}"}, ExitCode.MODEL, ("model.int8.onnx", "INVALID_PROTOBUF"),
                         "garbage_onnx"),
    "manifest without sha256": Case({"MODEL_PATH": "{broken}"}, ExitCode.MODEL, ("manifest.json", "sha256"),
                                    "file_entry_without_sha256"),
    "manifest not utf-8": Case({"MODEL_PATH": "{broken}"}, ExitCode.MODEL, ("manifest.json", "UTF-8"),
                               "manifest_not_utf8"),
    "invalid tokenizer": Case({"MODEL_PATH": "{broken}"}, ExitCode.MODEL, ("tokenizer.json",), "invalid_tokenizer"),
    "tokenizer beyond the embeddings": Case({"MODEL_PATH": "{broken}"}, ExitCode.MODEL,
                                            ("token ids up to 30522",), "tokenizer_beyond_the_embeddings"),
    "database url not a url": Case({"DATABASE_URL": "not a url"}, ExitCode.DATABASE, ("DATABASE_URL",)),
    "database url mysql": Case({"DATABASE_URL": "mysql://app:s3cret@db/predictions"}, ExitCode.DATABASE,
                               ("DATABASE_URL", "postgresql")),
    "sqlite file under a regular file": Case({"DATABASE_URL": "sqlite:///{tmp}/regular-file/store.db"},
                                             ExitCode.FILESYSTEM, ("regular-file", "not a directory")),
    "sqlite url at a file that is not a database": Case({"DATABASE_URL": "sqlite:///{tmp}/regular-file"},
                                                        ExitCode.DATABASE, ("regular-file", "not a SQLite database")),
    "request timeout inf": Case({"REQUEST_TIMEOUT_S": "inf"}, ExitCode.CONFIG, ("REQUEST_TIMEOUT_S='inf'", "finite")),
    "variant not shipped": Case({"MODEL_VARIANT": "fp16"}, ExitCode.CONFIG, ("'fp16'", "MODEL_VARIANT")),
    "log file under a regular file": Case({"LOG_FILE": "{tmp}/regular-file/server.log"}, ExitCode.FILESYSTEM,
                                          ("LOG_FILE", "regular-file", "not a directory")),
    # a device named where a regular file must be: "remove it" was the advice (as root: rm /dev/full)
    "log file a device": Case({"LOG_FILE": "/dev/full"}, ExitCode.FILESYSTEM,
                              ("LOG_FILE /dev/full is a character device, a system file", "unset it")),
    "sqlite file a device": Case({"DATABASE_URL": "sqlite:////dev/null"}, ExitCode.FILESYSTEM,
                                 ("/dev/null is a character device, a system file", "point DATABASE_URL at a regular")),
    "spool dir under a regular file": Case({"SPOOL_DIR": "{tmp}/regular-file/spool"}, ExitCode.FILESYSTEM,
                                           ("SPOOL_DIR", "regular-file", "not a directory")),
    "queue smaller than a request": Case({"MAX_QUEUE": "64", "MAX_TEXTS_PER_REQUEST": "128"}, ExitCode.CONFIG,
                                         ("MAX_QUEUE=64", "MAX_TEXTS_PER_REQUEST=128")),
    "nan water mark": Case({"MEMORY_HIGH_WATER": "nan"}, ExitCode.CONFIG, ("MEMORY_HIGH_WATER='nan'",)),
    "fill wait past the deadline": Case({"MAX_WAIT_MS": "10000", "REQUEST_TIMEOUT_S": "5"}, ExitCode.CONFIG,
                                        ("MAX_WAIT_MS=10000.0", "REQUEST_TIMEOUT_S=5.0")),
    "host not of this machine": Case({"HOST": "no-such-host.invalid"}, ExitCode.PORT,
                                     ("no-such-host.invalid", "set HOST to an address of this machine")),
    "empty host": Case({"HOST": ""}, ExitCode.CONFIG, ("HOST",)),
    "in-memory sqlite": Case({"DATABASE_URL": "sqlite://"}, ExitCode.DATABASE, ("DATABASE_URL", "in-memory")),
    "in-memory sqlite, named": Case({"DATABASE_URL": "sqlite:///:memory:"}, ExitCode.DATABASE, ("in-memory",)),
    "empty database url": Case({"DATABASE_URL": ""}, ExitCode.DATABASE, ("DATABASE_URL is empty",)),
    # SQLite's own options and URIs: a traceback after the model load, or checks passed by a file: URI whose file was
    # no database, then a store down for ever (red team helper-85)
    "sqlite uri in memory": Case({"DATABASE_URL": "sqlite:///file:db?mode=memory&uri=true"}, ExitCode.DATABASE,
                                 ("no ?options, no file: URI",)),
    "sqlite option": Case({"DATABASE_URL": "sqlite:///{tmp}/p.db?timeout=abc"}, ExitCode.DATABASE,
                          ("a SQLite URL names a file and nothing else",)),
    # an --env-file slip that named another file (a "spool " folder beside the one meant; red team helper-85)
    "spool dir ending in a space": Case({"SPOOL_DIR": "{tmp}/spool "}, ExitCode.CONFIG,
                                        ("SPOOL_DIR=", "starts or ends with whitespace")),
    "log file starting with a space": Case({"LOG_FILE": " {tmp}/s.log"}, ExitCode.CONFIG,
                                           ("LOG_FILE=", "starts or ends with whitespace")),
    "database url ending in a space": Case({"DATABASE_URL": "postgresql://app:s3cret@127.0.0.1:1/db "},
                                           ExitCode.DATABASE, ("DATABASE_URL='postgresql://app:***@127.0.0.1:1/db'",
                                                               "starts or ends with whitespace")),
    "sqlite file uri": Case({"DATABASE_URL": "sqlite:///file:{tmp}/p.db?uri=true"}, ExitCode.DATABASE,
                            ("no ?options, no file: URI",)),
    "model path a manifest file": Case({"MODEL_PATH": "{tiny}/manifest.json"}, ExitCode.MODEL,
                                       ("manifest.json is a file, not a model directory", "MODEL_PATH")),
    # every connection failed on it before the network: the server started and reported the database down for ever
    "postgresql url with an unknown option": Case({"DATABASE_URL": "postgresql://app:s3cret@127.0.0.1:1/db?sslmod=require"},
                                                  ExitCode.DATABASE, ('invalid connection option "sslmod"',
                                                                      "libpq's names")),
}


def environment(case: Case, tiny: Path, broken: Path | None, tmp: Path) -> dict[str, str]:
    fill = {"tiny": str(tiny), "broken": str(broken), "tmp": str(tmp)}
    return {"MODEL_PATH": str(tiny), **{name: value.format(**fill) for name, value in case.env.items()}}


@pytest.fixture(scope="module")
def outcomes(tiny_artifact, tmp_path_factory) -> dict[str, tuple[int, str]]:
    """Every case's (exit code, log), from servers started together and awaited together."""
    servers: dict[str, LiveServer] = {}
    for name, case in CASES.items():
        tmp = tmp_path_factory.mktemp("startup")
        (tmp / "regular-file").write_text("a file where a directory is expected\n")
        broken = broken_copy(tiny_artifact, tmp, case.breaker) if case.breaker else None
        servers[name] = start_server(environment(case, tiny_artifact, broken, tmp), tmp, wait_ready=False)
    deadline = time.monotonic() + 120
    while any(s.process.poll() is None for s in servers.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for server in servers.values():
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
    return {name: (server.process.returncode, server.log()) for name, server in servers.items()}


@pytest.mark.parametrize("name", CASES)
def test_start_up_stops_with_one_line_and_its_exit_code(outcomes, name):
    code, log = outcomes[name]
    case = CASES[name]
    assert code == case.code, f"exit {code}, expected {case.code!r}:\n{log}"
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if "ERROR" in line]
    assert len(errors) == 1, log
    for fragment in case.names:
        assert fragment in errors[0], errors[0]


def test_a_password_in_an_unusable_database_url_is_not_logged(outcomes):
    assert "s3cret" not in outcomes["database url mysql"][1]


def test_a_writable_folder_is_proved_by_a_probe_file_that_is_then_removed(tmp_path):
    assert writable_directory(tmp_path / "new" / "spool", "SPOOL_DIR") == f"SPOOL_DIR {tmp_path}/new/spool"
    assert list(tmp_path.iterdir()) == []  # neither the probe nor the folders are left behind


@pytest.mark.parametrize("target, message", [
    ("regular-file", "SPOOL_DIR {tmp}/regular-file is a file, not a directory"),
    ("regular-file/spool", "SPOOL_DIR {tmp}/regular-file/spool cannot be created: {tmp}/regular-file is a file"),
    ("regular-file/a/b", "cannot be created: {tmp}/regular-file is a file"),
])
def test_a_folder_that_cannot_exist_is_named(tmp_path, target, message):
    (tmp_path / "regular-file").write_text("x")
    with pytest.raises(StartupError) as error:
        writable_directory(tmp_path / target, "SPOOL_DIR")
    assert error.value.exit_code == ExitCode.FILESYSTEM
    assert message.format(tmp=tmp_path) in str(error.value)


def test_a_file_setting_naming_a_directory_is_refused(tmp_path):
    with pytest.raises(StartupError, match="is a directory; LOG_FILE must name a file"):
        writable_file(tmp_path, "LOG_FILE")


def test_a_database_driver_that_is_not_installed_is_a_database_error():
    with pytest.raises(StartupError) as error:
        check_database_url(load_settings(database_url="postgresql+nosuchdriver://app:s3cret@db/predictions"))
    assert error.value.exit_code == ExitCode.DATABASE and "nosuchdriver" in str(error.value)
    assert "s3cret" not in str(error.value)


def test_a_good_start_up_loads_the_model_once_and_warns_of_the_cpu_fallback_once(tiny_artifact, tmp_path):
    """The checks before listening do not load the model a second time (one memory plan, so one load and one set
    of probes); DEVICE=auto without a usable GPU says so in one WARNING."""
    server = start_server({"MODEL_PATH": str(tiny_artifact), "DEVICE": "auto"}, tmp_path)
    try:
        device = httpx.get(server.url + "/health", timeout=30).json()["device"]
    finally:
        assert stop_server(server) == 0
    lines = server.log().splitlines()
    assert len([line for line in lines if "memory plan:" in line]) == 1, server.log()
    fallback_warnings = [line for line in lines if " WARNING server.engine" in line]
    assert len(fallback_warnings) == (1 if device == "cpu" else 0), server.log()


def fill(volume: Path) -> None:
    """Write into ``volume`` until it is full (a small tmpfs)."""
    with open(volume / "filler", "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC


def test_a_new_spool_dir_on_a_full_volume_stops_start_up_with_one_line_saying_to_free_space(tiny_artifact, tmp_path,
                                                                                           small_tmpfs):
    """A red team's full SPOOL_DIR volume ended start-up in a traceback (the lock file's write) with exit 1. A spool
    that already holds records still starts on a full volume (``test_durability``: replaying them frees it). A new
    one is refused before the model loads (it was after: red team helper-67)."""
    fill(small_tmpfs)
    server = start_server({"MODEL_PATH": str(tiny_artifact), "SPOOL_DIR": str(small_tmpfs / "spool")}, tmp_path,
                          wait_ready=False)
    assert server.process.wait(timeout=120) == ExitCode.FILESYSTEM, server.log()
    log = server.log()
    errors = [line for line in log.splitlines() if "ERROR" in line]
    assert "Traceback" not in log and len(errors) == 1, log
    assert "No space left on device" in errors[0] and "free space on its volume" in errors[0], errors[0]
    assert "loading the model" not in log and "is new, and" in errors[0], log


def test_a_spool_lock_that_cannot_be_written_is_refused_by_name_and_released(tmp_path, monkeypatch):
    """Behind the start-up probe: the lock file's own write failing (the volume filled in between)."""
    from server.store.spooldir import SpoolDirectory, SpoolDirUnusable

    def full(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("server.store.spooldir.os.pwrite", full)
    with pytest.raises(SpoolDirUnusable, match="No space left on device.*free space on its volume"):
        SpoolDirectory(tmp_path / "spool").lock()
    monkeypatch.undo()
    again = SpoolDirectory(tmp_path / "spool")
    again.lock()  # the failed attempt let go of the lock
    again.unlock()
