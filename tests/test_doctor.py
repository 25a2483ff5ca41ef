"""`sentiment-analyzer doctor`: each runbook start-up check passes on a good setup and names the fix on a bad one."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys

import pytest

from scripts.benchlib.serverproc import ROOT, start_server, stop_server
from server.cli import main
from server.config import load_settings
from server.doctor import run_doctor
from server.exitcodes import ExitCode, StartupError
from server.preflight import check_paths
from server.store.spooldir import SpoolDirectory, database_identity
from tests.broken_artifacts import broken_copy
from tests.test_startup_matrix import CASES, environment


def doctor(monkeypatch, env: dict[str, str]) -> tuple[int, list[str]]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    lines: list[str] = []
    return run_doctor(print_fn=lines.append), lines


def good_env(tiny_artifact, tmp_path) -> dict[str, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return {"MODEL_PATH": str(tiny_artifact), "HOST": "127.0.0.1", "PORT": str(port), "DEVICE": "cpu",
            "DATABASE_URL": f"sqlite:///{tmp_path}/doctor.db", "SPOOL_DIR": str(tmp_path / "spool")}


def test_missing_model_file_fails_with_the_file_and_a_fix(monkeypatch, tiny_artifact, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_artifact, broken)
    (broken / "tokenizer.json").unlink()
    code, lines = doctor(monkeypatch, {**good_env(tiny_artifact, tmp_path), "MODEL_PATH": str(broken)})
    assert code == 1
    failure = next(i for i, line in enumerate(lines) if line.startswith("[FAIL] model"))
    assert "tokenizer.json" in lines[failure] and "fix:" in lines[failure + 1]


def test_port_in_use_fails(monkeypatch, tiny_artifact, tmp_path):
    env = good_env(tiny_artifact, tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", int(env["PORT"])))
        holder.listen()
        code, lines = doctor(monkeypatch, env)
    assert code == 1
    assert any(line.startswith("[FAIL] port") and "already in use" in line for line in lines)


def test_a_port_this_process_may_not_bind_is_told_so_not_to_change_host(monkeypatch, tiny_artifact, tmp_path):
    """Run as non-root with PORT=80: serve said to set HOST (it was 0.0.0.0 already) and doctor to stop the process
    holding the port (red team helper-85)."""
    bind = socket.socket.bind

    def denied(sock, address):
        if address[1] == 80:
            raise PermissionError(13, "Permission denied")
        return bind(sock, address)

    monkeypatch.setattr(socket.socket, "bind", denied)
    code, lines = doctor(monkeypatch, {**good_env(tiny_artifact, tmp_path), "PORT": "80"})
    failure = next(i for i, line in enumerate(lines) if line.startswith("[FAIL] port"))
    assert code == 1 and "may not bind port 80" in lines[failure] and "CAP_NET_BIND_SERVICE" in lines[failure]
    assert lines[failure + 1] == "       fix: set PORT to a port this process may bind (1024 or above)", lines


def test_a_grpc_port_in_use_fails_naming_grpc_port(monkeypatch, tiny_artifact, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, lines = doctor(monkeypatch, {**good_env(tiny_artifact, tmp_path), "GRPC_PORT": str(port)})
    assert code == 1
    assert any(line.startswith(f"[FAIL] port: GRPC_PORT: port {port} is already in use on 127.0.0.1")
               for line in lines), lines
    code, lines = doctor(monkeypatch, {**good_env(tiny_artifact, tmp_path), "GRPC_PORT": str(port)})  # freed
    assert code == 0 and any(line.startswith("[ok  ] port") and f"{port} (GRPC_PORT)" in line for line in lines)


def test_unreachable_database_fails_without_leaking_the_password(monkeypatch, tiny_artifact, tmp_path):
    env = {**good_env(tiny_artifact, tmp_path),
           "DATABASE_URL": "postgresql+psycopg://app:s3cret@127.0.0.1:1/predictions?connect_timeout=2"}
    code, lines = doctor(monkeypatch, env)
    assert code == 1
    (line,) = [line for line in lines if line.startswith("[FAIL] database")]
    assert "s3cret" not in "\n".join(lines) and "pg_isready" in "\n".join(lines)


def test_a_database_url_with_an_unknown_option_is_a_url_to_correct_not_a_server_to_check(monkeypatch, tiny_artifact,
                                                                                          tmp_path):
    """``?sslmod=require`` failed every connection before the network; doctor said "check the server
    (`pg_isready`)" (red team helper-74)."""
    env = {**good_env(tiny_artifact, tmp_path),
           "DATABASE_URL": "postgresql://app:s3cret@127.0.0.1:1/predictions?sslmod=require"}
    code, lines = doctor(monkeypatch, env)
    failed = lines.index(next(line for line in lines if line.startswith("[FAIL] database")))
    assert code == 1 and 'invalid connection option "sslmod"' in lines[failed]
    assert "pg_isready" not in lines[failed + 1] and "correct DATABASE_URL" in lines[failed + 1]


