"""``sentiment-analyzer db|keys|feedback|spool ...``: the store's operator commands.

Each reads settings like the server (environment, ``--database-url`` or ``--into`` on top),
prints one clear ERROR line and exits non-zero when it cannot do its job.

``spool`` works on a spool directory (default SPOOL_DIR; a set-aside ``foreign-*`` one with
``--spool-dir``): ``status`` says what it holds and for which database; ``replay`` puts its records into
a database (refused while a server owns the directory: that server replays it itself); ``replay-rejected``
offers the rows the database refused again, after a fix, beside a running server. Without ``--into`` the
database is DATABASE_URL and must be the one the spool records; ``--into URL`` chooses it explicitly.

What a command may do to the database (``_command``): ``db upgrade`` alone migrates on request and creates
a SQLite file that is not there (printing its absolute path). ``keys create`` and ``keys revoke`` write, so they
bring the schema up as a starting server would (SQLite, or DB_AUTO_MIGRATE=true); ``keys create`` also creates a
SQLite file that is not there, but only one DATABASE_URL (or ``--database-url``) names: the built-in default,
``./predictions.db``, is relative to the working directory, and run elsewhere it made a stray empty database
silently. Commands that only read (``keys list``, ``feedback export``, ``db current``) never migrate: a schema
behind this release, or no SQLite file, is one ERROR line saying to run ``sentiment-analyzer db upgrade``.

Failures are one ERROR line and a non-zero exit, never a traceback: standard output that refuses the output (a
closed pipe, a full device: ``output_failed``), an unreadable spool; Ctrl-C exits 130 (``server.cli.main``).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import DatabaseError

from server.config import ConfigError, Settings, load_settings
from server.regular_file import NotRegularFile
from server.store import migrate
from server.store.db import UNAVAILABLE, describe, make_engine, redact, sqlite_path
from server.store.feedback import export_feedback
from server.store.keys import ROLES, KeyStore, one_line
from server.store.rejected import RejectedFile, ReplayUnderWay
from server.store.replay import ReplayReport, replay_rejected, replay_spool
from server.store.sink import DatabaseRefuses, DatabaseSink
from server.store.spooldir import (
    SERVER,
    SpoolDirectory,
    SpoolDirUnusable,
    SpoolLocked,
    database_identity,
    describe_identity,
)
from server.store.state import replay_command
from server.store.wal import GAP_ADVICE, SpoolContents, SpoolGap, read_spool

DEFAULT_DATABASE_URL = Settings.model_fields["database_url"].default


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``db``, ``keys`` and ``feedback`` commands; each sets ``handler(args) -> exit code``."""
    db = _group(subparsers, "db", "database schema migrations")
    _command(db, "upgrade", "apply pending migrations (PostgreSQL: before starting a new release)", db_upgrade,
             creates=ANY_PATH)
    _command(db, "current", "show the schema revision; exit 1 unless it is this release's (or a newer one's)",
             db_current)

    keys = _group(subparsers, "keys", "API keys")
    create = _command(keys, "create", "create a key and print it (the only time it is shown)", keys_create,
                      creates=NAMED_PATH)
    create.add_argument("--name", required=True, help="who or what uses the key")
    create.add_argument("--role", choices=ROLES, default="predict", help="predict (default) or admin")
    _command(keys, "list", "list keys (never the keys themselves)", keys_list)
    revoke = _command(keys, "revoke", "revoke a key; running servers refuse it within KEY_CACHE_TTL_S", keys_revoke)
    revoke.add_argument("id", help="the key id from `keys list`")

    feedback = _group(subparsers, "feedback", "feedback on predictions")
    export = _command(feedback, "export", "write corrected predictions as a training TSV (text, label by its name)",
                      feedback_export)
    export.add_argument("--out", required=True, help="TSV file to write (models/finetune.py --train reads it), "
                        "or - for standard output")

    spool = _group(subparsers, "spool", "the prediction spool (SPOOL_DIR)")
    for name, help_text, handler in (
        ("status", "what a spool holds and which database it belongs to", spool_status),
        ("replay", "replay a spool (e.g. a foreign one set aside at start) into a database", spool_replay),
        ("replay-rejected", "offer the rows the database refused (rejected.jsonl) again, after a fix",
         spool_replay_rejected),
    ):
        parser = spool.add_parser(name, help=help_text)
        parser.add_argument("--spool-dir", default=None, help="the spool directory (default: SPOOL_DIR)")
        if name != "status":
            parser.add_argument("--into", default=None, metavar="URL", help="the database to write to (default: "
                                "DATABASE_URL, which must be the database the spool records)")
        parser.set_defaults(handler=handler)


