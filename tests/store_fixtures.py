"""Store fixtures: each store test runs on SQLite and on a real PostgreSQL.

Load them with ``pytest_plugins = ["tests.store_fixtures"]`` in tests/conftest.py.

PostgreSQL is started once per session with pytest-postgresql's executor
(``scripts.benchlib.databases.PgServer``, shared with the chaos script).
PostgreSQL refuses to run as root, so when the tests run as root (CI
containers) the server runs as the ``postgres`` system user: the executor is
pointed at ``tests/pg_ctl_nonroot.sh`` (pg_ctl run through ``runuser``) and
the data directory is a ``postgres``-owned temp directory. That directory is
why the executor is used directly rather than through the ``postgresql_proc``
factory: the factory puts it under pytest's root-only (0700) temp root, which
the ``postgres`` user cannot traverse and which every new pytest process
locks again. Each test gets a database of its own. Without PostgreSQL
binaries the ``postgres``-marked half fails with instructions; deselect it
with ``pytest -m "not postgres"``.

``store_db`` (both backends) and ``pg_store_db`` (PostgreSQL only) give a URL
and an outage switch: ``down()`` stops the PostgreSQL server (or, on SQLite,
holds an exclusive lock so writes fail), ``up()`` undoes it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from scripts.benchlib.databases import (
    PG_MISSING,
    PgServer,
    SqliteLock,  # noqa: F401 (tests import it from here)
    postgres_database,
    real_pg_ctl,
    sqlite_database,
)
from scripts.benchlib.databases import Database as StoreDatabase
from server.config import Settings, load_settings
from server.metrics import Metrics
from server.primitives import PredictionRecord
from server.store import PredictionStore, migrate
from server.store.tables import PREDICTIONS

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session")
def store_pg_server() -> Iterator[PgServer]:
    if real_pg_ctl() is None:
        pytest.fail(f"{PG_MISSING}; to skip these tests run pytest -m 'not postgres'", pytrace=False)
    server = PgServer.launch()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=BACKENDS)
def store_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreDatabase]:
    """A fresh database on each backend in turn (the PostgreSQL half is marked ``postgres``)."""
    if request.param == "sqlite":
        yield from _sqlite_database(tmp_path)
    else:
        yield from _postgres_database(request.getfixturevalue("store_pg_server"))


@pytest.fixture
def pg_store_db(store_pg_server: PgServer) -> Iterator[StoreDatabase]:
    """A fresh PostgreSQL database only (mark the test ``@pytest.mark.postgres``), e.g. for a live-server test."""
    yield from _postgres_database(store_pg_server)


def _sqlite_database(tmp_path: Path) -> Iterator[StoreDatabase]:
    with sqlite_database(tmp_path) as database:
        yield database


def _postgres_database(server: PgServer) -> Iterator[StoreDatabase]:
    with postgres_database(server) as database:
        yield database


@pytest.fixture
def store_settings(store_db: StoreDatabase, tmp_path: Path) -> Callable[..., Settings]:
    """Settings for the store on ``store_db`` with a spool in tmp_path; keyword arguments override."""

    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {"database_url": store_db.url, "spool_dir": tmp_path / "spool",
                                     "db_pool_timeout_s": 1.0, "db_auto_migrate": True}
        values.update(overrides)
        return load_settings(**values)

    return make


FAST = {"flush_interval_s": 0.05, "retry_interval_s": 0.2}


@pytest.fixture
async def open_store(store_settings) -> AsyncIterator[Callable[..., Awaitable[PredictionStore]]]:
    """Start a PredictionStore (fast flush and retry); every one opened is closed at teardown."""
    opened: list[PredictionStore] = []

    async def open_(settings: Settings | None = None, metrics: Metrics | None = None, **kwargs) -> PredictionStore:
        store = PredictionStore(settings or store_settings(), metrics or Metrics(), **{**FAST, **kwargs})
        opened.append(store)
        await store.start()
        return store

    yield open_
    for store in opened:
        await store.close()


def ok_but_for_lost_records(health: dict) -> bool:
    """/health has nothing to say but that records were lost (it says so for a while after the last one)."""
    reason = health["reason"] or ""
    return health["lost_rows"] > 0 and "records lost since start" in reason and ";" not in reason


def scraped(store: PredictionStore, gauge) -> float:
    """A store gauge's value as a scrape of /metrics reads it: the gauges are set from the store's state at scrape
    time (``Services.refresh_gauges``), not at each change."""
    store.state.publish()
    return gauge._value.get()


def make_record(text: str = "a fine film", **overrides) -> PredictionRecord:
    values: dict[str, object] = {
        "request_id": "req-1", "text": text, "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "label": "POSITIVE", "score": 0.9, "probabilities": {"NEGATIVE": 0.1, "POSITIVE": 0.9},
        "model_name": "tiny", "model_version": "1", "device": "cpu", "latency_ms": 3.5, "cached": False,
    }
    values.update(overrides)
    return PredictionRecord(**values)


def created_database(url: str) -> str:
    """``url``'s database with this release's schema (``db upgrade``): a spool replay writes only into one that
    exists."""
    engine = create_engine(url)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()
    return url


def stored_ids(url: str) -> list[str]:
    """Every prediction id in the database, duplicates included (there can be none: id is the key)."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(select(PREDICTIONS.c.id)).scalars())
    finally:
        engine.dispose()


async def wait_until(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)
