"""API keys on the store's routes: the auth matrix, open mode, how keys must be sent, security events,
revocation, outages."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI

from server import auth
from server.http import install_error_handlers
from server.metrics import Metrics
from server.routes_store import router
from server.store import KeyStore, throttle
from server.store.keycache import KeyCache
from tests.store_fixtures import make_record, stored_ids, wait_until

ENDPOINTS = [  # method, path, body, role it needs
    ("GET", "/predictions", None, "admin"),
    ("GET", "/predictions/{prediction}", None, "admin"),
    ("POST", "/feedback", {"prediction_id": "{prediction}", "label": "NEGATIVE"}, "predict"),
    ("GET", "/feedback/export", None, "admin"),
    ("POST", "/admin/keys", {"name": "new", "role": "predict"}, "admin"),
    ("GET", "/admin/keys", None, "admin"),
    ("DELETE", "/admin/keys/{spare}", None, "admin"),
]
CALLERS = ["no key", "wrong key", "predict key", "admin key", "revoked key"]


class Api:
    """A FastAPI app with the store routes on a started store, its keys, and an HTTP client."""

    def __init__(self, app: FastAPI, services: SimpleNamespace, keys: dict[str, str], ids: dict[str, str]) -> None:
        self.services = services
        self.keys = keys
        self.ids = ids
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")

    async def call(self, method: str, path: str, body: dict | None = None, key: str | None = None,
                   header: str = "bearer") -> httpx.Response:
        headers = {}
        if key is not None:
            headers = {"Authorization": f"Bearer {key}"} if header == "bearer" else {"X-API-Key": key}
        fill = {k: v.format(**self.ids) if isinstance(v, str) else v for k, v in (body or {}).items()}
        return await self.client.request(method, path.format(**self.ids), json=body and fill, headers=headers)

    def rejected(self, reason: str) -> float:
        return self.services.metrics.rejected.labels(reason)._value.get()


@pytest.fixture
async def make_api(store_db, store_settings, open_store):
    clients: list[httpx.AsyncClient] = []

    async def make(auth_mode: str = "required") -> Api:
        settings = store_settings(auth_mode=auth_mode)
        metrics = Metrics()
        store = await open_store(settings, metrics)
        keys = KeyStore(store.engine)
        record = make_record()
        store.submit(record)
        await wait_until(lambda: stored_ids(store_db.url) == [record.id], what="the seed prediction")
        secrets, ids = {"wrong key": "sap_not-a-key"}, {"prediction": record.id}
        for caller, role in (("predict key", "predict"), ("admin key", "admin"), ("revoked key", "admin"),
                             ("spare", "predict")):
            created, secrets[caller] = keys.create(caller, role)
            ids[caller.split()[0]] = created.id
        keys.revoke(ids["revoked"])
        cache = KeyCache(keys, metrics, ttl_s=60)
        await cache.start()
        app = FastAPI()
        app.include_router(router)
        install_error_handlers(app)
        runtime = SimpleNamespace(labels=lambda: ["NEGATIVE", "POSITIVE"])  # POST /feedback takes the model's labels
        services = SimpleNamespace(settings=settings, metrics=metrics, store=store, keys=cache, runtime=runtime)
        app.state.services = services
        api = Api(app, services, secrets, ids)
        clients.append(api.client)
        return api

    yield make
    for client in clients:
        await client.aclose()


def expected_status(role: str, caller: str, auth_mode: str = "required") -> int | None:
    """None: allowed (the endpoint's own success status)."""
    if caller == "no key":
        return None if role == "predict" and auth_mode == "open" else 401
    if caller in ("wrong key", "revoked key"):
        return 401
    if caller == "predict key" and role == "admin":
        return 403
    return None


async def test_auth_matrix(make_api):
    """Every endpoint with every kind of caller, in AUTH_MODE=required."""
    api = await make_api()
    wrong = []
    for method, path, body, role in ENDPOINTS:
        for caller in CALLERS:
            response = await api.call(method, path, body, api.keys.get(caller))
            want = expected_status(role, caller)
            allowed = want is None and response.status_code in (200, 201)
            refused = response.status_code == want and bool(response.json().get("error"))
            if not (allowed or refused):
                wrong.append(f"{method} {path} with {caller}: {response.status_code} {response.text[:120]}")
    assert wrong == []
    admin_endpoints = sum(role == "admin" for *_, role in ENDPOINTS)
    assert api.rejected("unauthorized") == 3 * len(ENDPOINTS)
    assert api.rejected("forbidden") == admin_endpoints


async def test_open_mode_lets_keyless_feedback_through_but_not_admin_or_bad_keys(make_api):
    api = await make_api(auth_mode="open")
    feedback = {"prediction_id": "{prediction}", "label": "POSITIVE"}
    assert (await api.call("POST", "/feedback", feedback)).status_code == 201
    assert (await api.call("POST", "/feedback", feedback, "sap_wrong")).status_code == 401
    assert (await api.call("GET", "/admin/keys")).status_code == 401
    assert (await api.call("GET", "/admin/keys", key=api.keys["admin key"])).status_code == 200


async def test_a_prediction_made_with_a_key_takes_feedback_only_from_that_key_or_an_admin(make_api, store_db,
                                                                                          caplog):
    """Another key, or no key in open mode, gets the answer an unknown id gets: it cannot relabel a prediction it
    did not make. A keyless prediction's id is all it takes to label it."""
    api = await make_api(auth_mode="open")
    owned = make_record("made with the predict key", api_key_id=api.ids["predict"])
    api.services.store.submit(owned)
    await wait_until(lambda: owned.id in stored_ids(store_db.url), what="the keyed prediction")
    feedback = {"prediction_id": owned.id, "label": "NEGATIVE"}
    unknown = await api.call("POST", "/feedback", {"prediction_id": "0" * 32, "label": "NEGATIVE"},
                             api.keys["spare"])
    with caplog.at_level(logging.WARNING, logger="server.auth"):
        for caller in ("spare", None):
            refused = await api.call("POST", "/feedback", feedback, caller and api.keys[caller])
            assert refused.status_code == 404, refused.text
            assert refused.json()["error"] == unknown.json()["error"].replace("0" * 32, owned.id)
    lines = [r.getMessage() for r in caplog.records if r.name == "server.auth"]
    assert len(lines) == 2 and all(line.startswith("security: 404") and owned.id in line for line in lines)
    assert api.ids["spare"] in lines[0] and "without a key" in lines[1]
    admin = api.keys["admin key"]
    assert (await api.call("GET", f"/predictions/{owned.id}", key=admin)).json()["feedback_label"] is None
    assert (await api.call("POST", "/feedback", feedback, api.keys["predict key"])).status_code == 201
    assert (await api.call("POST", "/feedback", {**feedback, "label": "POSITIVE"}, admin)).status_code == 201
    assert (await api.call("GET", f"/predictions/{owned.id}", key=admin)).json()["feedback_label"] == "POSITIVE"
    keyless = {"prediction_id": "{prediction}", "label": "NEGATIVE"}
    assert (await api.call("POST", "/feedback", keyless, api.keys["spare"])).status_code == 201


async def test_either_header_carries_the_key_and_any_other_form_is_refused_with_how_to_send_it(make_api):
    api = await make_api()
    admin = api.keys["admin key"]
    assert (await api.call("GET", "/admin/keys", key=admin, header="x-api-key")).status_code == 200
    assert (await api.call("GET", "/admin/keys", key=admin, header="bearer")).status_code == 200
    lowercase = await api.client.get("/admin/keys", headers={"Authorization": f"bearer  {admin} "})
    assert lowercase.status_code == 200
    tab = await api.client.get("/admin/keys", headers={"Authorization": f"Bearer\t{admin}"})
    assert tab.status_code == 200  # was "the Authorization header has no scheme"
    for authorization in (f"Basic {admin}", admin, "Bearer", "Bearer   "):  # another scheme, a bare key, no key
        refused = await api.client.get("/admin/keys", headers={"Authorization": authorization})
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
        assert "Authorization: Bearer <key>" in refused.json()["error"], authorization
        assert "X-API-Key" in refused.json()["error"]
    forbidden = await api.call("GET", "/admin/keys", key=api.keys["predict key"])
    assert forbidden.status_code == 403 and "www-authenticate" not in forbidden.headers


async def test_a_refusals_line_shows_the_path_requested_escaped_and_cut(make_api, caplog):
    """Percent-encoded ESC, NEL or U+2028 reached the text log raw, a %0A was dropped from the logged path, and a
    60 KB path was logged whole in every refusal's line."""
    api = await make_api()
    with caplog.at_level(logging.WARNING, logger="server.auth"):
        await api.client.get("/predictions/ab%0Acd%1B%5B31m%C2%85", headers={"Authorization": "Basic x"})
        await api.client.get("/predictions/" + "m" * 60_000, headers={"Authorization": "Basic x"})
    escaped, long = [r.getMessage() for r in caplog.records if r.name == "server.auth"]
    assert escaped.endswith(": GET /predictions/ab\\ncd\\x1b[31m\\x85 from 127.0.0.1"), escaped
    assert escaped.isprintable()
    assert long.endswith("m" * (200 - len("/predictions/")) + "… from 127.0.0.1"), long[-300:]


async def test_refusals_are_security_log_events_that_never_show_the_key(make_api, caplog):
    api = await make_api()
    guessed = "sap_guessed-key-123"
    with caplog.at_level(logging.WARNING, logger="server.auth"):
        await api.call("GET", "/admin/keys", key=guessed)
        await api.call("GET", "/admin/keys", key=guessed, header="x-api-key")
        await api.call("GET", "/admin/keys", key=api.keys["predict key"])
        await api.client.get("/admin/keys", headers={"Authorization": "Basic dXNlcjpodW50ZXIy"})
        await api.client.get("/admin/keys", headers={"Authorization": guessed})
        # the key without 'Bearer ' and with something after it: its first characters were named as the scheme
        with_more = await api.client.get("/admin/keys", headers={"Authorization": f"{guessed} and more"})
    lines = [r.getMessage() for r in caplog.records if r.name == "server.auth"]
    assert len(lines) == 6 and all(line.startswith(("security: 401", "security: 403")) for line in lines)
    assert "not a known scheme, not repeated" in lines[5] and "not a known scheme" in with_more.json()["error"]
    assert guessed[:8] not in with_more.text
    assert lines[0].startswith("security: 401 invalid API key (fingerprint ") and "/admin/keys" in lines[0]
    fingerprint = re.search(r"fingerprint (\w+)", lines[0]).group(1)
    assert f"fingerprint {fingerprint}" in lines[1]  # the same wrong key, sent either way, reads the same
    assert fingerprint not in hashlib.sha256(guessed.encode()).hexdigest()  # keyed: no offline guess check
    assert lines[2].startswith("security: 403") and api.ids["predict"] in lines[2]
    assert "'Basic'" in lines[3] and "without a scheme" in lines[4]
    for line in lines[3:]:  # not Bearer: nothing derived from the credentials
        assert "fingerprint " not in line and not re.search(r"[0-9a-f]{8}", line), line
    assert guessed not in caplog.text and "dXNlcjpodW50ZXIy" not in caplog.text
    assert api.keys["predict key"] not in caplog.text
    assert api.rejected("unauthorized") == 5 and api.rejected("forbidden") == 1


async def test_a_revoked_key_is_refused_on_its_next_request(make_api):
    api = await make_api()
    admin = api.keys["admin key"]
    created = (await api.call("POST", "/admin/keys", {"name": "temp", "role": "predict"}, admin)).json()
    assert "shown again" in created["note"]
    feedback = {"prediction_id": "{prediction}", "label": "POSITIVE"}
    assert (await api.call("POST", "/feedback", feedback, created["key"])).status_code == 201
    listed = (await api.call("GET", "/admin/keys", key=admin)).json()["keys"]
    assert created["key"] not in str(listed) and created["id"] in [k["id"] for k in listed]
    assert (await api.call("DELETE", f"/admin/keys/{created['id']}", key=admin)).json()["revoked_at"]
    refused = await api.call("POST", "/feedback", feedback, created["key"])
    assert refused.status_code == 401 and "revoked" in refused.json()["error"]
    assert (await api.call("DELETE", "/admin/keys/nope", key=admin)).status_code == 404
    forged = await api.call("POST", "/admin/keys", {"name": "ops\nfake\tadmin", "role": "predict"}, admin)
    assert forged.status_code == 422 and "one line of text" in forged.json()["error"], forged.text


async def test_store_routes_answer_data_and_actionable_errors(make_api):
    api = await make_api()
    admin = api.keys["admin key"]
    page = (await api.call("GET", "/predictions?label=POSITIVE&limit=1", key=admin)).json()
    assert [p["id"] for p in page["items"]] == [api.ids["prediction"]] and page["next_offset"] is None
    assert (await api.call("GET", "/predictions?label=NEGATIVE", key=admin)).json()["items"] == []
    missing = await api.call("GET", "/predictions/nope", key=admin)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    unknown = await api.call("POST", "/feedback", {"prediction_id": "nope", "label": "POSITIVE"}, admin)
    assert unknown.status_code == 404 and "retry" in unknown.json()["error"]
    misspelt = await api.call("POST", "/feedback", {"prediction_id": "{prediction}", "labl": "POSITIVE"}, admin)
    assert misspelt.status_code == 422 and "labl" in misspelt.json()["error"], misspelt.text
    extra = await api.call("POST", "/feedback", {"prediction_id": "{prediction}", "label": "POSITIVE", "by": "me"},
                           admin)
    assert extra.status_code == 422 and "by" in extra.json()["error"], extra.text
    assert (await api.call("POST", "/feedback", {"prediction_id": "{prediction}", "label": "NEGATIVE"},
                           admin)).status_code == 201
    export = await api.call("GET", "/feedback/export", key=admin)
    assert export.text == "text\tlabel\na fine film\tNEGATIVE\n"
    assert export.headers["content-type"].startswith("text/tab-separated-values")


async def test_key_checks_while_the_database_is_down(make_api, store_db):
    """Known keys pass from the cache; what the route itself needs from the database is still 503."""
    api = await make_api()
    await asyncio.to_thread(store_db.down)
    listed = await api.call("GET", "/admin/keys", key=api.keys["admin key"])
    unknown = await api.call("GET", "/admin/keys", key="sap_never-issued")
    if store_db.backend == "postgresql":
        assert listed.status_code == 503 and "prediction database is unavailable" in listed.json()["error"]
        assert unknown.status_code == 503 and "cannot be checked" in unknown.json()["error"]
        assert int(unknown.headers["Retry-After"]) >= 1
        assert api.rejected("unauthorized") == 0  # a known key was let through, not refused
    else:  # a locked SQLite still answers reads: keys and the list keep working
        assert listed.status_code == 200 and unknown.status_code == 401


def test_a_flood_of_refusals_is_logged_up_to_a_budget_then_counted_in_one_line(monkeypatch, caplog):
    """Every 401 wrote its own WARNING: 56 clients sending bad keys wrote 9,171 lines in 20 s (red team
    helper-69), enough to rotate the security lines that matter out of LOG_FILE in minutes."""
    now = [1000.0]
    monkeypatch.setattr(throttle.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(auth, "_refusal_lines", throttle.LineBudget(auth.log, 3, "security: %d in %.0f s, no more",
                                                                    "security: %d more in %.0f s (%d)"))
    caller = auth.Caller("POST", "/predict", "198.51.100.7")
    with caplog.at_level(logging.WARNING, logger="server.auth"):
        for _ in range(10):
            auth.log_refusal(401, "invalid API key", caller)
        now[0] += 61
        auth.log_refusal(401, "invalid API key", caller)
    lines = [record.getMessage() for record in caplog.records]
    refusal = "security: 401 invalid API key: POST /predict from 198.51.100.7"
    assert lines == [refusal] * 3 + ["security: 3 in 60 s, no more", "security: 7 more in 61 s (3)", refusal]
