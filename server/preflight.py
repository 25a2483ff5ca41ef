"""Everything that can be checked before the server listens, in one place, for start-up and for ``doctor``.

Each check returns one line saying what it verified, or raises ``StartupError``: one line naming what is
wrong and how to fix it, and the exit code of its kind (``server.exitcodes``). Start-up (``preflight``)
stops at the first failure, logs its line at ERROR, without a traceback, and exits with its code;
``sentiment-analyzer doctor`` (``server.doctor``) runs every check and prints each.

Order: configuration (values that must fit together, ``server.config.check_relationships``) -> open files
(MAX_CONNECTIONS within the process's file limit, the soft limit raised when it is the one short) -> writable
paths (LOG_FILE, SPOOL_DIR, the SQLite file: the nearest existing folder must be a directory in which a
probe file can really be created and removed) -> DATABASE_URL (parseable, sqlite or postgresql) -> ports
(PORT, and GRPC_PORT when gRPC is on) -> device; then the model (manifest schema and sha256, MODEL_VARIANT
shipped, tokenizer loaded, ONNX session created, smoke predictions run, memory plan: ``load_model``).

Whether the database answers is not a start-up condition (predictions are served and records spooled while
it is down); only ``doctor`` connects to it.

The model is loaded once at start-up: by the app's lifespan (``server.app.build_services``), which runs before
the port opens, through ``load_model``, so its failures are the same one line and exit code as every check here
(``server.lifecycle.run_server`` logs them). ``preflight`` runs the checks before it, the cheap ones; ``doctor``
runs ``check_model``, the same load, itself. Loading the model here as well, to check it, cost a second load,
memory probe and smoke prediction: with the default model on 2 cores, 6.2 s of CPU time to /ready instead of 4.7,
and 16 MiB more peak memory (medians of 5 runs each).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from server.cgroup import cpu_quota_cores
from server.config import ConfigError, Settings, check_relationships
from server.engine import cpu_oversubscription, first_line
from server.exitcodes import ExitCode, StartupError
from server.idle_spin import refusal as idle_spin_refusal
from server.regular_file import NotRegularFile, open_regular, process_descriptor

if TYPE_CHECKING:
    from server.engine import Engine
    from server.metrics import Metrics
    from server.runtime import ModelRuntime

log = logging.getLogger("server.cli")


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Settings], str]
    fix: str  # the general remedy doctor prints under a failure (the failure's own line is specific)
    needs: str | None = None  # doctor skips this check when the named one failed (it would fail the same way)


def check_configuration(settings: Settings) -> str:
    try:
        check_relationships(settings)
    except ConfigError as exc:
        raise StartupError(str(exc), ExitCode.CONFIG) from None
    spin_refused = idle_spin_refusal(settings.idle_spin_ms, cpu_quota_cores())
    if spin_refused:
        raise StartupError(f"invalid configuration: {spin_refused}", ExitCode.CONFIG)
    oversubscribed = cpu_oversubscription(settings)
    if oversubscribed:
        log.warning("%s", oversubscribed)
        return f"every value is valid and they fit together (warning: {oversubscribed})"
    return "every value is valid and they fit together"


FILES_BESIDE_CONNECTIONS = 128  # the database pool, spool segments, log, model files, gRPC, the event loop's own


def check_open_files(settings: Settings) -> str:
    """MAX_CONNECTIONS open connections (on each of the HTTP and gRPC ports) need as many file descriptors, plus
    those refused above it while they linger (``server.connections.REFUSED_LINGERING_MAX``) and the server's own:
    the soft limit is
    raised toward the hard one when it is lower (as nginx's worker_rlimit_nofile does; container runtimes often
    set a soft 1024 below a high hard limit); a hard limit too low stops start-up. Past the limit ``accept`` fails
    with EMFILE before the connection bound can answer 503, and the spool or the database pool can fail with it."""
    import resource

    from server.connections import REFUSED_LINGERING_MAX

    listeners = 2 if settings.grpc_port else 1  # the gRPC port takes up to MAX_CONNECTIONS of its own
    beside = REFUSED_LINGERING_MAX + FILES_BESIDE_CONNECTIONS
    needed = listeners * settings.max_connections + beside
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise StartupError(
                f"MAX_CONNECTIONS={settings.max_connections} needs about {needed} open files"
                f"{' (HTTP and gRPC each)' if listeners > 1 else ''}, and this process may open at most {hard} "
                f"(ulimit -Hn); lower MAX_CONNECTIONS to {max(1, (hard - beside) // listeners)} or "
                "less, or raise the limit (docker run --ulimit nofile=N:N, LimitNOFILE= in systemd)",
                ExitCode.CONFIG)
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        return f"open files: soft limit raised from {soft} to {needed} for MAX_CONNECTIONS={settings.max_connections}"
    return f"open files: limit {soft} holds MAX_CONNECTIONS={settings.max_connections}"


def check_paths(settings: Settings) -> str:
    from server.store.db import sqlite_path

    checked = [writable_directory(Path(settings.spool_dir), "SPOOL_DIR")]
    room_for_a_new_spool(Path(settings.spool_dir))
    short = spool_space_shortfall(settings)
    if short:
        log.warning("%s", short)
        checked[0] += f" (warning: {short})"
    if settings.log_file is not None:
        checked.append(writable_file(settings.log_file, "LOG_FILE"))
    sqlite_file = sqlite_path(settings.database_url)
    if sqlite_file is not None:
        checked.append(writable_file(sqlite_file, "DATABASE_URL", "SQLite file"))
    return "writable (a probe file created and removed): " + ", ".join(checked)


def check_log_file(settings: Settings) -> str:
    """LOG_FILE alone: checked before logging is configured, since configuring it opens the file."""
    return writable_file(settings.log_file, "LOG_FILE") if settings.log_file is not None else "no LOG_FILE"


class SqliteUnusable(StartupError):
    """The SQLite file DATABASE_URL names, or a file SQLite keeps beside it, is unusable: a local file to fix, not
    a database server to reach (doctor's fix says so)."""

    exit_code = ExitCode.DATABASE


SQLITE_COMPANIONS = ("-wal", "-shm")  # kept beside the database file in WAL mode (``server.store.db``)


def check_sqlite_files(path: Path) -> None:
    """The SQLite file and its -wal and -shm companions, each that exists, open for reading and writing as regular
    files, else ``SqliteUnusable`` naming the one at fault: SQLite names none (a FIFO as -shm is its "disk I/O
    error"), and resolving a link loop as the file raised a RuntimeError."""
    for file in [path, *(path.with_name(path.name + suffix) for suffix in SQLITE_COMPANIONS)]:
        try:
            os.close(open_regular(file, os.O_RDWR))
        except NotRegularFile as exc:
            raise SqliteUnusable(f"SQLite file {exc}") from None
        except FileNotFoundError:  # not made yet: SQLite makes it
            continue
        except OSError as exc:
            raise SqliteUnusable(f"SQLite file {file} cannot be opened for reading and writing ({exc.strerror})") \
                from None


def check_database_url(settings: Settings) -> str:
    from server.store.db import database_url, redact

    try:
        url = database_url(settings.database_url)
    except ConfigError as exc:  # a URL to correct: no server to check (doctor's general fix would say pg_isready)
        raise StartupError(str(exc), ExitCode.DATABASE, fix="correct DATABASE_URL as the line above says") from None
    try:
        url.get_dialect().import_dbapi()
    except Exception as exc:  # NoSuchModuleError for an unknown driver, ImportError for one not installed
        raise StartupError(f"DATABASE_URL={redact(settings.database_url)!r}: driver {url.drivername!r} unusable "
                           f"({first_line(exc)}); install it (pip install '.[postgres]' for PostgreSQL) or use "
                           "postgresql:// (psycopg 3)", ExitCode.DATABASE) from None
    not_sqlite = sqlite_file_problem(settings.database_url)
    if not_sqlite:
        raise SqliteUnusable(f"DATABASE_URL={redact(settings.database_url)!r}: {not_sqlite}; point it at this server's "
                             "database file, or at a new path (the server creates it)")
    return f"DATABASE_URL {redact(settings.database_url)} ({url.get_backend_name()})"


def sqlite_file_problem(raw_url: str) -> str | None:
    """What is wrong with an existing SQLite file the URL names, or None. Unlike a database server that is down (the
    server starts, spooling), a local file that is not a database never comes up: the server ran "store down" for
    ever, spooling and retrying every 2 s. A locked or busy file is not a problem here."""
    import sqlite3

    from server.store.db import sqlite_path

    path = sqlite_path(raw_url)
    if path is None or not path.exists():
        return None
    if not path.is_file():
        return f"{path} is not a file"
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=1)
        try:
            connection.execute("PRAGMA schema_version").fetchone()
        finally:
            connection.close()
    except sqlite3.OperationalError:  # locked, busy, unreadable: the store says so when it opens it
        return None
    except sqlite3.DatabaseError as exc:
        return f"{path} is not a SQLite database ({exc})"
    return None


