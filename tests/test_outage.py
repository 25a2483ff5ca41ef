"""The runbook's "database connection issues", end to end: PostgreSQL stops in the middle of a stream of
predictions served by a live server and comes back; no prediction fails and the table ends up holding
exactly the served predictions, none twice."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select

from scripts.benchlib.serverproc import start_server, stop_server
from server.store.tables import PREDICTIONS
from tests.test_protocol_oip_v2 import create_key


def stream(client: httpx.Client, start: int, count: int) -> list[str]:
    """Send ``count`` single-text predictions; returns the request ids of the 200 answers."""
    ids = []
    for i in range(start, start + count):
        response = client.post("/predict", json={"text": f"outage drill sentence number {i}, a decent film"})
        assert response.status_code == 200, response.text
        ids.append(response.json()["request_id"])
    return ids


def until(client: httpx.Client, done, seconds: float = 30.0) -> dict:
    """/health once ``done(health)`` holds or ``seconds`` have passed, whichever comes first.

    The writer notices an outage or a recovery on its next flush (every 0.25 s), not at the request that
    queued the row: 60 requests to the tiny model can all be answered before that flush.
    """
    deadline = time.monotonic() + seconds
    health = client.get("/health").json()
    while not done(health) and time.monotonic() < deadline:
        time.sleep(0.1)
        health = client.get("/health").json()
    return health


@pytest.mark.postgres
def test_predictions_survive_a_postgres_outage(pg_store_db, tiny_artifact, tmp_path):
    server = start_server({"MODEL_PATH": str(tiny_artifact), "DATABASE_URL": pg_store_db.url,
                           "DB_AUTO_MIGRATE": "true", "ENABLE_MODEL_CACHING": "false"}, tmp_path)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            served = stream(client, 0, 40)
            pg_store_db.down()
            served += stream(client, 40, 60)
            degraded = until(client, lambda health: health["status"] == "degraded")
            pg_store_db.up()
            served += stream(client, 100, 40)
            # One condition on one answer: "ok" and an empty spool together (polling one and then the other
            # raced: the spool emptied while /health still said degraded, or the reverse).
            healthy = until(client, lambda health: health["status"] == "ok" and not health["database"]["spool_rows"])
    finally:
        assert stop_server(server) == 0
    assert degraded["status"] == "degraded" and degraded["database"]["status"] == "degraded"
    assert healthy["status"] == "ok", healthy
    engine = create_engine(pg_store_db.url)
    with engine.connect() as connection:
        stored = list(connection.execute(select(PREDICTIONS.c.request_id)).scalars())
    engine.dispose()
    assert sorted(stored) == sorted(served) and len(set(served)) == 140  # each served prediction exactly once


def _sqlite_env(tiny_artifact: Path, tmp_path: Path) -> dict[str, str]:
    """A server on ``tmp_path/predictions.db``, its spool beside it."""
    return {"MODEL_PATH": str(tiny_artifact), "DATABASE_URL": f"sqlite:///{tmp_path / 'predictions.db'}",
            "DB_AUTO_MIGRATE": "true", "ENABLE_MODEL_CACHING": "false", "SPOOL_DIR": str(tmp_path / "spool")}


def _start(env: dict[str, str], log_dir: Path):
    log_dir.mkdir()
    return start_server(env, log_dir)


def _stored_request_ids(database: Path) -> list[str]:
    engine = create_engine(f"sqlite:///{database}")
    with engine.connect() as connection:
        stored = list(connection.execute(select(PREDICTIONS.c.request_id)).scalars())
    engine.dispose()
    return stored


def _move_database(database: Path, to: Path) -> None:
    """The SQLite file and its companions, as ``mv`` (or ``rm``, with ``to`` thrown away) does it under a server."""
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{database}{suffix}").exists():
            os.rename(f"{database}{suffix}", f"{to}{suffix}")


@pytest.mark.parametrize("then", ["put back", "replaced", "left out"])
def test_predictions_answered_after_the_sqlite_file_is_removed_are_kept(tiny_artifact, tmp_path, then):
    """A red team removed the SQLite file under a running server: SQLite went on committing into the removed file,
    every record answered after that was released from the spool as stored, /health said ok, and a clean shutdown
    lost them all (``server.store.sqlite_file``). Now the database is down, saying why, the records wait in the
    spool, and they reach the file put back, or at a restart whatever file is at the path (a copy put in its place
    is not joined while the server runs: SQLite would open it with the first file's write-ahead log)."""
    database, aside = tmp_path / "predictions.db", tmp_path / "aside.db"
    env = _sqlite_env(tiny_artifact, tmp_path)
    server = _start(env, tmp_path / "first")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            before = stream(client, 0, 5)
            until(client, lambda health: health["status"] == "ok" and not health["database"]["spool_rows"])
            _move_database(database, aside)
            after = stream(client, 5, 10)
            down = until(client, lambda health: health["status"] == "degraded" and health["database"]["spool_rows"])
            answered_while_down = len(after)  # ``after`` grows below ("replaced")
            metrics = client.get("/metrics").text
            if then == "put back":
                _move_database(aside, database)
                healthy = until(client, lambda h: h["status"] == "ok" and not h["database"]["spool_rows"])
            elif then == "replaced":
                shutil.copyfile(aside, database)  # another file (inode) at the path
                replaced = until(client, lambda h: "was replaced" in (h["database"]["reason"] or ""))
                after += stream(client, 15, 5)
    finally:
        assert stop_server(server) == 0
    assert down["status"] == "degraded", down
    assert f"the SQLite database {database} was removed" in down["database"]["reason"], down
    assert down["database"]["spool_rows"] >= answered_while_down  # and those of ``before`` still in the open segment
    assert "\nsentiment_store_up 0.0\n" in metrics
    spooled = re.search(r"\nsentiment_store_spool_rows (\S+)\n", metrics)  # set at the scrape, from the store's state
    assert spooled and float(spooled.group(1)) >= answered_while_down, spooled
    if then == "put back":
        assert healthy["status"] == "ok", healthy
        assert sorted(_stored_request_ids(database)) == sorted(before + after)
        return
    if then == "replaced":
        assert replaced["status"] == "degraded" and "restart the server" in replaced["database"]["reason"], replaced
    server = _start(env, tmp_path / "second")  # whatever is at the path (a new database if none): replayed into
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            until(client, lambda health: health["status"] == "ok" and not health["database"]["spool_rows"])
    finally:
        assert stop_server(server) == 0
    stored = _stored_request_ids(database)  # what only the removed file held went with it
    assert set(after) <= set(stored) <= set(before + after) and len(stored) == len(set(stored)), stored


@pytest.mark.parametrize("companion, named", [("-wal", "write-ahead log"), ("-shm", "shared index")])
def test_predictions_answered_after_the_sqlite_write_ahead_log_is_removed_are_kept(tiny_artifact, tmp_path,
                                                                                 companion, named):
    """The same through the other files (red teams): with ``-wal`` removed, commits went into the log the
    connections held open, the spool released them, and a SIGKILL lost them; with ``-shm`` removed, a key created
    beside the server was overwritten by the server's next commits. Now the database is down until a restart,
    which replays the spool."""
    database = tmp_path / "predictions.db"
    env = _sqlite_env(tiny_artifact, tmp_path)
    server = _start(env, tmp_path / "first")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            stream(client, 0, 5)
            until(client, lambda health: health["status"] == "ok" and not health["database"]["spool_rows"])
            Path(f"{database}{companion}").unlink()
            after = stream(client, 5, 10)
            down = until(client, lambda health: health["status"] == "degraded" and health["database"]["spool_rows"])
    finally:
        server.process.kill()  # what the log held open goes with the process
        server.process.wait()
    assert named in down["database"]["reason"] and "restart the server" in down["database"]["reason"], down
    server = _start(env, tmp_path / "second")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            until(client, lambda health: health["status"] == "ok" and not health["database"]["spool_rows"])
    finally:
        assert stop_server(server) == 0
    assert set(after) <= set(_stored_request_ids(database))


def test_a_sqlite_file_moved_alone_under_a_running_server_holds_what_was_committed_to_it(tiny_artifact, tmp_path):
    """A red team moved only the database file (``mv p.db p.away``) and stopped the server: SQLite skips its own
    checkpoint at close for a moved file, so what was committed stayed in the ``-wal`` left at the path; the moved
    file lacked even its tables, and the restart deleted that log (6 of 6 answered records lost). The server now
    checkpoints through the connections it drops."""
    database, aside = tmp_path / "predictions.db", tmp_path / "aside.db"
    env = _sqlite_env(tiny_artifact, tmp_path)
    server = _start(env, tmp_path / "first")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            answered = stream(client, 0, 6)
            deadline = time.monotonic() + 30  # committed: in the database (its log), not only answered
            while sorted(_stored_request_ids(database)) != sorted(answered) and time.monotonic() < deadline:
                time.sleep(0.1)
            os.rename(database, aside)  # not its -wal and -shm
    finally:
        assert stop_server(server) == 0
    assert sorted(_stored_request_ids(aside)) == sorted(answered)  # the moved file alone, no log beside it
    leftover = Path(f"{database}-wal")
    assert not leftover.exists() or leftover.stat().st_size == 0


@pytest.mark.parametrize("companion", ["-wal", "-shm"])
def test_feedback_and_key_writes_after_the_sqlite_log_is_removed_are_not_500(tiny_artifact, tmp_path, companion):
    """A red team removed ``-wal`` or ``-shm`` under a running server: every feedback and key write through the API
    (a revoke of a leaked key too) answered 500 with a traceback, and the key cache logged one at each refresh. The
    commit hook's ``SqliteFileChanged`` is the driver's own error, not SQLAlchemy's, and the 503 handling looked for
    SQLAlchemy's only."""
    database = tmp_path / "predictions.db"
    admin = create_key(f"sqlite:///{database}", "admin")
    env = {**_sqlite_env(tiny_artifact, tmp_path), "AUTH_MODE": "required", "KEY_CACHE_TTL_S": "1"}
    server = _start(env, tmp_path / "first")
    try:
        with httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {admin}"}) as client:
            prediction_id = client.post("/predict", json={"text": "a fine film"}).json()["predictions"][0]["id"]
            key_id = client.post("/admin/keys", json={"name": "to revoke"}).json()["id"]
            until(client, lambda health: health["status"] == "ok" and not health["database"]["spool_rows"])
            Path(f"{database}{companion}").unlink()
            refused = [client.post("/feedback", json={"prediction_id": prediction_id, "label": "POSITIVE"}),
                       client.post("/admin/keys", json={"name": "later"}), client.delete(f"/admin/keys/{key_id}")]
            time.sleep(2.5)  # the key cache's refreshes (every KEY_CACHE_TTL_S / 2) meet the same error
    finally:
        server.process.kill()
        server.process.wait()
    for response in refused:  # refused as the database being down; or, once SQLite has made its files afresh
        # (every connection closed: its last close checkpoints into the database file), served by them
        if response.status_code != 503:
            assert response.status_code in (200, 201), (response.request.url, response.text)
            continue
        assert response.headers["retry-after"] and response.json()["type"] == "unavailable", response.text
    assert refused[0].status_code == 503  # not 404 "no prediction": the feedback's own read found the log changed
    log = server.log()
    assert "Traceback" not in log and "API key cache refresh failed" not in log, log[-3000:]