def test_invalid_environment_value_is_named(monkeypatch, tiny_artifact, tmp_path):
    code, lines = doctor(monkeypatch, {**good_env(tiny_artifact, tmp_path), "MAX_QUEUE": "-3"})
    assert code == 1 and "MAX_QUEUE='-3'" in lines[0]


def test_cli_flag_overrides_the_environment(monkeypatch, tiny_artifact, tmp_path, capsys):
    for name, value in good_env(tiny_artifact, tmp_path).items():
        monkeypatch.setenv(name, value)
    assert main(["doctor", "--port", "not-a-port"]) == 1
    assert "PORT='not-a-port'" in capsys.readouterr().out


def test_every_check_passes_on_a_good_setup_and_leaves_no_probe_file(monkeypatch, tiny_artifact, tmp_path):
    env = good_env(tiny_artifact, tmp_path)
    before = sorted(tmp_path.iterdir())
    code, lines = doctor(monkeypatch, env)
    assert code == 0, lines
    assert [line.split(":")[0] for line in lines] == [
        "[ok  ] configuration", "[ok  ] files", "[ok  ] disk", "[ok  ] database", "[ok  ] port", "[ok  ] device",
        "[ok  ] model"]
    assert "smoke predictions ok" in lines[-1]
    after = sorted(p for p in tmp_path.iterdir() if p.name not in ("doctor.db",))
    assert after == before  # the write probe was removed (and SPOOL_DIR, absent, was not created)


@pytest.mark.parametrize("name", CASES)
def test_doctor_fails_each_start_up_case_naming_it(monkeypatch, capsys, tiny_artifact, tmp_path, name):
    """The start-up matrix, through doctor: a FAIL line naming the problem, exit 1, never a traceback."""
    case = CASES[name]
    (tmp_path / "regular-file").write_text("a file where a directory is expected\n")
    broken = broken_copy(tiny_artifact, tmp_path, case.breaker) if case.breaker else None
    env = {**good_env(tiny_artifact, tmp_path), **environment(case, tiny_artifact, broken, tmp_path)}
    code, lines = doctor(monkeypatch, env)
    assert code == 1, lines
    failures = [line for line in lines if line.startswith("[FAIL]")]
    assert any(all(fragment in line for fragment in case.names) for line in failures), lines
    assert "Traceback" not in "\n".join(lines) + "".join(capsys.readouterr())


def test_a_failed_device_check_skips_the_model_check(monkeypatch, tiny_artifact, tmp_path):
    import server.engine

    monkeypatch.setattr(server.engine, "cuda_available", lambda: False)
    code, lines = doctor(monkeypatch, {**good_env(tiny_artifact, tmp_path), "DEVICE": "cuda"})
    assert code == 1
    assert lines[-2].startswith("[FAIL] device") or lines[-3].startswith("[FAIL] device"), lines
    assert lines[-1].startswith("[skip] model"), lines


def test_a_check_that_raises_the_unforeseen_is_reported_not_raised(monkeypatch, tiny_artifact, tmp_path):
    import server.preflight

    def explode(host, port):
        raise ValueError("something no check foresaw")

    monkeypatch.setattr(server.preflight, "port_problem", explode)
    code, lines = doctor(monkeypatch, good_env(tiny_artifact, tmp_path))
    assert code == 1
    assert any(line.startswith("[FAIL] port") and "ValueError: something no check foresaw" in line for line in lines)


