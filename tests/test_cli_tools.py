"""The operators' CLI tools (`sentiment-analyzer doctor|keys|feedback|spool|status`) on what the real world
hands them: a database behind this release, a spool another process holds or cannot be read, a broken
``database.json``, standard output that refuses the output, Ctrl-C, credentials in a URL. Each answer is one
line and an exit code, never a traceback, and doctor says what ``serve`` would refuse."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from scripts.benchlib.serverproc import ROOT
from server.cli import base_url, main
from server.config import load_settings
from server.exitcodes import ExitCode
from server.metrics import Metrics
from server.store import PredictionStore, SpoolLocked, migrate
from server.store.rows import encode_lines, record_row
from server.store.spooldir import database_identity
from server.store.wal import WriteAheadLog
from tests.store_fixtures import created_database, make_record
from tests.test_doctor import doctor, good_env


def cli(*argv: str, cwd: Path = ROOT, env: dict[str, str] | None = None, stdout=subprocess.PIPE,
        prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The real CLI in a process of its own (``env`` on top of this one's, DATABASE_URL and SPOOL_DIR removed)."""
    base = {k: v for k, v in os.environ.items() if k.upper() not in ("DATABASE_URL", "SPOOL_DIR")}
    return subprocess.run([*prefix, sys.executable, "-m", "server.cli", *argv], cwd=cwd, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=120,
                          env={**base, "PYTHONPATH": str(ROOT), **(env or {})})


def one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    err = result.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("ERROR "), err
    assert all(fragment in err for fragment in fragments), err
    return err


def revision(url: str) -> str | None:
    engine = create_engine(url)
    try:
        return migrate.current_revision(engine)
    finally:
        engine.dispose()


def leave_spool(spool_dir: Path, identity: object, records: int = 3) -> None:
    """A spool as a previous process left it: records on disk, ``identity`` as its database.json."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    wal = WriteAheadLog(spool_dir, 1 << 30)
    wal.open()
    wal.append(encode_lines([record_row(make_record(f"text {n}", request_id=f"r{n}"), True) for n in range(records)]))
    wal.close()
    (spool_dir / "database.json").write_text(json.dumps(identity))


HOLD = """
import sys
from server.store.spooldir import SpoolDirectory
SpoolDirectory(sys.argv[1]).lock()
print("locked", flush=True)
sys.stdin.read()
"""


def hold_spool(spool_dir: Path) -> subprocess.Popen:
    """Another process holding SPOOL_DIR's lock as a server does, until its standard input closes."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(spool_dir)], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "locked\n"
    return process


# 1. doctor says what serve would refuse


@pytest.mark.postgres
def test_doctor_fails_a_postgresql_schema_behind_as_serve_does_and_migrates_nothing(monkeypatch, tiny_artifact,
                                                                                  tmp_path, pg_store_db):
    env = {**good_env(tiny_artifact, tmp_path), "DATABASE_URL": pg_store_db.url, "DB_AUTO_MIGRATE": "false"}
    settings = load_settings(database_url=pg_store_db.url, spool_dir=tmp_path / "store-spool", db_auto_migrate=False)
    with pytest.raises(migrate.SchemaBehind):  # serve: the store refuses to start
        asyncio.run(PredictionStore(settings, Metrics()).start())
    code, lines = doctor(monkeypatch, env)
    assert code == 1, lines
    failure = next(i for i, line in enumerate(lines) if line.startswith("[FAIL]"))
    assert lines[failure].startswith("[FAIL] database: database schema is at revision none"), lines
    assert "sentiment-analyzer db upgrade" in lines[failure + 1], lines
    assert [line for line in lines if line.startswith("[FAIL]")] == [lines[failure]], lines
    assert revision(pg_store_db.url) is None  # doctor read the schema, it did not migrate it

    assert main(["db", "upgrade", "--database-url", pg_store_db.url]) == 0
    code, lines = doctor(monkeypatch, env)
    assert code == 0, lines
    assert f"schema at revision {migrate.head_revision()}" in next(line for line in lines if "database" in line)