def check_database_reachable(settings: Settings) -> str:
    """Connects: a PostgreSQL server that does not answer is a ``StartupError``, a SQLite file that cannot be opened
    a ``SqliteUnusable`` (a file to fix, not a server)."""
    from sqlalchemy import text

    from server.store.db import make_engine, redact, sqlite_path

    check_database_url(settings)
    try:
        engine = make_engine(settings)
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        finally:
            engine.dispose()
    except Exception as exc:  # any driver error means "not reachable" here
        problem = f"{redact(settings.database_url)}: {first_line(exc)}"
        if sqlite_path(settings.database_url) is not None:
            raise SqliteUnusable(problem) from None
        raise StartupError(problem, ExitCode.DATABASE) from None
    return f"{redact(settings.database_url)} reachable"


HOST_FIX = "set HOST to an address of this machine (0.0.0.0 for every IPv4 interface, :: for IPv6)"


def check_port(settings: Settings) -> str:
    """PORT, and GRPC_PORT when gRPC is on: each must be free on HOST (and HOST an address of this machine)."""
    problem = port_problem(settings.host, settings.port)
    if problem:
        fix = {"in_use": "stop the other process or set PORT to a free port",
               "denied": "set PORT to a port this process may bind (1024 or above)"}.get(problem.kind, HOST_FIX)
        raise StartupError(f"{problem}; {fix}", ExitCode.PORT, fix=fix)
    if not settings.grpc_port:
        return f"{settings.host}:{settings.port} is free"
    problem = port_problem(settings.host, settings.grpc_port)
    if problem:
        fix = {"in_use": "stop the other process, set GRPC_PORT to a free port, or 0 to turn gRPC off",
               "denied": "set GRPC_PORT to a port this process may bind (1024 or above), or 0 to turn gRPC off"
               }.get(problem.kind, HOST_FIX)
        raise StartupError(f"GRPC_PORT: {problem}; {fix}", ExitCode.PORT, fix=fix)
    return f"{settings.host}:{settings.port} (PORT) and {settings.host}:{settings.grpc_port} (GRPC_PORT) are free"