def test_a_full_spool_volume_is_named_as_refusing_every_prediction_now(monkeypatch, tiny_artifact, tmp_path,
                                                                       small_tmpfs):
    """The probe file is empty, so the disk check passed on a full volume with at most the cap's warning, which
    spoke of the disk filling while the database is down: every request would be refused now. Still a warning,
    not a failure, for a spool in use: a server must start on a full spool volume to replay its spool and so free
    it. A new spool must write its identity file first: on a full volume serve exited 8 once the model had
    loaded, and doctor said ok (red team helper-67); both now refuse it at once, saying so."""
    env = {**good_env(tiny_artifact, tmp_path), "SPOOL_DIR": str(small_tmpfs / "spool"),
           "SPOOL_MAX_BYTES": str(1 << 20), "MAX_REQUEST_BYTES": "16384"}  # 32 KiB of records: the 64 KiB volume fits
    code, lines = doctor(monkeypatch, env)
    disk = next(line for line in lines if line.startswith("[ok  ] disk"))
    assert code == 0 and "is more than SPOOL_DIR" in disk and "full or nearly" not in disk, lines
    with (small_tmpfs / "filler").open("wb", buffering=0) as filler, pytest.raises(OSError, match="No space left"):
        while True:
            filler.write(b"x" * 4096)
    code, lines = doctor(monkeypatch, env)
    disk = next(line for line in lines if line.startswith("[FAIL] disk"))
    assert code == 1 and f"SPOOL_DIR {small_tmpfs / 'spool'} is new, and {small_tmpfs} has no room to set it up " \
        "(No space left on device; 0 bytes free): free space on its volume" in disk, lines
    settings = load_settings(model_path=tiny_artifact, spool_dir=small_tmpfs / "spool")
    with pytest.raises(StartupError) as refused:  # serve's own check, before the model loads
        check_paths(settings)
    assert refused.value.exit_code == ExitCode.FILESYSTEM
    (small_tmpfs / "filler").unlink()
    (small_tmpfs / "spool").mkdir()
    SpoolDirectory(small_tmpfs / "spool").write_identity(database_identity(env["DATABASE_URL"]))  # in use now
    with (small_tmpfs / "filler").open("wb", buffering=0) as filler, pytest.raises(OSError, match="No space left"):
        while True:
            filler.write(b"x" * 4096)
    code, lines = doctor(monkeypatch, env)
    assert code == 0, lines
    disk = next(line for line in lines if line.startswith("[ok  ] disk"))
    assert "volume is full or nearly (0 bytes free, less than one request's records may take: 2 x " \
        "MAX_REQUEST_BYTES): predictions whose records do not fit are refused with 503 \"store_unavailable\"" \
        in disk, disk
    code, lines = doctor(monkeypatch, {**env, "STORE_DURABILITY": "async"})
    disk = next(line for line in lines if line.startswith("[ok  ] disk"))
    assert "records that do not fit wait in memory and past its bound are lost" in disk, disk


def test_a_spool_cap_larger_than_its_volume_is_named_with_what_to_change(monkeypatch, tiny_artifact, tmp_path,
                                                                         small_tmpfs, caplog):
    """A warning, not a failure: records are still refused (503) rather than lost when that disk fills."""
    env = {**good_env(tiny_artifact, tmp_path), "SPOOL_DIR": str(small_tmpfs / "spool"),
           "SPOOL_MAX_BYTES": str(1 << 20), "MAX_REQUEST_BYTES": "16384"}  # the 64 KiB volume holds its records
    code, lines = doctor(monkeypatch, env)
    assert code == 0, lines
    disk = next(line for line in lines if line.startswith("[ok  ] disk"))
    assert "warning: SPOOL_MAX_BYTES=1048576 is more than SPOOL_DIR" in disk and "lower SPOOL_MAX_BYTES" in disk
    assert any("SPOOL_MAX_BYTES=1048576" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)

    code, lines = doctor(monkeypatch, {**env, "SPOOL_DIR": str(tmp_path / "spool")})  # a roomy volume
    assert "warning" not in next(line for line in lines if line.startswith("[ok  ] disk"))


