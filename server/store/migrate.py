"""Schema migrations: ``sentiment-analyzer db upgrade`` and the check the server makes at start.

SQLite (the embedded default) is migrated at start. PostgreSQL is shared by
replicas and owned by operators, so a server refuses to start on a schema that
is behind unless DB_AUTO_MIGRATE=true; concurrent upgrades serialize on an
advisory lock (``doctor`` takes it too, to rehearse the upgrade and roll it
back). A schema *newer* than this server (after ``kubectl rollout undo``) only
logs a warning: migrations are kept backward compatible so that rollbacks work.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, inspect, text

from server.config import Settings
from server.exitcodes import ExitCode, StartupError

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
UPGRADE_LOCK_KEY = 0x5E47  # pg_advisory_xact_lock key held while upgrading


class SchemaBehind(StartupError):
    """The database schema is older than this server needs."""

    exit_code = ExitCode.DATABASE


class ForeignSchema(SchemaBehind):
    """A revision this release does not know, on a database holding none of its tables: another application's
    database, not a newer release's. Refused wherever a schema behind is (the server cannot write there), where it
    was taken for a newer release's: the server started and reported the database down for ever (UndefinedTable),
    ``db current`` said it was fine (red team helper-74)."""


OWN_TABLES = ("predictions", "api_keys", "feedback")  # every release's schema holds them


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> str:
    """Apply pending migrations in one transaction; returns the revision the database is at."""
    with engine.begin() as connection:
        return _upgrade_in(connection)


def rehearse_upgrade(engine: Engine) -> None:
    """Run ``upgrade`` (same lock, same migrations) and roll it back: raises what the server's own upgrade would
    meet, a role that may not create tables say, and leaves the database as it was. PostgreSQL only, whose DDL is
    transactional: SQLite's driver commits DDL as it goes, so a rollback there would not undo it."""
    if engine.dialect.name != "postgresql":
        raise ValueError(f"an upgrade is rehearsed on PostgreSQL only, not {engine.dialect.name}")
    with engine.connect() as connection:
        transaction = connection.begin()
        try:
            _upgrade_in(connection)
        finally:
            transaction.rollback()


def _upgrade_in(connection: Connection) -> str:
    """``upgrade``'s work inside the caller's transaction, which commits it or (``rehearse_upgrade``) not."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": UPGRADE_LOCK_KEY})
    current = MigrationContext.configure(connection).get_current_revision()
    if is_newer(connection, current):
        log.warning("database schema is at revision %s, newer than this server's %s; leaving it as it is",
                    current, head_revision())
        return current
    command.upgrade(_config(connection), "head")
    return head_revision()


def migrates_at_start(engine: Engine, settings: Settings) -> bool:
    """Whether a server migrates this database when it starts (SQLite, or DB_AUTO_MIGRATE=true)."""
    return engine.dialect.name == "sqlite" or settings.db_auto_migrate


def prepare_schema(engine: Engine, settings: Settings) -> None:
    """Migrate (``migrates_at_start``) or check that the schema is current; raises ``SchemaBehind``."""
    if migrates_at_start(engine, settings):
        upgrade(engine)
        return
    check_schema(engine)


def check_schema(engine: Engine) -> str:
    """Read-only: the schema's revision when it is this release's or newer (a rollback: a warning), else raises
    ``SchemaBehind`` saying how to upgrade. What a server that does not migrate at start checks, and what the
    commands that only read (and doctor) check whatever the database."""
    current, head = current_revision(engine), head_revision()
    if current == head:
        return current
    if is_newer(engine, current):
        log.warning("database schema is at revision %s, newer than this server's %s; continuing", current, head)
        return current
    raise SchemaBehind(
        f"database schema is at revision {current or 'none (empty database)'} but this server needs {head}: "
        "run `sentiment-analyzer db upgrade` with the same DATABASE_URL, or start with DB_AUTO_MIGRATE=true"
    )


def is_newer(connectable: Engine | Connection, revision: str | None) -> bool:
    """A revision this release does not know, on a database holding this server's tables: written by a newer server
    (a rollback, or a rollout under way). Raises ``ForeignSchema`` for one without them, and for no revision on a
    database that holds a table of this server's name (the upgrade failed on it, "already exists", at every retry,
    and the server reported the database down for ever: red team helper-75)."""
    if revision is None:
        taken = sorted(set(OWN_TABLES) & set(inspect(connectable).get_table_names()))
        if taken:
            raise ForeignSchema(
                f"database has a {', '.join(taken)} table but no schema revision (alembic_version): it is not this "
                "server's schema, and DATABASE_URL may name another application's database",
                fix="point DATABASE_URL at this server's database, or at an empty one (the server creates its "
                    "tables)")
        return False
    if _known(revision):
        return False
    missing = sorted(set(OWN_TABLES) - set(inspect(connectable).get_table_names()))
    if missing:
        raise ForeignSchema(
            f"database schema is at revision {revision}, which no release of this server wrote, and has no "
            f"{', '.join(missing)} table: DATABASE_URL names another application's database",
            fix="point DATABASE_URL at this server's database, or at an empty one (the server creates its tables)")
    return True


def _known(revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(_config()).get_revision(revision) is not None
    except CommandError:
        return False
