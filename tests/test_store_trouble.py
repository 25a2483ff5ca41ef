"""/health's database reason names the kind of trouble (``server.store.trouble``), from real drivers' errors."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from server.store.state import public_reason
from server.store.trouble import trouble_kind


def connect_error(url: str) -> DBAPIError:
    """The error of connecting to ``url`` and reading from it (SQLite opens a file only once a statement reads it)."""
    engine = create_engine(url)
    try:
        with pytest.raises(DBAPIError) as raised, engine.connect() as connection:
            connection.execute(text("SELECT count(*) FROM sqlite_master" if url.startswith("sqlite") else "SELECT 1"))
        return raised.value
    finally:
        engine.dispose()


class WithSqlstate(Exception):
    def __init__(self, sqlstate: str | None, message: str = "FATAL: details that name a host") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(("code", "kind"), [
    ("28P01", "authentication failed"),  # the class decides when the code has no entry of its own
    ("28000", "authentication failed"),
    ("3D000", "no such database"),
    ("53300", "too many connections"),
    ("57P03", "database starting up or shutting down"),
    ("57014", "statement timeout (a lock held elsewhere, or a stalled server)"),  # told as "SQLSTATE 57014" before
    ("08006", "connection failure"),
    ("XX000", "SQLSTATE XX000"),  # an unknown code is still told, as itself
])
def test_a_sqlstate_names_its_kind_and_not_the_message(code, kind):
    assert trouble_kind(WithSqlstate(code)) == kind
    assert trouble_kind(WithSqlstate(code, "connection refused")) == kind  # the code, not the text, decides


def test_without_sqlstate_or_a_known_phrase_there_is_no_kind():
    assert trouble_kind(WithSqlstate(None, "something new went wrong")) is None
    assert trouble_kind(RuntimeError("")) is None


def test_a_refused_postgresql_connection_is_named_without_host_or_port():
    error = connect_error("postgresql+psycopg://someone@127.0.0.1:1/somedb")
    reason = public_reason(error)
    assert reason == "database unavailable (OperationalError: connection refused)"
    for detail in ("127.0.0.1", "someone", "somedb", "Is the server running"):
        assert detail not in reason


def test_an_unresolvable_host_is_named():
    error = connect_error("postgresql+psycopg://someone@no-such-host.invalid/somedb")
    assert public_reason(error) == "database unavailable (OperationalError: host name not resolved)"


def test_sqlite_errors_are_named(tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is no SQLite file" * 100)
    assert public_reason(connect_error(f"sqlite:///{garbage}")) == \
        "database unavailable (DatabaseError: not a database file)"
    missing = tmp_path / "no" / "such" / "dir" / "x.db"
    assert public_reason(connect_error(f"sqlite:///{missing}")) == \
        "database unavailable (OperationalError: database file cannot be opened)"


@pytest.mark.postgres
@pytest.mark.parametrize(("change", "kind"), [
    ({"database": "no_such_database_here"}, "no such database"),
    ({"username": "no_such_role_here"}, "authentication failed"),
])
def test_postgresql_refusing_a_connection_is_named(pg_store_db, change, kind):
    """A real server's refusal while connecting (libpq gives no SQLSTATE there: the message is read)."""
    url = create_engine(pg_store_db.url).url.set(**change)
    reason = public_reason(connect_error(url.render_as_string(hide_password=False)))
    assert reason == f"database unavailable (OperationalError: {kind})"
    assert "no_such" not in reason
