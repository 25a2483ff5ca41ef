"""AUTH_MODE=required through a database outage: keyed /predict keeps answering from the key cache, a key
the server cannot know is a clear 503, and revocations take effect within KEY_CACHE_TTL_S once the database
is back (at once when revoked through the same server).

In process (the full app, key reads made to fail) and against a live server on SQLite and on a real
PostgreSQL that is stopped and started. On SQLite the outage is a lock that fails writes; reads still work,
so there an unknown key is still judged (401) rather than answered 503.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from scripts.benchlib.serverproc import start_server, stop_server
from server.app import create_app
from server.store.keys import KeyStore

NEVER_ISSUED = "sap_never-issued-by-anyone"


def predict(client: httpx.Client | TestClient, key: str, header: str = "bearer") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if header == "bearer" else {"X-API-Key": key}
    return client.post("/predict", json={"text": "a decent film"}, headers=headers)


def poll(probe: Callable[[], httpx.Response], done: Callable[[httpx.Response], bool], what: str,
         seconds: float = 30.0) -> httpx.Response:
    deadline = time.monotonic() + seconds
    response = probe()
    while not done(response):
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}: {response.text}"
        time.sleep(0.05)
        response = probe()
    return response


def until(condition: Callable[[], bool], what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        time.sleep(0.05)


def fallbacks(client: httpx.Client | TestClient) -> float:
    found = re.search(r"^sentiment_auth_key_cache_fallbacks_total (\S+)$", client.get("/metrics").text, re.M)
    return float(found.group(1))


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) >= 1
    body = response.json()
    assert "cannot be checked" in body["error"] and "database" in body["error"]
    assert body["type"] == "key_check_unavailable"


def test_in_process_keyed_predict_survives_key_reads_failing(make_settings):
    with TestClient(create_app(make_settings(auth_mode="required", key_cache_ttl_s=0.5))) as client:
        keys = client.app.state.services.keys
        record, key = keys.create("client", "predict")  # through this server: usable at once
        assert predict(client, key).status_code == 200
        assert predict(client, key, header="x-api-key").json()["predictions"][0]["label"] in ("POSITIVE", "NEGATIVE")
        assert predict(client, NEVER_ISSUED).status_code == 401

        def refused(*_args):
            raise OperationalError("SELECT", {}, ConnectionRefusedError("connection refused (injected)"))

        keys.store.find = keys.store.all_by_digest = refused
        assert_unavailable(poll(lambda: predict(client, "sap_another-guess"), lambda r: r.status_code != 401,
                                "an unknown key to be answered 503"))
        unverifiable = client.app.state.services.metrics.registry.get_sample_value(
            "sentiment_rejected_requests_total", {"reason": "key_unverifiable"})
        assert unverifiable >= 1  # the refusal is counted, so the key-cache alerts can see it
        served = poll(lambda: predict(client, key), lambda r: r.status_code != 200 or fallbacks(client) > 0,
                      "the cache to serve a key read before the outage")
        assert served.status_code == 200, served.text
        assert predict(client, key).status_code == 200
        del keys.store.find, keys.store.all_by_digest  # the database is back
        poll(lambda: predict(client, "sap_another-guess"), lambda r: r.status_code == 401,
             "unknown keys to be judged again")
        assert predict(client, key).status_code == 200
        assert keys.revoke(record.id).revoked_at is not None  # what DELETE /admin/keys/{id} calls
        assert predict(client, key).status_code == 401


@pytest.mark.parametrize("auth_mode", ["required", "open"])
def test_a_replica_started_in_an_outage_knowing_no_keys_is_not_ready_when_keys_are_required(make_settings,
                                                                                          monkeypatch, auth_mode):
    """Started while the database was down, with no key snapshot in SPOOL_DIR (a replica scaled out in the outage),
    it said ready and refused every keyed prediction 503 (red team helper-99): the balancer sent it traffic that it
    all refused. Without keys required it serves as ever."""
    def refused(*_args):
        raise OperationalError("SELECT", {}, ConnectionRefusedError("connection refused (injected)"))

    monkeypatch.setattr(KeyStore, "all_by_digest", refused)
    with TestClient(create_app(make_settings(auth_mode=auth_mode))) as client:
        reasons = client.get("/health").json()["reasons"]
        if auth_mode == "open":
            assert client.get("/ready").status_code == 200 and not any(r.startswith("keys:") for r in reasons)
            return
        for probe in ("/ready", "/v2/health/ready"):
            refusal = client.get(probe)
            assert refusal.status_code == 503 and refusal.json()["type"] == "keys_unknown", probe
        assert any(r.startswith("keys: AUTH_MODE=required and no API key is known yet") for r in reasons), reasons
        monkeypatch.undo()  # the database is back: the key cache's next read loads them
        assert client.portal.call(client.app.state.services.keys.refresh)
        assert client.get("/ready").status_code == 200 and client.get("/v2/health/ready").status_code == 200


@pytest.fixture
def auth_server(store_db, tiny_artifact, tmp_path):
    server = start_server({"MODEL_PATH": str(tiny_artifact), "DATABASE_URL": store_db.url, "DB_AUTO_MIGRATE": "true",
                           "AUTH_MODE": "required", "KEY_CACHE_TTL_S": "1", "DB_POOL_TIMEOUT_S": "1",
                           "ENABLE_MODEL_CACHING": "false"}, tmp_path)
    try:
        yield server
    finally:
        store_db.up()
        assert stop_server(server) == 0, server.log()[-3000:]


def test_live_keyed_predictions_through_a_database_outage_and_revocation_after_it(store_db, auth_server):
    engine = create_engine(store_db.url, pool_pre_ping=True)  # its connections outlive the restart
    elsewhere = KeyStore(engine)  # what `sentiment-analyzer keys ...` or another replica does
    admin_record, admin = elsewhere.create("ops", "admin")
    client_record, client_key = elsewhere.create("client", "predict")
    leaked_record, leaked = elsewhere.create("revoked elsewhere", "predict")
    retired_record, retired = elsewhere.create("revoked here", "predict")
    try:
        with httpx.Client(base_url=auth_server.url, timeout=30) as http:
            for key in (admin, client_key, leaked, retired):
                assert predict(http, key).status_code == 200
            store_db.down()
            unknown = predict(http, NEVER_ISSUED)
            if store_db.backend == "postgresql":
                assert_unavailable(unknown)
                # every entry outlives the 1 s TTL without a reload: all answered from the cache, counted
                statuses = set()
                poll(lambda: predict(http, client_key), lambda r: statuses.add(r.status_code) or fallbacks(http) > 3,
                     "keyed predictions to be served from the key cache")
                assert statuses == {200}
                assert predict(http, leaked, header="x-api-key").status_code == 200
                assert_unavailable(predict(http, NEVER_ISSUED))
                reasons = http.get("/health").json()["reasons"]  # it said ok (red team helper-106)
                assert any(r.startswith("keys: the API keys cannot be read") for r in reasons), reasons
            else:
                assert unknown.status_code == 401
                assert all(predict(http, client_key).status_code == 200 for _ in range(10))
            store_db.up()

            elsewhere.revoke(leaked_record.id)
            started = time.monotonic()
            refused = poll(lambda: predict(http, leaked), lambda r: r.status_code != 200,
                           "a revocation made elsewhere to reach the server")
            took = time.monotonic() - started
            assert refused.status_code == 401 and "revoked" in refused.json()["error"], refused.text

            revoke = http.delete(f"/admin/keys/{retired_record.id}", headers={"Authorization": f"Bearer {admin}"})
            assert revoke.status_code == 200 and revoke.json()["revoked_at"]
            assert predict(http, retired).status_code == 401  # the revoking server: at once
            assert predict(http, client_key).status_code == 200
            assert predict(http, NEVER_ISSUED).status_code == 401

            until(lambda: any(k.id == client_record.id and k.last_used_at for k in elsewhere.list()),
                  "the server to write the key's last use")
            reasons = http.get("/health").json()["reasons"]
            assert not any(r.startswith("keys: the API keys cannot be read") for r in reasons), reasons
    finally:
        engine.dispose()
    log = auth_server.log()
    assert client_key not in log and admin not in log
    print(f"{store_db.backend}: a revocation made elsewhere took effect after {took:.2f} s (KEY_CACHE_TTL_S=1)")


def test_a_key_snapshot_that_cannot_be_written_is_on_health_until_one_is(tiny_artifact, tmp_path):
    """``keys.json`` made a directory: the snapshot a start in an outage needs could not be written, and only a
    throttled WARNING said so while /health said ok (red team helper-104)."""
    snapshot = tmp_path / "spool" / "keys.json"
    snapshot.mkdir(parents=True)
    server = start_server({"MODEL_PATH": str(tiny_artifact), "KEY_CACHE_TTL_S": "1"}, tmp_path)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            health = poll(lambda: client.get("/health"), lambda r: r.json()["status"] == "degraded", "degraded")
            assert any(reason.startswith(f"keys: the API key snapshot {snapshot} cannot be written")
                       for reason in health.json()["reasons"]), health.text
            snapshot.rmdir()
            poll(lambda: client.get("/health"), lambda r: r.json()["status"] == "ok", "the snapshot written")
    finally:
        assert stop_server(server) == 0, server.log()[-3000:]
    assert snapshot.is_file()