def test_doctor_names_a_spool_dir_held_by_another_process_and_takes_nothing(monkeypatch, tiny_artifact, tmp_path):
    env = good_env(tiny_artifact, tmp_path)
    holder = hold_spool(Path(env["SPOOL_DIR"]))  # another server on this SPOOL_DIR (and another PORT)
    try:
        settings = load_settings(database_url=env["DATABASE_URL"], spool_dir=env["SPOOL_DIR"])
        with pytest.raises(SpoolLocked):  # serve: the store refuses to start
            asyncio.run(PredictionStore(settings, Metrics()).start())
        code, lines = doctor(monkeypatch, env)
        assert code == 1, lines
        failures = [i for i, line in enumerate(lines) if line.startswith("[FAIL]")]
        assert len(failures) == 1, lines
        assert lines[failures[0]].startswith(f"[FAIL] port: SPOOL_DIR={env['SPOOL_DIR']} is in use by another "
                                             f"process (pid {holder.pid}, a server)"), lines
        assert "give this server its own SPOOL_DIR" in lines[failures[0] + 1], lines

        with socket.socket() as taken:  # a server running here holds both: one line names both
            taken.bind(("127.0.0.1", int(env["PORT"])))
            taken.listen()
            code, lines = doctor(monkeypatch, env)
        (line,) = [line for line in lines if line.startswith("[FAIL]")]
        assert line.startswith(f"[FAIL] port: port {env['PORT']} is already in use") and "SPOOL_DIR=" in line, lines
        assert (Path(env["SPOOL_DIR"]) / ".lock").read_text().split()[0] == str(holder.pid)  # left as it was
    finally:
        holder.communicate(timeout=30)
    code, lines = doctor(monkeypatch, env)
    assert code == 0 and "is held by no other process" in next(line for line in lines if "port" in line), lines


# 2. read-only commands never migrate; no database made as a side effect


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_commands_that_only_read_refuse_a_schema_behind_instead_of_migrating_it(backend, tmp_path, request):
    if backend == "sqlite":
        (tmp_path / "empty.db").touch()  # an existing, empty database (the wrong file, or an older release's)
        url = f"sqlite:///{tmp_path}/empty.db"
    else:
        url = request.getfixturevalue("pg_store_db").url
    for command in (("keys", "list"), ("feedback", "export", "--out", str(tmp_path / "fb.tsv")),
                    ("feedback", "export", "--out", "-")):
        result = cli(*command, "--database-url", url, env={"DB_AUTO_MIGRATE": "true"})
        assert result.returncode == 1, result
        one_error_line(result, "schema is at revision none", "sentiment-analyzer db upgrade")
        assert result.stdout == ""
    assert revision(url) is None and not (tmp_path / "fb.tsv").exists()
    engine = create_engine(url)
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


def test_keys_create_makes_no_database_where_it_happens_to_run_and_says_where_it_makes_one(tmp_path):
    """Run outside the server's directory without DATABASE_URL it made ./predictions.db silently and put the key
    there, where no server looks."""
    refused = cli("keys", "create", "--name", "ops", cwd=tmp_path)
    assert refused.returncode == 1 and refused.stdout == ""
    one_error_line(refused, f"no SQLite database at {tmp_path / 'predictions.db'}", "DATABASE_URL is not set")
    assert list(tmp_path.iterdir()) == []

    named = tmp_path / "data" / "keys.db"
    created = cli("keys", "create", "--name", "ops", cwd=tmp_path, env={"DATABASE_URL": f"sqlite:///{named}"})
    assert created.returncode == 0, created.stderr
    assert f"creating a new SQLite database at {named}" in created.stderr and named.is_file()
    again = cli("keys", "create", "--name", "ops2", cwd=tmp_path, env={"DATABASE_URL": f"sqlite:///{named}"})
    assert again.returncode == 0 and "creating" not in again.stderr, again.stderr


