"""Hugging Face / TEI (server/protocols/tei.py) against a real uvicorn server with AUTH_MODE=required.

``huggingface_hub``'s ``InferenceClient`` and ``AsyncInferenceClient`` as their users call them (``model=URL``,
``token=`` sent as ``Authorization: Bearer``), then TEI's shapes over plain HTTP: ``POST /predict`` with
``inputs``, ``POST /``, ``GET /info``, the timing headers, the options this model honours or refuses, the errors,
the records and metrics every protocol shares, and the OpenAPI document.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from huggingface_hub import AsyncInferenceClient, InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from tokenizers import Tokenizer

from scripts.benchlib.serverproc import stop_server
from server.app import create_app
from server.config import load_settings
from tests.model_fixtures import TINY_MAX_LENGTH
from tests.protocol_fixtures import KeyedServer, start_keyed_server, stored_rows

TEXTS = ["a gripping, funny and moving film", "a dull, tedious mess", "fine"]
LONG = "word " * (TINY_MAX_LENGTH * 2)


@pytest.fixture(scope="module")
def server(tiny_artifact, tmp_path_factory) -> Iterator[KeyedServer]:
    keyed = start_keyed_server(tiny_artifact, tmp_path_factory.mktemp("tei"))
    yield keyed
    stop_server(keyed.live)


def post(server: KeyedServer, path: str, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={**server.auth, **headers}, timeout=30)


def native(server: KeyedServer, texts: list[str]) -> list[dict[str, float]]:
    """Every label's probability per text, from the native /predict: what every protocol must agree with."""
    response = post(server, "/predict", {"texts": texts})
    assert response.status_code == 200, response.text
    return [p["probabilities"] for p in response.json()["predictions"]]


