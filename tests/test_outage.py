"""The runbook's "database connection issues", end to end: PostgreSQL stops in the middle of a stream of
predictions served by a live server and comes back; no prediction fails and the table ends up holding
exactly the served predictions, none twice."""

from __future__ import annotations

import time

import httpx
import pytest
from sqlalchemy import create_engine, select

from scripts.benchlib.serverproc import start_server, stop_server
from server.store.tables import PREDICTIONS


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