@pytest.mark.parametrize("argv", [("keys", "revoke", "\udcff"), ("keys", "create", "--name", "caf\udce9")])
def test_an_argument_that_is_not_utf8_is_named_in_one_line(tmp_path, argv):
    """``keys revoke $'\\xff'`` said "'utf-8' codec can't encode character '\\udcff' ... surrogates not allowed" (red
    team helper-104): the bytes of an argument that is not UTF-8 reach Python as lone surrogates."""
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    refused = subprocess.run([sys.executable, "-m", "server.cli", *(os.fsencode(arg) for arg in argv),
                              "--database-url", url], cwd=ROOT, capture_output=True, timeout=120)
    assert refused.returncode == ExitCode.CONFIG and refused.stdout == b""
    err = refused.stderr.decode("utf-8", "replace").strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and "is not valid UTF-8" in err, err


def test_keys_create_takes_the_default_path_when_database_url_names_it(tmp_path):
    """Set, DATABASE_URL names the file whatever its spelling: the built-in default's own was refused as if unset
    (the check compared the strings)."""
    created = cli("keys", "create", "--name", "ops", cwd=tmp_path, env={"DATABASE_URL": "sqlite:///./predictions.db"})
    assert created.returncode == 0, created.stderr
    assert f"creating a new SQLite database at {tmp_path / 'predictions.db'}" in created.stderr
    assert (tmp_path / "predictions.db").is_file()


# 3. spool status on a spool it cannot read, or that changes under it


def test_spool_status_on_an_unreadable_spool_is_one_line(tmp_path):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    spool = tmp_path / "spool"
    leave_spool(spool, database_identity(f"sqlite:///{tmp_path}/p.db"))
    spool.chmod(0)
    # as root, a mode does not stop a read: drop the capabilities that let root past it (as a non-root user is)
    drop = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
            "-dac_override,-dac_read_search")
    try:
        result = cli("spool", "status", "--spool-dir", str(spool), prefix=drop)
    finally:
        spool.chmod(0o755)
    if "setpriv" in result.stderr:
        pytest.skip(f"cannot drop capabilities here: {result.stderr.strip()}")
    assert result.returncode == 1, result
    one_error_line(result, f"cannot read the spool {spool}", "Permission denied")


def test_spool_status_names_a_segment_that_links_to_nothing(tmp_path):
    """It was counted as a segment released meanwhile (nothing), where a replay of the same spool fails on it."""
    spool = tmp_path / "spool"
    leave_spool(spool, database_identity(f"sqlite:///{tmp_path}/p.db"))
    dangling = spool / "wal-00000000000099999999.jsonl"
    dangling.symlink_to(tmp_path / "gone")
    result = cli("spool", "status", "--spool-dir", str(spool))
    assert result.returncode == 1, result
    err = one_error_line(result, f"cannot read the spool {dangling}", "No such file or directory")
    assert "server's user" not in err  # not a permission problem


def test_spool_status_counts_a_segment_released_while_it_looks_as_empty(tmp_path, monkeypatch, capsys):
    """A replay (or the server) releases a segment between the listing and its reading: FileNotFoundError."""
    import server.store.wal as wal

    spool = tmp_path / "spool"
    leave_spool(spool, database_identity(f"sqlite:///{tmp_path}/p.db"))
    (segment,) = [p for p in spool.iterdir() if wal.is_segment(p.name)]
    listed = wal.is_segment

    def released_once_listed(name: str) -> bool:
        if name == segment.name:
            segment.unlink(missing_ok=True)  # the release lands just after iterdir() named it
        return listed(name)

    monkeypatch.setattr(wal, "is_segment", released_once_listed)
    assert main(["spool", "status", "--spool-dir", str(spool)]) == 0
    assert capsys.readouterr().out.startswith(f"{spool}: 0 predictions (0 bytes)")


# 4. database.json without its keys


