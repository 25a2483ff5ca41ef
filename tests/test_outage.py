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


@pytest.mark.postgres
def test_predictions_survive_a_postgres_outage(pg_store_db, tiny_artifact, tmp_path):
    server = start_server({"MODEL_PATH": str(tiny_artifact), "DATABASE_URL": pg_store_db.url,
                           "DB_AUTO_MIGRATE": "true", "ENABLE_MODEL_CACHING": "false"}, tmp_path)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            served = stream(client, 0, 40)
            pg_store_db.down()
            served += stream(client, 40, 60)
            degraded = client.get("/health").json()
            pg_store_db.up()
            served += stream(client, 100, 40)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and client.get("/health").json()["database"]["spool_rows"]:
                time.sleep(0.2)
            healthy = client.get("/health").json()
    finally:
        assert stop_server(server) == 0
    assert degraded["status"] == "degraded" and degraded["database"]["status"] == "degraded"
    assert healthy["status"] == "ok", healthy
    engine = create_engine(pg_store_db.url)
    with engine.connect() as connection:
        stored = list(connection.execute(select(PREDICTIONS.c.request_id)).scalars())
    engine.dispose()
    assert sorted(stored) == sorted(served) and len(set(served)) == 140  # each served prediction exactly once
