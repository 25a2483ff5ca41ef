"""`sentiment-analyzer doctor`: the runbook's "application won't start" checks, each with a fix.

The checks are start-up's own (``server.preflight``), so doctor says ok exactly when ``serve`` would start:
every setting and how they fit together, writable paths (a probe file really created and removed), the
database (doctor also connects to it), the port, the device, and the model really loaded with its smoke
predictions run. Unlike start-up, doctor runs every check and never stops at the first failure; a check
that depends on one that failed (the model on the device) is skipped. It never raises: anything a check
did not foresee is reported as that check's failure.

Three refusals ``serve`` meets only once the app opens the store are checked here with the store's own code,
inside the checks they belong with (the list of checks stays the runbook's): the disk check also reads SPOOL_DIR's
``database.json`` (``SpoolDirectory.read_identity``: a FIFO or device there, or a file that cannot be read, is
serve's ``SpoolDirUnusable``, and its line), the database check also reads the schema revision
(``migrate.check_schema``: behind on a database a server does not migrate at start is ``SchemaBehind``; nothing is
migrated), and the port check also tests SPOOL_DIR's lock (``SpoolDirectory.check_unlocked``: held by another
server or a `spool replay` is ``SpoolLocked``). The last two say whether another process already runs as this
server: beside a running server the port line names both, and the other lines stay ok (the runbook's "the port
check fails in a running container").

One failure ``serve`` does not refuse but starts degraded with: on PostgreSQL with DB_AUTO_MIGRATE=true, a
schema behind that the server's role may not upgrade (no CREATE on the schema, PostgreSQL 15+'s default for a role
that does not own the database), so the store never gets its tables. The database check rehearses that upgrade
(``migrate.rehearse_upgrade``: the same lock and migrations, rolled back, the database left as it was) and
fails with the database's own error (``UpgradeRefused``). SQLite is not rehearsed: its driver commits DDL as it
goes, and the files check already probes that its file is writable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from server.config import ConfigError, Settings, load_settings
from server.engine import first_line
from server.exitcodes import ExitCode, StartupError
from server.preflight import (
    DOCTOR_CHECKS,
    Check,
    SqliteUnusable,
    check_database_reachable,
    check_paths,
    check_port,
    check_sqlite_files,
    run_check,
)
from server.regular_file import NotRegularFile

if TYPE_CHECKING:
    from sqlalchemy import Engine

SCHEMA_FIX = ("run `sentiment-analyzer db upgrade` with this DATABASE_URL before starting this release (or start "
              "with DB_AUTO_MIGRATE=true)")
UPGRADE_FIX = ("run `sentiment-analyzer db upgrade` as a role that may create tables in the database (its owner), or "
               "grant this role USAGE and CREATE on the schema; a lock or statement timeout instead means another "
               "upgrade (a server starting, `db upgrade`) held the schema's lock: run doctor again once it is done")
SPOOL_DIR_FIX = "give the server's user read and write access to SPOOL_DIR and its files, or point SPOOL_DIR elsewhere"
SPOOL_FILE_FIX = "remove the file named above, or point SPOOL_DIR at a directory of the server's own"
SQLITE_FIX = ("check that the SQLite file and the -wal and -shm files beside it, where they exist, are regular files "
              "the server's user can read and write (remove a FIFO or link loop planted under their names; never a "
              "device under /dev), or point "
              "DATABASE_URL at a new path (the server creates the database)")
SPOOL_FIX = "stop the process named above (or wait for its replay to end), or give this server its own SPOOL_DIR"


class UpgradeRefused(StartupError):
    """The upgrade a server runs at start fails as its role: it would start with its store down."""

    exit_code = ExitCode.DATABASE


def running_server_lost_its_file(sqlite_file: Path, settings: Settings) -> None:
    """``SqliteUnusable`` when a server runs on SPOOL_DIR for this very SQLite file (its ``database.json``) while the
    file is missing: removed under it (its records wait in the spool, ``server.store.sqlite_file``), not a database
    yet to be made by a first start. A server on SPOOL_DIR for another database is the port check's to name."""
    from server.store.spooldir import SERVER, SpoolDirectory, SpoolDirUnusable, SpoolLocked, database_identity

    spool = SpoolDirectory(settings.spool_dir)
    try:
        spool.check_unlocked()
    except SpoolLocked as locked:
        if locked.holder == SERVER and spool.read_identity() == database_identity(settings.database_url):
            raise SqliteUnusable(f"no SQLite database at {sqlite_file.resolve()}, but a server is running on "
                                 f"SPOOL_DIR={settings.spool_dir}: the file was removed under it; put it back (the "
                                 "server's records wait in the spool until then), or restart the server to begin a "
                                 "new database") from None
    except (SpoolDirUnusable, OSError):
        return  # the disk check says why