@pytest.mark.parametrize("identity", [{"dialect": "sqlite"}, ["sqlite"], "sqlite"])
def test_a_database_json_without_its_keys_is_an_unknown_database_for_the_cli_and_the_server(tmp_path, identity,
                                                                                          capsys):
    spool, url = tmp_path / "spool", f"sqlite:///{tmp_path}/p.db"
    leave_spool(spool, identity)
    assert main(["spool", "status", "--spool-dir", str(spool)]) == 0
    assert "3 predictions" in capsys.readouterr().out
    result = cli("spool", "replay", "--spool-dir", str(spool), env={"DATABASE_URL": url})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "database.json does not name a database" in result.stderr  # the store's log line, then the answer
    assert result.stderr.strip().splitlines()[-1].startswith("ERROR ") and "pass --into URL" in result.stderr

    async def start() -> dict:  # serve: the spool is set aside as foreign, the server starts
        store = PredictionStore(load_settings(database_url=url, spool_dir=spool), Metrics())
        await store.start()
        try:
            return store.health()
        finally:
            await store.close()

    health = asyncio.run(start())
    assert [foreign["rows"] for foreign in health["foreign_spools"]] == [3], health


# 5. names too long, standard output that refuses the output


def test_feedback_export_to_a_name_too_long_is_one_line(tmp_path):
    url = f"sqlite:///{tmp_path}/store.db"
    assert main(["db", "upgrade", "--database-url", url]) == 0
    out = tmp_path / ("x" * 300)
    result = cli("feedback", "export", "--out", str(out), "--database-url", url)
    assert result.returncode == 1
    one_error_line(result, "cannot write --out", "File name too long")
    fits = tmp_path / ("y" * 250)  # a name that fits: its temporary file must fit too
    assert cli("feedback", "export", "--out", str(fits), "--database-url", url).returncode == 0
    assert fits.read_text() == "text\tlabel\n"


def test_spool_status_to_a_full_device_blames_the_output_not_the_spool(tmp_path):
    spool = tmp_path / "spool"
    leave_spool(spool, database_identity(f"sqlite:///{tmp_path}/p.db"))
    with open("/dev/full", "w") as full:
        result = cli("spool", "status", "--spool-dir", str(spool), stdout=full)
    assert result.returncode == 1
    err = one_error_line(result, "standard output refused the spool's status", "No space left on device")
    assert "cannot read the spool" not in err and "server's user" not in err, err


@pytest.mark.parametrize("command", [("keys", "list"), ("feedback", "export", "--out", "-"),
                                     ("keys", "create", "--name", "lost")])