def as_ranked(probabilities: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(probabilities.items(), key=lambda item: item[1], reverse=True)


def pairs(elements) -> list[tuple[str, float]]:
    """``[{"label", "score"}]`` or huggingface_hub's output elements as (label, score) pairs."""
    return [(e["label"], e["score"]) if isinstance(e, dict) else (e.label, e.score) for e in elements]


def assert_ranked(got, probabilities: dict[str, float], top: int | None = None) -> None:
    """``got`` holds the labels best first with their probabilities, the first ``top`` of them when given."""
    expected = as_ranked(probabilities)[:top]
    assert [label for label, _ in pairs(got)] == [label for label, _ in expected]
    assert [score for _, score in pairs(got)] == pytest.approx([score for _, score in expected], abs=1e-5)


def test_inference_client_gets_every_label_best_first_and_top_k(server):
    client = InferenceClient(model=server.url, token=server.key)
    (expected,) = native(server, TEXTS[:1])
    every = client.text_classification(TEXTS[0])
    assert_ranked(every, expected)
    assert len(every) == len(expected) >= 2
    assert pairs(client.text_classification(TEXTS[0], top_k=1)) == pairs(every[:1])
    assert pairs(client.text_classification(TEXTS[0], top_k=10)) == pairs(every)
    assert pairs(client.text_classification(TEXTS[0], function_to_apply="softmax")) == pairs(every)


def test_async_inference_client_agrees_with_the_native_api(server):
    expected = native(server, TEXTS)

    async def classify_all() -> list[list]:
        client = AsyncInferenceClient(model=server.url, token=server.key)
        every = await asyncio.gather(*(client.text_classification(text) for text in TEXTS))
        best = await client.text_classification(TEXTS[1], top_k=1)
        return [*every, best]

    *every, best = asyncio.run(asyncio.wait_for(classify_all(), 60))
    for got, probabilities in zip(every, expected, strict=True):
        assert_ranked(got, probabilities)
    assert_ranked(best, expected[1], top=1)


@pytest.mark.parametrize("call, status, fragment", [
    (lambda c: c.text_classification("   "), 422, "empty"),
    (lambda c: c.text_classification("x", function_to_apply="sigmoid"), 422, "softmax"),
    (lambda c: c.text_classification("x", top_k=0), 422, "top_k"),
    (lambda c: c.text_classification("x" * 20_001), 413, "MAX_TEXT_CHARS"),
], ids=["blank", "sigmoid", "top_k 0", "too long"])
def test_the_client_shows_the_servers_error(server, call, status, fragment):
    with pytest.raises(HfHubHTTPError) as raised:
        call(InferenceClient(model=server.url, token=server.key))
    assert raised.value.response.status_code == status
    assert fragment in str(raised.value)


def test_a_wrong_token_is_refused_with_the_servers_message(server):
    with pytest.raises(HfHubHTTPError) as raised:
        InferenceClient(model=server.url, token="not-a-key").text_classification("x")
    assert raised.value.response.status_code == 401 and "invalid API key" in str(raised.value)
    keyless = httpx.post(server.url + "/", json={"inputs": "x"}, timeout=30)
    assert keyless.status_code == 401 and keyless.json()["type"] == "unauthorized"


def test_predict_answers_teis_shapes_and_keeps_the_native_one(server):
    expected = native(server, TEXTS)
    single = post(server, "/predict", {"inputs": TEXTS[0]})
    assert single.status_code == 200
    assert_ranked(single.json(), expected[0])
    assert post(server, "/predict", {"inputs": [TEXTS[0]]}).json() == single.json()
    batch = post(server, "/predict", {"inputs": [[text] for text in TEXTS], "truncate": True,
                                      "truncation_direction": "right", "raw_scores": False})
    assert batch.status_code == 200
    assert len(batch.json()) == len(TEXTS)
    for ranked, probabilities in zip(batch.json(), expected, strict=True):
        assert_ranked(ranked, probabilities)
    body = post(server, "/predict", {"text": TEXTS[0]}).json()
    assert set(body) == {"predictions", "model", "request_id"} and body["predictions"][0]["label"] == \
        as_ranked(expected[0])[0][0]


def test_root_answers_the_inference_api_shape(server):
    expected = native(server, TEXTS)
    one = post(server, "/", {"inputs": TEXTS[0], "parameters": {"top_k": None, "function_to_apply": None}})
    assert one.status_code == 200 and len(one.json()) == 1
    assert_ranked(one.json()[0], expected[0])
    batch = post(server, "/", {"inputs": [[text] for text in TEXTS], "parameters": {"top_k": 1}})
    assert len(batch.json()) == len(TEXTS)
    for ranked, probabilities in zip(batch.json(), expected, strict=True):
        assert_ranked(ranked, probabilities, top=1)


TIMED = ["timing headers: a first text never sent before", "and a second, somewhat longer one, also new", "x"]
STAGES = ("x-tokenization-time", "x-queue-time", "x-inference-time")


def test_timing_headers_say_what_teis_say(server, tiny_artifact):
    response = post(server, "/predict", {"inputs": [[text] for text in TIMED]})
    assert response.status_code == 200, response.text
    headers = response.headers
    assert headers["x-compute-type"] == "cpu"
    assert int(headers["x-compute-characters"]) == sum(len(text) for text in TIMED)
    tokenizer = Tokenizer.from_file(str(tiny_artifact / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=TINY_MAX_LENGTH)
    assert int(headers["x-compute-tokens"]) == sum(len(e.ids) for e in tokenizer.encode_batch(TIMED))  # [CLS] [SEP]
    stages = [int(headers[name]) for name in STAGES]  # whole ms, each floored
    assert all(stage >= 0 for stage in stages)
    assert sum(stages) <= int(headers["x-compute-time"]) <= int(headers["x-total-time"])  # disjoint parts of it


def test_a_request_answered_from_the_cache_computed_nothing(server):
    body = {"inputs": [["timing headers: cached once"], ["and twice"]]}
    assert int(post(server, "/predict", body).headers["x-compute-tokens"]) > 0
    again = post(server, "/predict", body).headers
    assert [again[name] for name in (*STAGES, "x-compute-tokens")] == ["0", "0", "0", "0"]
    assert int(again["x-compute-characters"]) == len("timing headers: cached once") + len("and twice")


@pytest.mark.parametrize("body, fragment", [
    ({"inputs": ["a", "b"]}, 'one pair of texts in TEI, not two texts; this model classifies single texts, not '
                             'pairs: to classify several texts send a batch, [["a"], ["b"]]'),
    ({"inputs": [["a"], ["b", "c"]]}, "inputs[1]: holds 2 strings (a pair in TEI)"),
    ({"inputs": [["a"], ["b", "c", "d", "e"]]}, "inputs[1]: holds 4 strings (TEI takes one text or a pair)"),
    ({"inputs": ["a", "b", "c"]}, "a list of 3 strings is not TEI input"),
    ({"inputs": []}, "must be a string, or a batch"),
    ({"inputs": [["a"], "b"]}, "inputs[1]: is not a list of one string"),
    ({"inputs": [["a"], ["\ud800"]]}, "inputs[1]: contains an unpaired surrogate (U+D800)"),  # was inputs: [1][0]
    ({"inputs": ["\ud800"]}, "inputs[0]: contains an unpaired surrogate (U+D800)"),  # a list of one text
    ({"inputs": [["a"], ["  "]]}, "inputs[1] is empty"),
    ({"inputs": "a", "raw_scores": True}, "raw_scores: true is not supported"),
    ({"inputs": "a", "truncation_direction": "middle"}, "truncation_direction"),
    ({"inputs": "a", "truncate": "yes"}, "truncate: Input should be a valid boolean"),
    ({"inputs": "a", "text": "b"}, 'exactly one of "text"'),
    ({"text": "a", "truncate": False}, 'truncate: TEI\'s options are taken only with "inputs"'),
    ({"inputs": "a", "parameters": {"top_k": 1}}, "parameters"),
])
def test_predict_refuses_what_tei_or_this_model_would_not_take(server, body, fragment):
    response = httpx.post(server.url + "/predict", headers={**server.auth, "content-type": "application/json"},
                          content=json.dumps(body), timeout=30)
    assert response.status_code == 422, response.text
    assert fragment in response.json()["error"]


@pytest.mark.parametrize("path", ["/predict", "/"])
def test_a_batch_past_max_texts_is_refused_by_its_count_before_any_item_is_read(server, path):
    """Every item was checked first (in Python: 100,000 one-letter items held the event loop 200 ms, twice on
    /predict); a bad item past the limit now changes nothing."""
    batch = [["a"]] * 256 + [[1]]
    response = post(server, path, {"inputs": batch})
    assert response.status_code == 413 and response.json()["type"] == "too_large", response.text
    assert response.json()["error"] == ("257 texts in one request; at most 256 (MAX_TEXTS_PER_REQUEST): split the "
                                        "request")
    assert post(server, path, {"inputs": batch[1:]}).status_code == 422  # within the limit: every item is read


def test_truncate_false_and_left_truncation_refuse_a_text_the_model_would_cut(server):
    for options in ({"truncate": False}, {"truncation_direction": "left"}, {"truncation_direction": "Left"}):
        refused = post(server, "/predict", {"inputs": [["short"], [LONG]], **options})
        assert refused.status_code == 422 and refused.json()["type"] == "input_too_long"
        assert f"inputs[1] is longer than the model's {TINY_MAX_LENGTH} tokens" in refused.json()["error"]
        assert post(server, "/", {"inputs": "short", **options}).status_code == 200
    assert post(server, "/predict", {"inputs": LONG, "truncate": True}).status_code == 200
    assert post(server, "/predict", {"inputs": LONG}).status_code == 200, "the server's default: truncate"


def test_strict_truncation_is_not_overridden_by_truncate_true(make_settings):
    with TestClient(create_app(make_settings(strict_truncation=True))) as client:
        assert client.get("/info").json()["auto_truncate"] is False
        refused = client.post("/predict", json={"inputs": LONG, "truncate": True})
        assert refused.status_code == 422 and refused.json()["type"] == "input_too_long"
        assert client.post("/predict", json={"inputs": "short", "truncate": False}).status_code == 200


def test_info_describes_the_served_model(server, tiny_artifact):
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    info = httpx.get(server.url + "/info", timeout=30).json()
    labels = manifest["labels"]
    assert info["model_id"] == info["served_model_name"] == manifest["name"]
    assert info["model_type"] == {"classifier": {"id2label": {str(i): label for i, label in enumerate(labels)},
                                                 "label2id": {label: i for i, label in enumerate(labels)}}}
    assert info["max_input_length"] == manifest["max_sequence_length"]
    served = manifest["variants"][info["model_variant"]]["file"]
    assert info["model_sha"] == manifest["files"][served]["sha256"]
    assert info["model_dtype"] == {"fp32": "float32", "int8": "int8", "fp16": "float16"}[info["model_variant"]]
    assert (info["max_client_batch_size"], info["max_batch_tokens"], info["auto_truncate"]) == (256, 8192, True)


def test_every_answer_is_recorded_with_its_key_and_counted(server):
    request_id = "tei-records-1"
    client = InferenceClient(model=server.url, token=server.key, headers={"X-Request-ID": request_id})
    client.text_classification(TEXTS[0])
    post(server, "/predict", {"inputs": [[TEXTS[1]], [TEXTS[2]]]}, **{"X-Request-ID": request_id})
    rows = stored_rows(server.database, request_id, 3)
    assert sorted(row["text"] for row in rows) == sorted(TEXTS)
    assert {row["api_key_id"] for row in rows} == {server.key_id}
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    assert 'sentiment_requests_total{endpoint="/",status="200"}' in metrics


def test_the_openapi_document_lists_the_routes_and_their_errors(tiny_artifact):
    document = create_app(load_settings(model_path=tiny_artifact)).openapi()
    root = document["paths"]["/"]["post"]
    assert {"401", "403", "413", "415", "422", "503"} <= set(root["responses"])
    assert "inputs" in json.dumps(document["components"]["schemas"]["HfRequest"])
    assert "get" in document["paths"]["/info"]
    predict = document["paths"]["/predict"]["post"]
    answers = json.dumps(predict["responses"]["200"])
    assert "PredictResponse" in answers and "LabelScore" in answers
    assert "inputs" in document["components"]["schemas"]["PredictRequest"]["properties"]