def _group(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> argparse._SubParsersAction:
    return subparsers.add_parser(name, help=help_text).add_subparsers(dest=f"{name}_command", required=True)


ANY_PATH, NAMED_PATH = "any", "named"  # which missing SQLite file a command creates (module docstring)


def _command(group: argparse._SubParsersAction, name: str, help_text: str,
             run: Callable[[Settings, Engine, argparse.Namespace], int], creates: str | None = None
             ) -> argparse.ArgumentParser:
    """A command on DATABASE_URL; one that does not ``creates`` a database refuses a SQLite file that is not there
    (a mistyped path printed an empty key table, having made the folders and the file); ``NAMED_PATH``: only
    one DATABASE_URL names, not the built-in default."""
    parser = group.add_parser(name, help=help_text)
    parser.add_argument("--database-url", default=None, help="overrides DATABASE_URL")
    parser.set_defaults(handler=lambda args: _run(run, args, creates))
    return parser


def _run(run: Callable[[Settings, Engine, argparse.Namespace], int], args: argparse.Namespace,
         creates: bool) -> int:
    try:
        settings = load_settings(database_url=args.database_url)
        sqlite_file = sqlite_path(settings.database_url)
        if sqlite_file is not None and not sqlite_file.exists():
            if creates is None:
                return _fail(f"no SQLite database at {sqlite_file} (DATABASE_URL={redact(settings.database_url)}): "
                             "check the path; the server creates it at its first start, `sentiment-analyzer db "
                             "upgrade` now")
            # refused only when DATABASE_URL is not set: set, even to the default's spelling, it names the file
            if creates == NAMED_PATH and "database_url" not in settings.model_fields_set:
                return _fail(f"no SQLite database at {sqlite_file.resolve()} (DATABASE_URL is not set: its default "
                             f"{DEFAULT_DATABASE_URL} is relative to the working directory): run the command where "
                             "the server runs, or set DATABASE_URL (a new file is then created)")
            _notice(f"creating a new SQLite database at {sqlite_file.resolve()}")
        engine = make_engine(settings)
    except ConfigError as error:
        return _fail(str(error))
    try:
        return run(settings, engine, args)
    except UNAVAILABLE as error:
        return _fail(f"cannot reach the database {redact(settings.database_url)}: {describe(error)}")
    except DatabaseError as error:  # e.g. a SQLite file that is not a database
        return _fail(f"the database {redact(settings.database_url)} refused the command: {describe(error)}; check "
                     "that DATABASE_URL names this server's prediction database")
    except (migrate.SchemaBehind, ValueError) as error:
        return _fail(str(error))
    finally:
        engine.dispose()


def _fail(message: str) -> int:
    print(f"ERROR {message}", file=sys.stderr)
    return 1


def output_failed(error: OSError, what: str = "the output", then: str = "") -> int:
    """Standard output refused a write (its reader went away: ``| head``; a full device): one ERROR line. Standard
    output then points at /dev/null, so that Python's own flush at exit does not fail a second time with a
    traceback (the advice in Python's ``signal`` documentation)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (a test's capture): nothing to flush at exit
        pass
    if isinstance(error, BrokenPipeError):
        return _fail(f"standard output was closed before {what} was written in full{then}")
    return _fail(f"standard output refused {what} ({error.strerror or error}){then}")


def db_upgrade(settings: Settings, engine: Engine, args: argparse.Namespace) -> int:
    revision = migrate.upgrade(engine)
    print(f"{_named(settings)}: schema at revision {revision} (this release: {migrate.head_revision()})")
    return 0


def _named(settings: Settings) -> str:
    """DATABASE_URL for messages: without its password, a SQLite file by its absolute path."""
    sqlite_file = sqlite_path(settings.database_url)
    return f"sqlite:///{sqlite_file.resolve()}" if sqlite_file is not None else redact(settings.database_url)


def db_current(settings: Settings, engine: Engine, args: argparse.Namespace) -> int:
    current, head = migrate.current_revision(engine), migrate.head_revision()
    newer = current != head and migrate.is_newer(engine, current)  # or raises ForeignSchema: another app's database
    if current == head:
        state = "up to date"
    elif newer:
        state = ("newer than this release (written by a newer server): this release reads and writes it as it is; "
                 "upgrade this installation rather than the database")
    else:
        state = "not this release's: run `sentiment-analyzer db upgrade`"
    print(f"{redact(settings.database_url)}: schema at revision {current or 'none'}, this release needs {head}: "
          f"{state}")
    return 0 if current == head or newer else 1


def keys_create(settings: Settings, engine: Engine, args: argparse.Namespace) -> int:
    migrate.prepare_schema(engine, settings)
    record, key = KeyStore(engine).create(args.name, args.role)
    try:
        print(f"created API key id={record.id} name={record.name!r} role={record.role}")
        _notice("store the key now; it is not kept and cannot be shown again:")
        print(key, flush=True)
    except OSError as error:  # the key exists but nobody saw it: say which one to revoke
        return output_failed(error, "the new key", f": API key id={record.id} was created but not shown; revoke it "
                             f"(`sentiment-analyzer keys revoke {record.id}`) and create another")
    return 0


def _notice(line: str) -> None:
    """A line for the person at the terminal (standard error); its failing is no reason to withhold the output."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # ValueError: standard error closed
        pass


def keys_list(settings: Settings, engine: Engine, args: argparse.Namespace) -> int:
    """Reads only: a schema behind this release is refused (``check_schema``), never migrated."""
    migrate.check_schema(engine)
    try:
        print("id\tname\trole\tcreated_at\tlast_used_at\trevoked_at")
        for key in KeyStore(engine).list():
            row = key.as_dict()
            cells = (str(row[c] or "-") for c in ("id", "name", "role", "created_at", "last_used_at", "revoked_at"))
            print("\t".join(map(one_line, cells)))  # a row a line, whatever older names hold (check_key_name)
        sys.stdout.flush()
    except OSError as error:
        return output_failed(error, "the key list")
    return 0


def keys_revoke(settings: Settings, engine: Engine, args: argparse.Namespace) -> int:
    migrate.prepare_schema(engine, settings)
    asked = datetime.now(UTC)
    revoked = KeyStore(engine).revoke(args.id)
    if revoked is None:
        return _fail(f"no API key with id {args.id!r}; `sentiment-analyzer keys list` shows them")
    when = revoked.revoked_at.isoformat()
    if revoked.revoked_at < asked:  # revoking again keeps the first time (UTC-aware: ``tables.UTCDateTime``)
        print(f"API key id={revoked.id} name={revoked.name!r} was already revoked, at {when}")
    else:
        print(f"revoked API key id={revoked.id} name={revoked.name!r} at {when}")
    return 0


def feedback_export(settings: Settings, engine: Engine, args: argparse.Namespace) -> int:
    """To ``--out`` through a new temporary file beside it (created exclusively: a link planted under its name is
    not followed), synced and renamed over it, so a reader never sees half an export; ``-`` is standard output
    (the summary then goes to standard error). Anything at ``--out`` that is not a regular file is refused:
    renaming over a device or a link would replace it, not write to it. It only reads the database: a schema
    behind this release is refused, not migrated."""
    migrate.check_schema(engine)
    if args.out == "-":
        try:
            written, skipped = export_feedback(engine, sys.stdout)
            sys.stdout.flush()
        except OSError as error:  # `... | head`: the reader went away; a full device
            return output_failed(error, "the export")
        _report_export(written, skipped, "standard output", sys.stderr)
        return 0
    target = Path(args.out)
    partial: str | None = None
    try:
        kind = _not_a_file(args.out)  # OSError too: a name too long
        if kind:
            return _fail(f"--out {args.out} is {kind}: give the path of a file to write (an existing one is "
                         "replaced), or - for standard output")
        descriptor, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name[:100]}.",
                                               suffix=".partial")  # within NAME_MAX whatever --out's length
        with open(descriptor, "w", encoding="utf-8", newline="") as out:
            written, skipped = export_feedback(engine, out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(partial, 0o666 & ~_umask())  # as a new file would be: mkstemp's 0600 hid it from the user who
        # trains on it, and 0644 made user texts readable to all where the operator's umask said otherwise
        os.replace(partial, target)
    except OSError as error:
        if partial is not None:
            Path(partial).unlink(missing_ok=True)
        return _fail(f"cannot write --out {target}: {error.strerror or error} (check the folder exists, is writable "
                     "and has room); nothing was written")
    except BaseException:  # Ctrl-C: no hidden partial file left behind
        if partial is not None:
            Path(partial).unlink(missing_ok=True)
        raise
    _report_export(written, skipped, str(target), sys.stdout)
    return 0


def _not_a_file(out: str) -> str | None:
    """What ``out`` is when it cannot take a file by rename, or None (a new path, or a regular file to replace)."""
    path = Path(out)  # drops a trailing slash: said by ``out`` itself
    if path.is_symlink():
        return "a symbolic link"
    if out.endswith(("/", os.sep)) or path.is_dir():
        return "a directory"
    if path.exists() and not path.is_file():
        return "not a regular file"
    return None


def _report_export(written: int, skipped: int, where: str, stream) -> None:
    note = f" ({skipped} skipped: stored without text, STORE_TEXT=false)" if skipped else ""
    print(f"wrote {written} labeled rows to {where}{note}", file=stream)


def spool_status(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except ConfigError as error:
        return _fail(str(error))
    directory = Path(args.spool_dir) if args.spool_dir else settings.spool_dir
    try:
        if not directory.is_dir():
            return _fail(f"no spool at {directory}")
        spool, contents = SpoolDirectory(directory), read_spool(directory)
        lines = [f"{directory}: {holds(contents)} for {describe_identity(spool.read_identity())}; "
                 f"{RejectedFile(directory).count()} rejected rows in {directory / 'rejected.jsonl'}"]
        lines += missing(contents.gaps)
        for foreign in spool.foreign_spools():
            contents = read_spool(foreign.path)
            lines.append(f"  set aside: {foreign.path}: {holds(contents)} for "
                         f"{describe_identity(foreign.identity)}; replay it there with `{replay_command(foreign.path)}`"
                         ", with that database's URL")
            lines += missing(contents.gaps)
    except OSError as error:  # unreadable (permissions): a segment that vanished meanwhile is counted as empty
        return _unreadable_spool(directory, error)
    try:  # written once all is read: a full or closed standard output is not the spool's fault
        print("\n".join(lines), flush=True)
    except OSError as error:
        return output_failed(error, "the spool's status")
    return 0


def holds(contents: SpoolContents) -> str:
    damaged = contents.damaged
    lines = f", {damaged} damaged line{'' if damaged == 1 else 's'} that {'is' if damaged == 1 else 'are'} not " \
        f"{'a record' if damaged == 1 else 'records'}" if damaged else ""
    lost = sum(gap.lost_bytes for gap in contents.gaps)
    gaps = f", {lost} bytes of acknowledged predictions missing (damage on disk)" if lost else ""
    return f"{contents.records} predictions{lines}{gaps} ({contents.bytes} bytes)"


def missing(gaps: Iterable[SpoolGap]) -> list[str]:
    """A line for each range of acknowledged records missing from the spool, naming the file, the bytes and what
    to do (a replay skips the range: the records are not in it); and for each segment that runs past the next
    one's start (nothing missing: its extra lines are read, then the next segment)."""
    return [f"  overlapping: {gap.describe()}" if gap.overlap_bytes else f"  missing: {gap.describe()}. {GAP_ADVICE}"
            for gap in gaps]


def _unreadable_spool(directory: Path, error: OSError) -> int:
    if isinstance(error, NotRegularFile):  # it names the file and says what to do: no user would read a FIFO
        return _fail(f"cannot read the spool: {error}")
    hint = "; run the command as the server's user" if error.errno in (errno.EACCES, errno.EPERM) else ""
    return _fail(f"cannot read the spool {error.filename or directory}: {error.strerror or error}{hint}")


def spool_replay(args: argparse.Namespace) -> int:
    def run(directory: Path, sink: DatabaseSink) -> ReplayReport:
        report = replay_spool(directory, sink)
        gone = "; the directory was empty and is removed" if report.removed else ""
        records = report.rows - report.damaged
        lines = f"{report.damaged} damaged line{'' if report.damaged == 1 else 's'}"
        damaged = f" and {lines} that {'is not a record' if report.damaged == 1 else 'are not records'}" \
            if report.damaged else ""
        refused = f"{report.rejected - report.damaged} refused" + (f", {lines}" if report.damaged else "")
        print(f"replayed {records} predictions{damaged} from {directory}: {written(report)}, {refused} "
              f"(kept in {directory / 'rejected.jsonl'}){gone}")
        for line in missing(report.gaps):
            print(line)
        return report

    return _spool_command(args, run)


def spool_replay_rejected(args: argparse.Namespace) -> int:
    def run(directory: Path, sink: DatabaseSink) -> ReplayReport:
        report = replay_rejected(directory, sink)
        print(f"offered {report.rows} rejected predictions from {directory} again: {written(report)}, "
              f"{report.rejected} still refused (kept in {directory / 'rejected.jsonl'})")
        return report

    return _spool_command(args, run)


def written(report: ReplayReport) -> str:
    """What a replay wrote, and how many of those rows the database held already (each is there once): a row offered
    again, or repeated in the spool (a record's id sent twice), is not inserted twice."""
    if not report.already:
        return f"{report.written} written"
    return (f"{report.written - report.already} written, {report.already} already in the database or repeated in "
            "the spool")


def _spool_command(args: argparse.Namespace, run: Callable[[Path, DatabaseSink], ReplayReport]) -> int:
    """Settings, the database check (the spool's own unless --into), a sink; one ERROR line on failure."""
    try:
        settings = load_settings(**({"database_url": args.into} if args.into else {}))
        target = database_identity(settings.database_url)
    except ConfigError as error:
        return _fail(str(error))
    directory = Path(args.spool_dir) if args.spool_dir else settings.spool_dir
    if not directory.is_dir():
        return _fail(f"no spool at {directory}")
    try:
        recorded = SpoolDirectory(directory).read_identity()
    except OSError as error:  # database.json unreadable (permissions)
        return _unreadable_spool(directory, error)
    if args.into is None and recorded != target:
        return _fail(f"{directory} holds predictions for {describe_identity(recorded)}, not for DATABASE_URL "
                     f"({describe_identity(target)}): pass --into URL to choose the database to replay them into")
    sqlite_file = sqlite_path(settings.database_url)
    if sqlite_file is not None and not sqlite_file.exists():  # connecting would create it, and a typo hide the rows
        return _fail(f"no SQLite database at {sqlite_file.resolve()}: a replay writes into an existing database; "
                     "check the path, or create the database first (`sentiment-analyzer db upgrade --database-url "
                     "URL`); the spool is untouched")
    engine = make_engine(settings)
    try:
        run(directory, DatabaseSink(engine, settings, RejectedFile(directory), count_already=True))
        return 0
    except SpoolLocked as error:
        return _fail(f"{error}{'; that server replays the spool itself' if error.holder == SERVER else ''}")
    except (ReplayUnderWay, SpoolDirUnusable) as error:
        return _fail(str(error))
    except UNAVAILABLE as error:
        return _fail(f"cannot reach the database {redact(settings.database_url)}: {describe(error)}")
    except DatabaseRefuses as error:
        return _fail(f"{error}; nothing was lost: fix the database and run the command again")
    except migrate.SchemaBehind as error:
        return _fail(str(error))
    except NotRegularFile as error:
        return _fail(f"{error}; nothing was lost: run the command again once it is gone")
    except OSError as error:  # the spool's disk (full, unreadable): what is not written yet stays where it was
        return _fail(f"{error}; nothing was lost: fix the spool's disk and run the command again")
    finally:
        engine.dispose()


def _umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