def test_output_to_a_full_device_or_a_closed_pipe_is_one_line(tmp_path, command):
    url = f"sqlite:///{tmp_path}/store.db"
    assert main(["db", "upgrade", "--database-url", url]) == 0
    with open("/dev/full", "w") as full:
        result = cli(*command, "--database-url", url, stdout=full)
    assert result.returncode == 1
    err = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and "No space left on device" in err, result.stderr
    if command[1] == "create":  # the key exists, unseen: the line says which one to revoke
        assert "was created but not shown; revoke it (`sentiment-analyzer keys revoke" in err, err

    process = subprocess.Popen([sys.executable, "-m", "server.cli", *command, "--database-url", url], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # `| head -0`: the reader is gone before the first line
    err = process.stderr.read()
    assert process.wait(timeout=60) == 1 and "Traceback" not in err, err
    assert "standard output was closed before" in err.strip().splitlines()[-1], err


# 6. Ctrl-C


def interruptible(argv: list[str]) -> subprocess.Popen:
    """The CLI in a process that Ctrl-C reaches: a shell that starts a job in the background without job control
    (CI's, for one) has it ignore SIGINT, and Python then installs no KeyboardInterrupt for it."""
    return subprocess.Popen([sys.executable, "-m", "server.cli", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def interrupted(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err and err.strip() == "ERROR interrupted", err
    return err


def wait_for_lock(watcher, process: subprocess.Popen, table: str) -> None:
    """Until a statement on ``table`` waits for a lock (within the CLI's 30 s statement timeout)."""
    deadline = time.monotonic() + 20
    while not watcher.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                   "AND query LIKE :table"), {"table": f"%{table}%"}).scalar():
        watcher.rollback()  # a new snapshot of pg_stat_activity each time
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.1)


def test_ctrl_c_in_status_is_one_line_and_exit_130():
    with socket.socket() as silent:  # a server that takes the connection and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        process = interruptible(["status", "--timeout", "600", "--url", f"http://127.0.0.1:{silent.getsockname()[1]}"])
        silent.settimeout(60)
        connection, _ = silent.accept()  # status now waits for an answer
        with connection:
            interrupted(process)


@pytest.mark.postgres
def test_ctrl_c_in_keys_list_waiting_on_a_locked_table_is_one_line_and_exit_130(pg_store_db):
    assert main(["db", "upgrade", "--database-url", pg_store_db.url]) == 0
    engine = create_engine(pg_store_db.url)
    try:
        with engine.connect() as locker, engine.connect() as watcher:
            locker.execute(text("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE"))  # a migration under way
            process = interruptible(["keys", "list", "--database-url", pg_store_db.url])
            wait_for_lock(watcher, process, "api_keys")
            interrupted(process)
            locker.rollback()
    finally:
        engine.dispose()


# 7. credentials and holders named right


def test_status_refuses_credentials_in_the_url_without_echoing_them():
    result = cli("status", "--url", "http://admin:s3cret@127.0.0.1:1", "--timeout", "1")
    assert result.returncode == 2 and "s3cret" not in result.stdout + result.stderr, result
    assert "http://admin:***@127.0.0.1:1 holds credentials" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.postgres
def test_a_spool_held_by_a_replay_is_not_said_to_be_held_by_a_server(tmp_path, pg_store_db):
    spool, url = tmp_path / "spool", pg_store_db.url
    leave_spool(spool, database_identity(url))
    assert main(["db", "upgrade", "--database-url", url]) == 0
    engine = create_engine(url)
    try:
        with engine.connect() as locker, engine.connect() as watcher:
            locker.execute(text("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE"))
            first = subprocess.Popen([sys.executable, "-m", "server.cli", "spool", "replay", "--spool-dir", str(spool),
                                      "--into", url], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
            wait_for_lock(watcher, first, "predictions")  # the first replay holds the spool, waiting to insert
            second = cli("spool", "replay", "--spool-dir", str(spool), "--into", url)
            locker.rollback()
            out, err = first.communicate(timeout=60)
    finally:
        engine.dispose()
    assert first.returncode == 0 and "replayed 3 predictions" in out, err
    assert second.returncode == 1
    said = one_error_line(second, "in use by another process", f"pid {first.pid}", "`sentiment-analyzer spool replay`")
    assert "a server" not in said and "running server" not in said, said


# 8. the second red team's findings


def test_doctor_on_a_sqlite_file_not_there_yet_creates_neither_it_nor_its_folders(monkeypatch, tiny_artifact,
                                                                                  tmp_path):
    """Connecting made the file (and its folders), which ``keys create`` then took for the server's database."""
    missing = tmp_path / "nodir" / "sub" / "x.db"
    code, lines = doctor(monkeypatch, {**good_env(tiny_artifact, tmp_path), "DATABASE_URL": f"sqlite:///{missing}"})
    assert code == 0, lines
    assert f"no SQLite database at {missing} yet" in next(line for line in lines if "database" in line), lines
    assert not (tmp_path / "nodir").exists()


def test_keys_create_shows_the_key_when_standard_error_fails(tmp_path):
    """The notice on standard error failed and was taken for standard output failing: the key was made and never
    shown."""
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "server.cli", "keys", "create", "--name", "ops"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=full, text=True, timeout=120,
                                env={**os.environ, "PYTHONPATH": str(ROOT),
                                     "DATABASE_URL": f"sqlite:///{tmp_path / 'keys.db'}"})
    created, key = result.stdout.splitlines()
    assert created.startswith("created API key id=") and len(key) > 32 and " " not in key, result.stdout


@pytest.mark.parametrize("argv", [["keys", "list"], ["db", "current"], ["feedback", "export", "--out", "-"]])
def test_a_database_url_whose_port_is_not_a_number_is_one_line(argv):
    result = cli(*argv, "--database-url", "postgresql://ops:s3cret@db:notaport/sentiment")
    assert result.returncode != 0 and "s3cret" not in result.stderr
    one_error_line(result, "DATABASE_URL")


@pytest.mark.parametrize(("given", "taken"), [("localhost:8000", "http://localhost:8000"),
                                              ("127.0.0.1:8000/", "http://127.0.0.1:8000/"),
                                              ("https://sa.example:443", "https://sa.example:443")])
def test_status_takes_an_address_without_a_scheme_as_http(given, taken):
    """``localhost:8000`` (as curl and the runbook write it) was read as the scheme "localhost": a healthy server
    was reported unreachable, "Outage of every replica: P0" (red team helper-74)."""
    assert base_url(given) == taken


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:8000", "http://", "file:///tmp/x", "localhost:notaport",
                                 "http://localhost:99999", "https//localhost:8000", "localhost:0"])