def check_device(settings: Settings) -> str:
    from server.engine import EngineStartError, resolve_device

    try:
        device = resolve_device(settings)
    except EngineStartError as exc:
        raise StartupError(str(exc), ExitCode.DEVICE) from None
    return f"DEVICE={settings.device} -> {device}"


def check_model(settings: Settings) -> str:
    """The real load the server does (``load_model``), without the warm-up: doctor's model check."""
    from server.metrics import Metrics

    started = time.monotonic()
    runtime = load_model(settings, Metrics(), warm=False)
    identity, artifact = runtime.identity, runtime.artifact
    return (f"{identity.name} {identity.version} ({identity.variant} on {identity.provider}) from "
            f"{artifact.directory}: sha256 verified, smoke predictions ok ({time.monotonic() - started:.2f} s)")


def load_model(settings: Settings, metrics: Metrics, warm: bool,
               wrap_engine: Callable[[Engine], Engine] | None = None) -> ModelRuntime:
    """Files and manifest, variant, tokenizer, ONNX session, smoke predictions, memory plan, and the warm-up
    (``warm``): ``server.runtime.load_checked``, its failures a ``StartupError`` with their exit code."""
    from server.artifact import ArtifactError, VariantNotShipped
    from server.engine import EngineStartError, ModelFileError
    from server.runtime import load_checked

    try:
        return load_checked(settings, metrics, warm=warm, wrap_engine=wrap_engine)
    except VariantNotShipped as exc:  # a setting, not a broken artifact
        raise StartupError(str(exc), ExitCode.CONFIG, fix="set MODEL_VARIANT to one of the variants listed above "
                           "or auto, or point MODEL_PATH at an artifact that ships it") from None
    except (ArtifactError, ModelFileError) as exc:
        raise StartupError(str(exc), ExitCode.MODEL) from None
    except EngineStartError as exc:
        raise StartupError(str(exc), ExitCode.DEVICE) from None


