"""``sentiment-analyzer db|keys|feedback ...``: the store's operator commands.

Each reads settings like the server (environment, ``--database-url`` on top),
prints one clear ERROR line and exits non-zero when it cannot do its job.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from sqlalchemy import Engine

from server.config import ConfigError, Settings, load_settings
from server.store import migrate
from server.store.db import UNAVAILABLE, describe, make_engine, redact
from server.store.feedback import export_feedback
from server.store.keys import ROLES, KeyStore


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``db``, ``keys`` and ``feedback`` commands; each sets ``handler(args) -> exit code``."""
    db = _group(subparsers, "db", "database schema migrations")
    _command(db, "upgrade", "apply pending migrations (PostgreSQL: before starting a new release)", db_upgrade)
    _command(db, "current", "show the schema revision; exit 1 unless it is this release's", db_current)

    keys = _group(subparsers, "keys", "API keys")
    create = _command(keys, "create", "create a key and print it (the only time it is shown)", keys_create)
    create.add_argument("--name", required=True, help="who or what uses the key")
    create.add_argument("--role", choices=ROLES, default="predict", help="predict (default) or admin")
    _command(keys, "list", "list keys (never the keys themselves)", keys_list)
    revoke = _command(keys, "revoke", "revoke a key, effective at once", keys_revoke)
    revoke.add_argument("id", help="the key id from `keys list`")

    feedback = _group(subparsers, "feedback", "feedback on predictions")
    export = _command(feedback, "export", "write corrected predictions as a training TSV (text, label 1=POSITIVE)",
                      feedback_export)
    export.add_argument("--out", required=True, help="TSV file to write (models/finetune.py --train reads it)")


def _group(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> argparse._SubParsersAction:
    return subparsers.add_parser(name, help=help_text).add_subparsers(dest=f"{name}_command", required=True)


def _command(group: argparse._SubParsersAction, name: str, help_text: str,
             run: Callable[[Settings, Engine, argparse.Namespace], int]) -> argparse.ArgumentParser:
    parser = group.add_parser(name, help=help_text)
    parser.add_argument("--database-url", default=None, help="overrides DATABASE_URL")
    parser.set_defaults(handler=lambda args: _run(run, args))
    return parser


def _run(run: Callable[[Settings, Engine, argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        settings = load_settings(database_url=args.database_url)
        engine = make_engine(settings)
    except ConfigError as error:
        return _fail(str(error))
    try:
        return run(settings, engine, args)
    except UNAVAILABLE as error:
        return _fail(f"cannot reach the database {redact(settings.database_url)}: {describe(error)}")
    except (migrate.SchemaBehind, ValueError) as error:
        return _fail(str(error))
    finally:
        engine.dispose()


def _fail(message: str) -> int:
    print(f"ERROR {message}", file=sys.stderr)
    return 1


def db_upgrade(settings: Settings, engine: Engine, args: argparse.Namespace) -> int:
    revision = migrate.upgrade(engine)
    print(f"{redact(settings.database_url)}: schema at revision {revision} (this release: {migrate.head_revision()})")
    return 0


def db_current(settings: Settings, engine: Engine, args: argparse.Namespace) -> int:
    current, head = migrate.current_revision(engine), migrate.head_revision()
    state = "up to date" if current == head else "not this release's: run `sentiment-analyzer db upgrade`"
    print(f"{redact(settings.database_url)}: schema at revision {current or 'none'}, this release needs {head}: "
          f"{state}")
    return 0 if current == head else 1


def keys_create(settings: Settings, engine: Engine, args: argparse.Namespace) -> int:
    migrate.prepare_schema(engine, settings)
    record, key = KeyStore(engine).create(args.name, args.role)
    print(f"created API key id={record.id} name={record.name!r} role={record.role}")
    print("store the key now; it is not kept and cannot be shown again:", file=sys.stderr)
    print(key)
    return 0


def keys_list(settings: Settings, engine: Engine, args: argparse.Namespace) -> int:
    migrate.prepare_schema(engine, settings)
    print("id\tname\trole\tcreated_at\tlast_used_at\trevoked_at")
    for key in KeyStore(engine).list():
        row = key.as_dict()
        print("\t".join(str(row[c] or "-") for c in ("id", "name", "role", "created_at", "last_used_at",
                                                       "revoked_at")))
    return 0


def keys_revoke(settings: Settings, engine: Engine, args: argparse.Namespace) -> int:
    migrate.prepare_schema(engine, settings)
    revoked = KeyStore(engine).revoke(args.id)
    if revoked is None:
        return _fail(f"no API key with id {args.id!r}; `sentiment-analyzer keys list` shows them")
    print(f"revoked API key id={revoked.id} name={revoked.name!r} at {revoked.revoked_at.isoformat()}")
    return 0


def feedback_export(settings: Settings, engine: Engine, args: argparse.Namespace) -> int:
    migrate.prepare_schema(engine, settings)
    partial = f"{args.out}.partial"
    with open(partial, "w", encoding="utf-8", newline="") as out:
        written, skipped = export_feedback(engine, out)
    os.replace(partial, args.out)
    note = f" ({skipped} skipped: stored without text, STORE_TEXT=false)" if skipped else ""
    print(f"wrote {written} labeled rows to {args.out}{note}")
    return 0
