"""doctor with DB_AUTO_MIGRATE=true on PostgreSQL: the upgrade the server would run at start is rehearsed and rolled
back, so a role that may not create tables fails here (as the server's start would: its store stays down) and the
database is left exactly as doctor found it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import make_url

from scripts.benchlib.databases import PgServer
from server.config import load_settings
from server.metrics import Metrics
from server.store import PredictionStore, migrate
from server.store.db import make_engine
from tests.store_fixtures import FAST, StoreDatabase
from tests.test_doctor import doctor, good_env

PASSWORD = "s3cret-pw"


class Roles:
    """Login roles on one fresh database, made and dropped through the server's superuser connection."""

    def __init__(self, server: PgServer, database: str) -> None:
        self.server, self.database = server, database

    def admin(self, *statements: str) -> list[tuple]:
        executor = self.server.executor
        with psycopg.connect(host=executor.host, port=executor.port, user=executor.user, dbname=self.database,
                             autocommit=True) as connection:
            rows: list[tuple] = []
            for statement in statements:
                cursor = connection.execute(statement)
                rows = cursor.fetchall() if cursor.description else []
            return rows

    def url(self, role: str) -> str:
        executor = self.server.executor
        return f"postgresql+psycopg://{role}:{PASSWORD}@{executor.host}:{executor.port}/{self.database}"

    def tables(self) -> list[tuple]:
        """Every relation outside the system schemas, and whether alembic_version exists: what a migration leaves."""
        return self.admin("SELECT schemaname, tablename FROM pg_tables "
                          "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') "
                          "UNION ALL SELECT 'regclass', to_regclass('alembic_version')::text "
                          "WHERE to_regclass('alembic_version') IS NOT NULL")


@pytest.fixture
def roles(pg_store_db: StoreDatabase, store_pg_server: PgServer) -> Iterator[tuple[Roles, str, str]]:
    """A role without CREATE on schema public (PostgreSQL 15+'s default for one that does not own the database,
    made explicit for older servers) and one granted it."""
    suffix = uuid.uuid4().hex[:8]
    plain, creator = f"app_{suffix}", f"migrator_{suffix}"
    on = Roles(store_pg_server, make_url(pg_store_db.url).database)
    on.admin("REVOKE CREATE ON SCHEMA public FROM PUBLIC",
             f"CREATE ROLE {plain} LOGIN PASSWORD '{PASSWORD}'", f"CREATE ROLE {creator} LOGIN PASSWORD '{PASSWORD}'",
             f"GRANT CREATE ON SCHEMA public TO {creator}")
    yield on, plain, creator
    on.admin(f"DROP OWNED BY {plain}, {creator} CASCADE", f"DROP ROLE {plain}", f"DROP ROLE {creator}")


def auto_migrate_env(tiny_artifact, tmp_path, url: str) -> dict[str, str]:
    return {**good_env(tiny_artifact, tmp_path), "DATABASE_URL": url, "DB_AUTO_MIGRATE": "true",
            "DB_POOL_TIMEOUT_S": "2"}


@pytest.mark.postgres
async def test_a_role_that_cannot_migrate_fails_as_the_servers_start_would(monkeypatch, tiny_artifact, tmp_path,
                                                                            roles):
    on, plain, _ = roles
    env = auto_migrate_env(tiny_artifact, tmp_path, on.url(plain))
    code, lines = doctor(monkeypatch, env)
    assert code == 1, lines
    failure = next(i for i, line in enumerate(lines) if line.startswith("[FAIL] database"))
    said, fix = lines[failure], lines[failure + 1]
    assert "permission denied for schema public" in said and plain in said and "none" in said, said
    assert fix.startswith("       fix: ") and "sentiment-analyzer db upgrade" in fix and "CREATE on the schema" in fix
    assert PASSWORD not in "\n".join(lines)
    assert [line.split(":")[0] for line in lines if line.startswith("[FAIL]")] == ["[FAIL] database"], lines
    assert on.tables() == []  # rolled back: no table, no alembic_version

    # What start-up does with the same settings: the store's upgrade is refused the same way, and the server
    # starts with its store down (degraded), not refused.
    settings = load_settings(database_url=env["DATABASE_URL"], spool_dir=tmp_path / "spool", db_auto_migrate=True,
                             db_pool_timeout_s=2.0)
    engine = make_engine(settings)
    try:
        with pytest.raises(Exception, match="permission denied for schema public"):
            migrate.prepare_schema(engine, settings)
    finally:
        engine.dispose()
    store = PredictionStore(settings, Metrics(), **FAST)
    await store.start()
    try:
        health = store.health()
        assert health["status"] == "degraded" and "InsufficientPrivilege" in health["reason"], health
    finally:
        await store.close()
    assert on.tables() == []


@pytest.mark.postgres
def test_a_role_that_may_migrate_passes_and_nothing_is_migrated_until_the_server_starts(monkeypatch, tiny_artifact,
                                                                                        tmp_path, roles):
    on, _, creator = roles
    env = auto_migrate_env(tiny_artifact, tmp_path, on.url(creator))
    code, lines = doctor(monkeypatch, env)
    assert code == 0, lines
    (said,) = [line for line in lines if line.startswith("[ok  ] database")]
    head = migrate.head_revision()
    assert f"schema at revision none, brought to this release's ({head})" in said and "rolled back" in said, said
    assert on.tables() == []  # the rehearsal left nothing behind

    settings = load_settings(database_url=env["DATABASE_URL"], db_auto_migrate=True)
    engine = make_engine(settings)
    try:
        migrate.prepare_schema(engine, settings)  # the server's start: it does migrate
    finally:
        engine.dispose()
    assert ("regclass", "alembic_version") in on.tables()

    before = on.admin("SELECT xmin::text, version_num FROM alembic_version")
    code, lines = doctor(monkeypatch, env)  # a current schema: nothing to rehearse
    assert code == 0, lines
    (said,) = [line for line in lines if line.startswith("[ok  ] database")]
    assert said.endswith(f"schema at revision {head}") and "rolled back" not in said, said
    assert on.admin("SELECT xmin::text, version_num FROM alembic_version") == before