CONFIGURATION = Check("configuration", check_configuration, "correct the variables named above (README, Configuration)")
FILES = Check("files", check_open_files, "lower MAX_CONNECTIONS or raise the process's open-file limit")
PATHS = Check("disk", check_paths, "point the variable at a writable place, or fix the folder's owner and mode")
PORT = Check("port", check_port, "stop the process holding it (`ss -ltnp | grep :PORT`) or set the variable to a "
             "free port")
DEVICE = Check("device", check_device, "install onnxruntime-gpu (pip install '.[gpu]') and check `nvidia-smi`, "
               "or set DEVICE=auto")
MODEL = Check("model", check_model, "restore the artifact (git checkout models/default), point MODEL_PATH at a valid "
              "one, or rebuild it with `make model`", needs="device")
STARTUP_CHECKS = [CONFIGURATION, FILES, PATHS,  # the model is the app's load (module docstring)
                  Check("database", check_database_url, "use sqlite:///path/file.db or postgresql://user@host/db"),
                  PORT, DEVICE]
DOCTOR_CHECKS = [CONFIGURATION, FILES, PATHS,
                 Check("database", check_database_reachable, "check the server (`pg_isready -h HOST`), credentials "
                       "and DATABASE_URL; predictions are still served while it is down (records spool to SPOOL_DIR)"),
                 PORT, DEVICE, MODEL]


def run_check(check: Check, settings: Settings) -> str:
    """``check.run``, with anything unforeseen turned into a ``StartupError`` line rather than a traceback."""
    try:
        return check.run(settings)
    except StartupError:
        raise
    except Exception as exc:
        raise StartupError(f"{check.name} check failed unexpectedly: {first_line(exc)}", ExitCode.RUNTIME) from exc


def preflight(settings: Settings) -> int:
    """Configure logging, then run the start-up checks: 0 when they pass, else the exit code of the first failure
    (already logged as one line). The model is checked by its one load, the app's (module docstring)."""
    from server.logging_setup import configure_logging

    try:
        check_log_file(settings)
        configure_logging(settings)
    except (StartupError, OSError) as exc:
        configure_logging(settings.model_copy(update={"log_file": None}))
        problem = exc if isinstance(exc, StartupError) else StartupError(
            f"LOG_FILE={settings.log_file}: {first_line(exc)}", ExitCode.FILESYSTEM)
        log.error("cannot start: %s", problem)
        return problem.exit_code
    for check in STARTUP_CHECKS:
        try:
            run_check(check, settings)
        except StartupError as exc:
            log.error("cannot start: %s", exc)
            return exc.exit_code
    return ExitCode.OK


