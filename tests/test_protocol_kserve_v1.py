"""KServe v1 (server/protocols/kserve_v1.py) over plain HTTP against a real uvicorn server with AUTH_MODE=required:
model listing and readiness, ``:predict`` agreeing with the native API, its records, the errors, the drain."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from scripts.benchlib.serverproc import stop_server
from server.app import create_app
from server.config import load_settings
from tests.protocol_fixtures import KeyedServer, start_keyed_server, stored_rows

TEXTS = ["a gripping, funny and moving film", "a dull, tedious mess", "fine", "a dull, tedious mess"]
ALIAS = "sentiment"


@pytest.fixture(scope="module")
def server(tiny_artifact, tmp_path_factory) -> Iterator[KeyedServer]:
    keyed = start_keyed_server(tiny_artifact, tmp_path_factory.mktemp("kserve"), MAX_TEXTS_PER_REQUEST="8")
    yield keyed
    stop_server(keyed.live)


@pytest.fixture(scope="module")
def model_name(tiny_artifact) -> str:
    return json.loads((tiny_artifact / "manifest.json").read_text())["name"]


def predict(server: KeyedServer, name: str, body: object, **headers: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models/{name}:predict", content=json.dumps(body), timeout=30,
                      headers={**server.auth, "content-type": "application/json", **headers})


def test_the_model_is_listed_and_ready_under_its_name_and_the_alias(server, model_name):
    assert httpx.get(server.url + "/", timeout=30).json() == {"status": "alive"}
    assert httpx.get(server.url + "/v1/models", timeout=30).json() == {"models": [model_name, ALIAS]}
    for name in (model_name, ALIAS):
        ready = httpx.get(f"{server.url}/v1/models/{name}", timeout=30)
        assert ready.status_code == 200 and ready.json() == {"name": name, "ready": True}
    unknown = httpx.get(f"{server.url}/v1/models/other", timeout=30)
    assert unknown.status_code == 404
    assert unknown.json() == {"error": f"model 'other' is not served here; this server serves {model_name!r} or "
                                       f"{ALIAS!r}", "type": "model_not_found"}


def test_predict_agrees_with_the_native_api_in_input_order_and_is_recorded(server, model_name):
    native = httpx.post(server.url + "/predict", json={"texts": TEXTS}, headers=server.auth, timeout=30).json()
    for name in (ALIAS, model_name):
        response = predict(server, name, {"instances": TEXTS}, **{"X-Request-ID": f"kserve-{name}"})
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert [set(p) for p in predictions] == [{"label", "score", "probabilities", "id"}] * len(TEXTS)
        for ours, theirs in zip(predictions, native["predictions"], strict=True):
            assert ours["label"] == theirs["label"]
            assert ours["probabilities"] == pytest.approx(theirs["probabilities"], abs=1e-5)
            assert ours["score"] == pytest.approx(max(ours["probabilities"].values()))
        rows = stored_rows(server.database, f"kserve-{name}", len(TEXTS))
        assert sorted(row["id"] for row in rows) == sorted(p["id"] for p in predictions)
        assert {row["api_key_id"] for row in rows} == {server.key_id}
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    assert 'sentiment_requests_total{endpoint="/v1/models/{name}:predict",status="200"} 2.0' in metrics


@pytest.mark.parametrize("name, body, status, fragment", [
    ("other", {"instances": ["a"]}, 404, "model 'other' is not served here"),
    (ALIAS, {"instances": []}, 422, "instances: List should have at least 1 item"),
    (ALIAS, {"instances": ["a", 5]}, 422, "instances[1]: Input should be a valid string"),
    (ALIAS, {"instances": ["a", " "]}, 422, "instances[1] is empty"),
    (ALIAS, {"instances": ["\ud800"]}, 422, "unpaired surrogate"),
    (ALIAS, {"inputs": ["a"]}, 422, "inputs: Extra inputs are not permitted"),
    (ALIAS, {"instances": ["a"] * 9}, 413, "MAX_TEXTS_PER_REQUEST"),
    (ALIAS, ["a"], 422, "Input should be a valid dictionary"),
])
def test_bad_requests_get_a_clear_error(server, name, body, status, fragment):
    response = predict(server, name, body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]


def test_predict_needs_a_key(server):
    response = httpx.post(f"{server.url}/v1/models/{ALIAS}:predict", json={"instances": ["a"]}, timeout=30)
    assert response.status_code == 401 and response.json()["type"] == "unauthorized"


def test_while_draining_the_model_is_not_ready_and_predict_is_refused(tiny_artifact, tmp_path):
    keyed = start_keyed_server(tiny_artifact, tmp_path, DRAIN_GRACE_S="20")
    try:
        keyed.live.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        ready = httpx.get(f"{keyed.url}/v1/models/{ALIAS}", timeout=30)
        while ready.status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
            ready = httpx.get(f"{keyed.url}/v1/models/{ALIAS}", timeout=30)
        assert ready.status_code == 503 and ready.json()["type"] == "draining" and "Retry-After" in ready.headers
        refused = predict(keyed, ALIAS, {"instances": ["a"]})
        assert refused.status_code == 503 and refused.json()["type"] == "draining"
    finally:
        stop_server(keyed.live)


def test_the_openapi_document_lists_the_routes_and_their_errors(tiny_artifact):
    paths = create_app(load_settings(model_path=tiny_artifact)).openapi()["paths"]
    assert {"401", "403", "404", "413", "415", "422", "503"} <= set(paths["/v1/models/{name}:predict"]["post"]
                                                                    ["responses"])
    assert {"404", "503"} <= set(paths["/v1/models/{name}"]["get"]["responses"])
    assert "get" in paths["/v1/models"] and "get" in paths["/"]