def test_status_refuses_a_url_it_cannot_ask_as_an_argument_error(url):
    result = cli("status", "--url", url, "--timeout", "1")
    assert result.returncode == 2 and "not an http:// or https:// URL" in result.stderr, result.stderr
    assert "P0" not in result.stdout + result.stderr


@pytest.mark.parametrize("url", ["http://admin:s3cret@host:notaport/", "http://admin:s3cret@[::1/"])
def test_status_does_not_echo_a_url_it_cannot_parse(url):
    """argparse repeats a value its type function refused with ValueError: the password with it."""
    result = cli("status", "--url", url, "--timeout", "1")
    assert result.returncode == 2 and "s3cret" not in result.stdout + result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_database_json_nested_too_deeply_is_an_unknown_database(tmp_path):
    spool = tmp_path / "spool"
    leave_spool(spool, {})
    (spool / "database.json").write_text("[" * 200_000)
    result = cli("spool", "status", "--spool-dir", str(spool))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "3 predictions" in result.stdout


@pytest.mark.parametrize("planted", ["fifo", "directory"])
def test_a_lock_file_that_is_not_a_file_is_one_line_for_doctor_and_serve(tiny_artifact, tmp_path, planted):
    """A FIFO named .lock hung doctor (its open waited for a writer) and killed serve with a traceback."""
    env = good_env(tiny_artifact, tmp_path)
    spool = Path(env["SPOOL_DIR"])
    spool.mkdir(parents=True, exist_ok=True)
    os.mkfifo(spool / ".lock") if planted == "fifo" else (spool / ".lock").mkdir()
    checked = cli("doctor", env=env)  # its own process: a regression hangs it, not the suite (cli's timeout)
    lines = checked.stdout.splitlines()
    assert checked.returncode == 1, lines
    assert any(line.startswith(f"[FAIL] port: SPOOL_DIR={spool} is not usable") for line in lines), lines
    served = subprocess.run([sys.executable, "-m", "server.cli", "serve"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert served.returncode == ExitCode.FILESYSTEM, served.stderr[-2000:]
    output = served.stdout + served.stderr  # the server logs to standard output
    assert "Traceback" not in output and f"SPOOL_DIR={spool} is not usable" in output


def test_spool_replay_into_a_sqlite_file_that_is_not_there_creates_nothing(tmp_path):
    """It created the file (a typo's name) and moved the records there, where no server reads them (red team
    helper-74)."""
    spool, into = tmp_path / "spool", f"sqlite:///{tmp_path / 'predictions-typo.db'}"
    leave_spool(spool, database_identity(into))
    result = cli("spool", "replay", "--spool-dir", str(spool), "--into", into)
    assert result.returncode == 1
    one_error_line(result, f"no SQLite database at {tmp_path / 'predictions-typo.db'}")
    assert not (tmp_path / "predictions-typo.db").exists()
    assert "3 predictions" in cli("spool", "status", "--spool-dir", str(spool)).stdout  # still there


def test_spool_replay_on_a_spool_it_cannot_write_is_one_line(tmp_path):
    """Its lock file could not be opened (``SpoolDirUnusable``): a traceback."""
    spool, into = tmp_path / "spool", created_database(f"sqlite:///{tmp_path / 'p.db'}")
    leave_spool(spool, database_identity(into))
    (spool / ".lock").mkdir()  # as unusable as a lock file without write permission, and root cannot be refused
    result = cli("spool", "replay", "--spool-dir", str(spool), "--into", into)
    assert result.returncode == 1
    one_error_line(result, f"SPOOL_DIR={spool} is not usable")