# --- helpers ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PortProblem:
    """Why ``host:port`` cannot be bound; ``kind``: another process holds the port (``in_use``), this process may
    not bind it (``denied``: a port below the unprivileged range, run as non-root), or HOST is the problem."""

    message: str
    kind: Literal["in_use", "denied", "host"] = "host"

    def __str__(self) -> str:
        return self.message


def port_problem(host: str, port: int) -> PortProblem | None:
    """Why the server could not bind ``host:port``, or None when it could."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:  # socket.gaierror too: a HOST that does not resolve
            if exc.errno == errno.EADDRINUSE:
                return PortProblem(f"port {port} is already in use on {host}", "in_use")
            if exc.errno == errno.EACCES:  # HOST is fine: the advice to change it was wrong (red team helper-85)
                return PortProblem(f"this process may not bind port {port} on {host} ({exc.strerror}: ports below "
                                   "1024, or below net.ipv4.ip_unprivileged_port_start, need root or "
                                   "CAP_NET_BIND_SERVICE)", "denied")
            return PortProblem(f"cannot bind {host}:{port}: {exc.strerror}")
    return None


def nearest_existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists (what a folder not yet created will live in)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_directory(directory: Path, variable: str, label: str | None = None) -> str:
    """``directory`` exists as a directory, or can be created: its nearest existing ancestor is a directory in
    which a file can be created (a probe file is created and removed; nothing else is left behind).
    ``label`` names the path in messages when it is not the variable's value itself (the SQLite file)."""
    label = label or variable
    existing = nearest_existing(directory)
    if not existing.is_dir():
        where = "is a file" if existing == directory else f"cannot be created: {existing} is a file"
        raise StartupError(f"{label} {directory} {where}, not a directory; change {variable} or move that file",
                           ExitCode.FILESYSTEM)
    try:
        handle, probe = tempfile.mkstemp(prefix=".sentiment-analyzer-probe-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise StartupError(f"{label} {directory}: cannot create a file in {existing} ({exc.strerror}); fix its "
                           f"permissions or change {variable}", ExitCode.FILESYSTEM) from None
    return f"{label} {directory}"


NEW_SPOOL_BYTES = 8192  # what a new spool writes before its first record (database.json, the lock), with room


def room_for_a_new_spool(directory: Path) -> None:
    """A SPOOL_DIR not used yet must write its identity file (``database.json``) before the store can start: on a
    full volume that failed once the model had loaded (exit 8), while the empty probe file of
    ``writable_directory`` and ``doctor`` said ok (red team helper-67). Some bytes are written and synced here,
    in a file without a name. A spool already in use needs none to start: it must start on a full volume, to
    replay its records and so free it."""
    from server.store.spooldir import IDENTITY_FILE

    if (directory / IDENTITY_FILE).exists():
        return
    existing = nearest_existing(directory)
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".sentiment-analyzer-probe-") as probe:
            probe.write(bytes(NEW_SPOOL_BYTES))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        free = shutil.disk_usage(existing).free
        raise StartupError(f"SPOOL_DIR {directory} is new, and {existing} has no room to set it up ({exc.strerror}; "
                           f"{free} bytes free): free space on its volume or give SPOOL_DIR another one",
                           ExitCode.FILESYSTEM) from None


SPOOL_REFUSAL = '503 "store_unavailable" (counted as sentiment_rejected_requests_total{reason="spool_full"})'