def test_a_sqlite_file_removed_under_a_running_server_is_a_failure_not_a_database_to_come(monkeypatch, tiny_artifact,
                                                                                         tmp_path):
    """A red team removed the file under a running server; doctor said a first start would create it."""
    env = good_env(tiny_artifact, tmp_path)
    (tmp_path / "server").mkdir()
    server = start_server({key: env[key] for key in ("MODEL_PATH", "DATABASE_URL", "SPOOL_DIR")}, tmp_path / "server")
    try:
        (tmp_path / "doctor.db").unlink()
        code, lines = doctor(monkeypatch, env)
    finally:
        stop_server(server)
    database = next(line for line in lines if " database" in line[:16])
    assert code != 0 and database.startswith("[FAIL]"), lines
    assert "a server is running on SPOOL_DIR" in database and "put it back" in database, database
    code, lines = doctor(monkeypatch, env)  # no server now: a first start makes it
    assert "yet: the server creates it at its first start" in next(line for line in lines if " database" in line[:16])


def test_more_engine_threads_than_cores_is_named_with_what_to_set(monkeypatch, tiny_artifact, tmp_path, caplog):
    """A warning, not a failure; past 256 threads per inference the value itself is refused."""
    monkeypatch.setattr("server.engine.available_cores", lambda: 4)

    def configuration(**env: str) -> str:
        code, lines = doctor(monkeypatch, {**good_env(tiny_artifact, tmp_path), **env})
        assert code == 0, lines
        return lines[0]

    said = configuration(INTRA_OP_THREADS="3", ENGINE_WORKERS="2")
    assert ("warning: INTRA_OP_THREADS=3 × 2 engine worker(s) is 6 CPU threads on 4 usable core(s)" in said
            and "set INTRA_OP_THREADS=0 (auto: 2 here) or at most 2" in said), said
    assert any("INTRA_OP_THREADS=3" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert "warning" not in configuration(INTRA_OP_THREADS="2", ENGINE_WORKERS="2")
    assert "warning" not in configuration(INTRA_OP_THREADS="0", ENGINE_WORKERS="8")  # auto never oversubscribes
    code, lines = doctor(monkeypatch, {**good_env(tiny_artifact, tmp_path), "INTRA_OP_THREADS": "3000"})
    assert code == 1 and "INTRA_OP_THREADS='3000'" in lines[0] and "256" in lines[0], lines


LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[3]), int(sys.argv[1])))
from server.config import load_settings
from server.exitcodes import StartupError
from server.preflight import check_open_files
try:
    print(check_open_files(load_settings(max_connections=int(sys.argv[2]))))
except StartupError as error:
    print(f"refused, exit {int(error.exit_code)}: {error}")