def check_database_and_schema(settings: Settings) -> str:
    """Reachable (start-up's check), then the schema as the store checks it at start, read-only. A SQLite file that
    is not there yet is not opened: connecting creates it and its folders, which `keys create` (refusing to make a
    stray ``./predictions.db``) would then take for the server's database."""
    from server.store import migrate
    from server.store.db import make_engine, redact, sqlite_path

    sqlite_file = sqlite_path(settings.database_url)  # None for a URL that is refused: the next check says why
    if sqlite_file is not None:
        check_sqlite_files(sqlite_file)  # first: a link loop does not exist, and resolving it raised RuntimeError
        if not sqlite_file.exists():
            running_server_lost_its_file(sqlite_file, settings)
            return f"no SQLite database at {sqlite_file.resolve()} yet: the server creates it at its first start"
    reachable = check_database_reachable(settings)
    engine = make_engine(settings)
    try:
        if migrate.migrates_at_start(engine, settings):
            current = migrate.current_revision(engine)
            if current != migrate.head_revision() and not migrate.is_newer(engine, current):
                return f"{reachable}; {upgrade_at_start(engine, current, redact(settings.database_url))}"
        return f"{reachable}; schema at revision {migrate.check_schema(engine)}"
    finally:
        engine.dispose()


def upgrade_at_start(engine: Engine, current: str | None, where: str) -> str:
    """A schema behind that the server upgrades when it starts: on PostgreSQL that upgrade is rehearsed and rolled
    back (module docstring), since a role that may not create tables lets the server start with its store down."""
    from sqlalchemy.exc import SQLAlchemyError

    from server.store import migrate
    from server.store.db import describe

    head = migrate.head_revision()
    said = f"schema at revision {current or 'none'}, brought to this release's ({head}) when the server starts"
    if engine.dialect.name != "postgresql":
        return f"{said} (SQLite)"
    try:
        migrate.rehearse_upgrade(engine)
    except SQLAlchemyError as error:
        raise UpgradeRefused(
            f"{where}: schema at revision {current or 'none'} and DB_AUTO_MIGRATE=true, but the server's upgrade to "
            f"this release's ({head}) fails as this role (rehearsed here and rolled back): {describe(error)}; the "
            "server would start with its store down") from None
    return f"{said} (DB_AUTO_MIGRATE=true; its upgrade rehearsed here and rolled back)"


def check_port_and_spool(settings: Settings) -> str:
    """PORT (start-up's check) and SPOOL_DIR's lock: another server here holds both; a replay holds the lock."""
    from server.store.spooldir import SpoolDirectory

    spool = SpoolDirectory(settings.spool_dir)
    try:
        free = check_port(settings)
    except StartupError as port_taken:
        try:
            spool.check_unlocked()
        except StartupError as spool_refused:  # SpoolLocked, SpoolDirUnusable
            raise StartupError(f"{port_taken}; and {spool_refused}", port_taken.exit_code) from None
        raise
    spool.check_unlocked()
    return f"{free}; SPOOL_DIR {settings.spool_dir} is held by no other process"


def check_paths_and_spool_identity(settings: Settings) -> str:
    """The writable paths (start-up's check), then SPOOL_DIR's ``database.json`` read as the store reads it when it
    opens: a FIFO there stopped serve (``NotRegularFile``) while doctor said ok. Creates nothing."""
    from server.store.spooldir import SpoolDirectory

    checked = check_paths(settings)
    spool = SpoolDirectory(settings.spool_dir)
    try:
        spool.read_identity()
    except OSError as error:
        raise spool.cannot_use(error) from error
    return checked


EXTENDED = {"disk": check_paths_and_spool_identity, "database": check_database_and_schema,
            "port": check_port_and_spool}
CHECKS = [replace(check, run=EXTENDED.get(check.name, check.run)) for check in DOCTOR_CHECKS]


def fix_for(check: Check, error: StartupError) -> str:
    """The check's general remedy, or the failure's own: one the failure carries (``StartupError.fix``: the memory
    plan's and a model variant's, which the model check meets with an artifact that is fine, so never "rebuild the
    model"), those the store finds (module docstring), and a SQLite file's, which is no server to reach
    (`pg_isready`)."""
    from server.store.migrate import SchemaBehind
    from server.store.spooldir import SpoolDirUnusable, SpoolLocked

    if error.fix:
        return error.fix
    if isinstance(error, SchemaBehind):
        return SCHEMA_FIX
    if isinstance(error, UpgradeRefused):
        return UPGRADE_FIX
    if isinstance(error, SqliteUnusable):
        return SQLITE_FIX
    if isinstance(error, SpoolDirUnusable):
        return SPOOL_FILE_FIX if isinstance(error.__cause__, NotRegularFile) else SPOOL_DIR_FIX
    return SPOOL_FIX if isinstance(error, SpoolLocked) else check.fix


def run_doctor(overrides: dict[str, object] | None = None, print_fn: Callable[[str], None] = print) -> int:
    """Print one line per check (and its fix); 0 when all pass, 1 otherwise."""
    try:
        settings = load_settings(**(overrides or {}))
    except ConfigError as exc:
        print_fn(f"[FAIL] configuration: {exc}")
        print_fn("       fix: correct the variable named above (see the README's configuration table)")
        return 1
    except Exception as exc:  # doctor must answer whatever the environment holds
        print_fn(f"[FAIL] configuration: {first_line(exc)}")
        return 1
    failed: set[str] = set()
    for check in CHECKS:
        if check.needs in failed:
            print_fn(f"[skip] {check.name}: not checked, since the {check.needs} check failed")
            failed.add(check.name)
            continue
        try:
            detail = run_check(check, settings)
        except StartupError as exc:
            failed.add(check.name)
            print_fn(f"[FAIL] {check.name}: {exc}")
            print_fn(f"       fix: {fix_for(check, exc)}")
        else:
            print_fn(f"[ok  ] {check.name}: {detail}")
    return 1 if failed else 0