def spool_space_shortfall(settings: Settings) -> str | None:
    """What to change when SPOOL_DIR's volume is (nearly) full, or cannot hold SPOOL_MAX_BYTES of spool (the free
    space plus what the spool holds already); None when neither. A warning, not a refusal: the disk's free space
    changes, a full disk refuses records (``SPOOL_REFUSAL``) and loses none, as a full spool does, and a server
    must start on a full spool volume to replay its spool and so free it. The operator learns at start-up that
    requests are refused now, and that the cap in force is the disk's, not the setting's.

    Nearly full: less free space than one request's records may take (``2 x MAX_REQUEST_BYTES``: its texts and
    about 800 bytes a text beside them). A red team's volume with 32 KiB free, above the 16 KiB first taken as
    full, refused 10 of 30 requests of ~2,000 characters while only the cap was warned of."""
    directory, max_bytes = Path(settings.spool_dir), settings.spool_max_bytes
    held = 0
    for path in directory.rglob("*") if directory.is_dir() else ():
        try:
            held += path.stat().st_size if path.is_file() else 0
        except OSError:  # gone meanwhile: it holds nothing
            pass
    free = shutil.disk_usage(nearest_existing(directory)).free
    problems = []
    refused = (f"predictions whose records do not fit are refused with {SPOOL_REFUSAL}"
               if settings.store_durability == "ack" else
               "records that do not fit wait in memory and past its bound are lost")
    if free < 2 * settings.max_request_bytes:
        what = refused if settings.store_durability == "ack" else f"while the database is down, {refused}"
        problems.append(f"SPOOL_DIR {directory}'s volume is full or nearly ({free} bytes free, less than one "
                        f"request's records may take: 2 x MAX_REQUEST_BYTES): {what} until space is freed there; free "
                        "space on that volume or give SPOOL_DIR a larger one")
    room = free + held
    if room < max_bytes:
        problems.append(f"SPOOL_MAX_BYTES={max_bytes} is more than SPOOL_DIR {directory}'s volume can hold ({room} "
                        f"bytes: free space plus the spool's {held}); while the database is down the disk fills "
                        f"first, and then {refused}; free space on that volume, give SPOOL_DIR a larger one, or "
                        "lower SPOOL_MAX_BYTES")
    return "; ".join(problems) or None


def writable_file(path: Path, variable: str, label: str | None = None) -> str:
    """``path`` can be opened for appending: not a directory, in a writable directory (for rotation, SQLite's
    journal) and, when it exists, a writable regular file: a FIFO's open waited for a reader for ever
    (``server.regular_file``), so serve and doctor hung on a FIFO as LOG_FILE or as the SQLite file; a link
    looping on itself is refused here too, not by the first write."""
    label = label or variable
    unset = " (or unset it: the log goes to standard output)" if variable == "LOG_FILE" else ""
    if path.is_dir():
        raise StartupError(f"{label} {path} is a directory; {variable} must name a file", ExitCode.FILESYSTEM)
    descriptor = process_descriptor(path)
    if descriptor is not None:
        raise StartupError(f"{label} {path} is {descriptor}, a process's open file (standard output or another), not a "
                           f"file of its own: point {variable} at a regular file{unset}", ExitCode.FILESYSTEM)
    writable_directory(path.parent, variable, f"{label}'s folder")
    if os.path.lexists(path):
        try:
            os.close(open_regular(path, os.O_WRONLY | os.O_APPEND))
        except NotRegularFile as exc:
            if not exc.system:
                raise StartupError(f"{label} {exc}, or change {variable}", ExitCode.FILESYSTEM) from None
            raise StartupError(f"{label} {path} is {exc.kind}, a system file, not a regular one: point {variable} at "
                               f"a regular file{unset}", ExitCode.FILESYSTEM) from None
        except FileNotFoundError:  # a link to a file yet to be made: opening it for appending makes that file
            pass
        except OSError as exc:
            remedy = "remove the link" if exc.errno == errno.ELOOP else "fix its permissions"  # no mode mends a loop
            raise StartupError(f"{label} {path} is not writable ({exc.strerror}); {remedy} or change {variable}",
                               ExitCode.FILESYSTEM) from None
    return f"{label} {path}"