print("soft limit now", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


@pytest.mark.parametrize("hard, connections, said, soft_after", [
    (4096, 1024, "soft limit raised from 256 to 1280", 1280),  # a container's soft 1024-style limit: raised
    (512, 1024, "refused, exit 2: MAX_CONNECTIONS=1024 needs about 1280 open files, and this process may open at "
                "most 512 (ulimit -Hn); lower MAX_CONNECTIONS to 256", 256),
    (512, 256, "soft limit raised from 256 to 512", 512),  # the refusal's advice fits
    (512, 100, "limit 400 holds MAX_CONNECTIONS=100", 400),  # soft 400 >= 100 + 256
])
def test_max_connections_is_held_to_the_open_file_limit(hard, connections, said, soft_after):
    """Past the limit accept() fails with EMFILE before the connection bound can answer 503. Each connection refused
    above MAX_CONNECTIONS holds a file while it lingers (at most 128 at once), and the server 128 of its own."""
    soft = 400 if "holds" in said else 256
    done = subprocess.run([sys.executable, "-c", LIMITED, str(hard), str(connections), str(soft)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert said in done.stdout and f"soft limit now {soft_after}" in done.stdout, done.stdout


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero"])
def test_a_special_file_as_the_spools_database_json_fails_the_disk_check_as_serve_refuses_it(monkeypatch, tiny_artifact,
                                                                                            tmp_path, kind):
    """serve refused to start on it (SpoolDirUnusable, naming it) while doctor said every check was ok."""
    from server.store.spooldir import IDENTITY_FILE
    from tests.test_spool_special_files import plant

    planted = tmp_path / "spool" / IDENTITY_FILE
    plant(planted, kind)
    code, lines = doctor(monkeypatch, good_env(tiny_artifact, tmp_path))
    assert code == 1, lines
    failure = next(i for i, line in enumerate(lines) if line.startswith("[FAIL]"))
    assert lines[failure].startswith(f"[FAIL] disk: SPOOL_DIR={tmp_path / 'spool'} cannot be used: {planted} is not a "
                                     "regular file but ") and lines[failure].endswith(": remove it"), lines
    assert lines[failure + 1].startswith("       fix: remove the file named above"), lines
    assert os.path.lexists(planted)  # left for the operator to look at


@pytest.mark.parametrize("planted", ["doctor.db", "doctor.db-wal", "doctor.db-shm"])
def test_a_broken_sqlite_file_or_companion_is_named_with_a_sqlite_fix(monkeypatch, tiny_artifact, tmp_path, planted):
    """A link loop as the file failed "unexpectedly: RuntimeError", a FIFO as -shm was SQLite's "disk I/O error"
    naming no file, and both were told to run `pg_isready`, a PostgreSQL tool."""
    if planted == "doctor.db":
        (tmp_path / planted).symlink_to(tmp_path / planted)
        said = f"SQLite file {tmp_path / planted} cannot be opened for reading and writing (Too many levels"
    else:
        sqlite3.connect(tmp_path / "doctor.db").close()
        os.mkfifo(tmp_path / planted)
        said = f"SQLite file {tmp_path / planted} is not a regular file but a named pipe (FIFO): remove it"
    code, lines = doctor(monkeypatch, good_env(tiny_artifact, tmp_path))
    assert code == 1, lines
    failure = next(i for i, line in enumerate(lines) if line.startswith("[FAIL] database"))
    assert lines[failure].startswith(f"[FAIL] database: {said}"), lines
    assert "-wal and -shm" in lines[failure + 1] and "pg_isready" not in "\n".join(lines), lines


def test_a_memory_limit_too_small_for_the_settings_is_fixed_by_memory_not_by_the_artifact(monkeypatch, tiny_artifact,
                                                                                          tmp_path):
    """The model check fails on the memory plan (serve's exit 2, its own line), not on the artifact: the fix is
    the setting or the limit that line names, never restoring or rebuilding a model that is fine."""
    import server.runtime
    from server.memory_model import HostMemory

    limit = int(HostMemory().current() / 0.85) + (16 << 20)  # 13.6 MiB under MEMORY_HIGH_WATER: less than a batch
    monkeypatch.setattr(server.runtime, "memory_limit_bytes", lambda: limit)
    code, lines = doctor(monkeypatch, {**good_env(tiny_artifact, tmp_path), "MAX_BATCH_TOKENS": "8192"})
    assert code == 1
    failure = next(i for i, line in enumerate(lines) if line.startswith("[FAIL] model"))
    assert "the memory limit" in lines[failure] and "cannot hold this server with MAX_BATCH_TOKENS as set" in (
        lines[failure]), lines
    fix = lines[failure + 1]
    assert fix.startswith("       fix: give it at least ") and "or lower MAX_BATCH_TOKENS" in fix, fix
    assert lines[failure].endswith(fix.removeprefix("       fix: ")), "doctor's remedy is serve's own"


def test_a_model_variant_the_artifact_does_not_ship_is_fixed_by_the_setting(monkeypatch, tiny_artifact, tmp_path):
    code, lines = doctor(monkeypatch, {**good_env(tiny_artifact, tmp_path), "MODEL_VARIANT": "fp16"})
    assert code == 1
    failure = next(i for i, line in enumerate(lines) if line.startswith("[FAIL] model"))
    assert "'fp16'" in lines[failure], lines
    fix = lines[failure + 1]
    assert fix.startswith("       fix: set MODEL_VARIANT to one of the variants listed above or auto"), fix
