"""Open Inference Protocol v2 over HTTP, driven by the client its users have: ``tritonclient.http``.

A real uvicorn server in a subprocess (``start_server``); the binary-data extension (tritonclient's default) and
plain JSON; answers checked against the native ``/predict`` for the same texts; errors as tritonclient surfaces
them; records stored once per text under the HTTP request id; API keys in headers when AUTH_MODE=required.
"""

from __future__ import annotations

import json
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from scripts.benchlib.serverproc import LiveServer, start_server, stop_server

TEXTS = ["a charming and often affecting journey", "the worst film of the year", "héllo wörld ✓"]


@pytest.fixture(scope="module")
def server(tiny_artifact, tmp_path_factory) -> Iterator[LiveServer]:
    live = start_server({"MODEL_PATH": str(tiny_artifact), "DRAIN_GRACE_S": "0"}, tmp_path_factory.mktemp("oip"))
    yield live
    stop_server(live)


@pytest.fixture(scope="module")
def client(server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=30)


def text_input(texts: list[str], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object), binary_data=binary)
    return tensor


def native(server: LiveServer, texts: list[str]) -> list[dict]:
    response = httpx.post(server.url + "/predict", json={"texts": texts}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def expect_error(call, status: str, *fragments: str) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as raised:
        call()
    assert raised.value.status() == status, raised.value
    for fragment in fragments:
        assert fragment in raised.value.message(), raised.value.message()
    return raised.value


def test_health_metadata_and_config_as_tritonclient_reads_them(server, client):
    health = httpx.get(server.url + "/health", timeout=30).json()
    name, version, labels = health["model"]["name"], health["model"]["version"], health["model"]["labels"]
    assert client.is_server_live() and client.is_server_ready()
    for model, model_version in (("sentiment", ""), (name, ""), (name, version)):
        assert client.is_model_ready(model, model_version)
        metadata = client.get_model_metadata(model, model_version)
        assert metadata["name"] == name and metadata["versions"] == [version]
        assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        assert [(o["name"], o["datatype"], o["shape"]) for o in metadata["outputs"]] == [
            ("label", "BYTES", [-1]), ("score", "FP32", [-1]), ("probabilities", "FP32", [-1, len(labels)])]
        config = client.get_model_config(model, model_version)
        assert config["max_batch_size"] == 0 and config["input"][0]["data_type"] == "TYPE_STRING"
    assert not client.is_model_ready("no-such-model")
    assert not client.is_model_ready(name, "no-such-version")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    expect_error(lambda: client.get_model_metadata("no-such-model"), "404", "no model named 'no-such-model'",
                 name)
    expect_error(lambda: client.get_model_config(name, "v0"), "404", "no version 'v0'", version)


@pytest.mark.parametrize("binary_input", [True, False], ids=["binary-input", "json-input"])
def test_infer_answers_every_output_as_predict_does(server, client, binary_input):
    expected = native(server, TEXTS)
    result = client.infer("sentiment", [text_input(TEXTS, binary_input)], request_id="req-7")
    answer = result.get_response()
    assert answer["id"] == "req-7" and answer["model_name"] != "sentiment"
    assert [o["name"] for o in answer["outputs"]] == ["label", "score", "probabilities"]
    assert all("binary_data_size" in o["parameters"] for o in answer["outputs"])  # tritonclient asks for binary
    assert [label.decode() for label in result.as_numpy("label")] == [p["label"] for p in expected]
    np.testing.assert_allclose(result.as_numpy("score"), [p["score"] for p in expected], rtol=1e-5)
    labels = list(expected[0]["probabilities"])
    np.testing.assert_allclose(result.as_numpy("probabilities"),
                               [[p["probabilities"][label] for label in labels] for p in expected], rtol=1e-5)
    assert result.as_numpy("probabilities").shape == (len(TEXTS), len(labels))


def test_only_the_requested_outputs_each_in_the_form_it_asks(server, client):
    expected = native(server, TEXTS[:2])
    outputs = [triton.InferRequestedOutput("score", binary_data=False),
               triton.InferRequestedOutput("label", binary_data=True)]
    result = client.infer("sentiment", [text_input(TEXTS[:2], True)], outputs=outputs)
    answer = result.get_response()
    assert [o["name"] for o in answer["outputs"]] == ["score", "label"]
    score, label = answer["outputs"]
    assert score["data"] == pytest.approx([p["score"] for p in expected], rel=1e-5) and "parameters" not in score
    assert label["parameters"]["binary_data_size"] > 0 and "data" not in label
    assert [v.decode() for v in result.as_numpy("label")] == [p["label"] for p in expected]


def test_plain_json_without_content_type_and_without_binary(server):
    """The protocol's JSON form from any HTTP client: no Content-Type needed, JSON outputs unless asked."""
    body = {"id": "plain", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": TEXTS[:2]}],
            "outputs": [{"name": "label"}]}
    response = httpx.post(server.url + "/v2/models/sentiment/infer", content=json.dumps(body), timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["outputs"] == [{"name": "label", "datatype": "BYTES", "shape": [2],
                                           "data": [p["label"] for p in native(server, TEXTS[:2])]}]


def test_binary_body_parsed_by_hand_matches_the_extension(server):
    """The wire format itself: header length, 4-byte little-endian element lengths, raw FP32 back."""
    elements = [text.encode() for text in TEXTS]
    raw = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3],
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "score", "parameters": {"binary_data": True}}]}).encode()
    response = httpx.post(server.url + "/v2/models/sentiment/infer", content=header + raw,
                          headers={"Inference-Header-Content-Length": str(len(header))}, timeout=30)
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    answer = json.loads(response.content[:length])
    assert answer["outputs"][0]["parameters"]["binary_data_size"] == 12 == len(response.content) - length
    scores = np.frombuffer(response.content[length:], dtype="<f4")
    np.testing.assert_allclose(scores, [p["score"] for p in native(server, TEXTS)], rtol=1e-5)


def test_errors_reach_tritonclient_with_the_servers_message(client):
    good = text_input(TEXTS[:1], True)
    expect_error(lambda: client.infer("no-such-model", [good]), "404", "no model named 'no-such-model'")
    expect_error(lambda: client.infer("sentiment", [good], model_version="0"), "404", "no version '0'")
    expect_error(lambda: client.infer("sentiment", [text_input(["   "], True)]), "422", "empty or only whitespace")
    wrong_type = triton.InferInput("text", [1], "FP32")
    wrong_type.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    expect_error(lambda: client.infer("sentiment", [wrong_type]), "400", "datatype 'FP32'", "BYTES")
    wrong_name = triton.InferInput("sentence", [1], "BYTES")
    wrong_name.set_data_from_numpy(np.array(["x"], dtype=object))
    expect_error(lambda: client.infer("sentiment", [wrong_name]), "400", "unknown input 'sentence'")
    column = triton.InferInput("text", [1, 1], "BYTES")
    column.set_data_from_numpy(np.array([["x"]], dtype=object))
    expect_error(lambda: client.infer("sentiment", [column]), "400", "shape [1, 1]", "[N]")
    expect_error(lambda: client.infer("sentiment", [good], outputs=[triton.InferRequestedOutput("logits")]), "400",
                 "unknown output 'logits'", "label, score, probabilities")


def one_text(**extra) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], **extra}]}


@pytest.mark.parametrize("header, binary, fragment", [
    ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": ["a", "b"]}]}, None,
     "shape [3] but 2 elements"),
    ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": ["1"], "data": ["a"]}]}, None, "inputs[0].shape[0]"),
    ({"inputs": []}, None, "no inputs"),
    (one_text(), None, "no 'data'"),
    (b'{"inputs": [', None, "not valid JSON"),
    (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", None, "not valid JSON: depth limit"),  # json.loads: a 500
    (b'\xff\xfe{"inputs": []}', None, "not UTF-8 (byte 0xff at offset 0)"),  # was orjson's "surrogates not allowed"
    (b"[1]", None, "JSON object"),
    # orjson kept a key's last copy, where a proxy reading the first would judge another request (helper-100)
    (b'{"inputs": [], "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a: b"]}]}', None,
     "not valid JSON: the key 'inputs' is sent twice in one object"),
    (b'{"inputs": [{"name": "mask", "name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}', None,
     "the key 'name' is sent twice in one object"),
    # was orjson's "no low surrogate in string": the header is read again, and that reader names the repeat
    (b'{"parameters": {"\\ud800": 1, "\\ud800": 2}, ' + json.dumps(one_text(data=["a"]))[1:].encode(), None,
     "not valid JSON: the key '\\ud800' is sent twice"),
    # orjson refuses the number; the other reader took it as inf, the Infinity it refuses (red team helper-102)
    (b'{"parameters": {"a": 1e999}, ' + json.dumps(one_text(data=["a"]))[1:].encode(), None,
     "not valid JSON: number is infinity"),
    (one_text(data=["a"], parameters={"shared_memory_region": "r"}), None, "shared-memory"),
    ({**one_text(data=["a"]), "outputs": [{"name": "label"}, {"name": "label"}]}, None, "requested twice"),
    ({**one_text(data=["a"]), "outputs": [{"name": "label", "parameters": {"classification": 2}}]}, None,
     "classification extension"),
    # an output into a shared-memory region was answered inline with 200 (red team helper-66)
    ({**one_text(data=["a"]), "outputs": [{"name": "score", "parameters": {"shared_memory_region": "out0",
                                                                            "shared_memory_byte_size": 4}}]}, None,
     "shared-memory tensors are not supported: leave out the output's shared_memory_region"),
    (one_text(parameters={"binary_data_size": 7}), b"\x05\x00\x00\x00abc", "declares 5 bytes but 3 remain"),
    (one_text(parameters={"binary_data_size": 9}), b"\x01\x00\x00\x00a", "claims 9 bytes"),
    (one_text(parameters={"binary_data_size": 5}), b"\x01\x00\x00\x00\xff", "is not UTF-8"),
    (one_text(parameters={"binary_data_size": 10}), b"\x01\x00\x00\x00a\x01\x00\x00\x00b",
     "more than the 1 elements its shape says"),
    (one_text(data=["a"]), b"junk", "4 bytes after the inference header belong to no input"),
    (one_text(data=["a"], parameters={"binary_data_size": 5}), b"\x01\x00\x00\x00a", "both 'data' and"),
    ({"inputs": [{"name": "text", "datatype": "INT32", "shape": [2], "data": [1, 2]}]}, None,
     "input 'text' has datatype 'INT32'; send one input named 'text', datatype BYTES"),  # gRPC's words, not pydantic's
    ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["great"]},
                 {"name": "mask", "datatype": "INT32", "shape": [1], "data": [1]}]}, None,
     "inputs[1].data[0]"),  # another input's numbers: not blamed on 'text'
    # BYTES holding no string: named as a text is (was pydantic's "inputs[0].data[1]: Input should be a valid string")
    (one_text(data=["a", 2]), None, "text[1] is a number, not a string: BYTES data hold texts"),
    (one_text(data=[True]), None, "text[0] is a boolean, not a string"),
    (one_text(data=[["a"], ["b"]]), None, "text[0] is a list, not a string: BYTES data hold texts, each a JSON "
                                          "string in a flat list"),
    (one_text(data=[None]), None, "text[0] is null, not a string"),
    ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]},  # which 'text' is meant?
                 {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["c", 2]}]}, None, "inputs[1].data[1]"),
])
def test_malformed_requests_are_400_saying_what_to_fix(server, header, binary, fragment):
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    headers = {} if binary is None else {"Inference-Header-Content-Length": str(len(encoded))}
    response = httpx.post(server.url + "/v2/models/sentiment/infer", content=encoded + (binary or b""),
                          headers=headers, timeout=30)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"], response.json()


@pytest.mark.parametrize("depth", [480, 700, 1000])
def test_a_header_nested_as_deep_as_orjson_reads_is_answered_not_a_500(server, depth):
    """A recursive count of its keys ran out of Python's stack from ~480 levels: 500 (red team helper-102). A key
    sent twice at the bottom is found; without one the request is answered."""
    rest = json.dumps(one_text(data=["a great film"]))[1:].encode()
    for innermost, status in ((b'{"k": 1, "k": 2}', 400), (b'{"k": 1}', 200)):
        body = b'{"parameters": {"z": ' + b"[" * depth + innermost + b"]" * depth + b"}, " + rest
        response = httpx.post(server.url + "/v2/models/sentiment/infer", content=body, timeout=30)
        assert response.status_code == status, response.text
    error = httpx.post(server.url + "/v2/models/sentiment/infer", timeout=30, content=b'{"parameters": {"z": '
                       + b"[" * depth + b'{"k": 1, "k": 2}' + b"]" * depth + b"}, " + rest).json()["error"]
    # past Python's own reader's depth (which names the key) the refusal says how deep it is instead
    assert "the key 'k' is sent twice" in error or (depth == 1000 and "nested too deeply" in error), error


@pytest.mark.parametrize("length, fragment", [  # a bare parser error named neither the header nor the fix
    (None, "must say the header's length in Inference-Header-Content-Length"),
    (4, "(Inference-Header-Content-Length) are not valid JSON: unexpected content after document"),
    (-1, "(Inference-Header-Content-Length) are not valid JSON: unexpected end of data"),
])
def test_a_binary_body_whose_header_length_is_missing_or_wrong_says_so(server, length, fragment):
    header = json.dumps(one_text(parameters={"binary_data_size": 8})).encode()
    headers = {} if length is None else {"Inference-Header-Content-Length": str(len(header) + length)}
    response = httpx.post(server.url + "/v2/models/sentiment/infer", content=header + b"\x04\x00\x00\x00good",
                          headers=headers, timeout=30)
    assert response.status_code == 400 and fragment in response.json()["error"], response.json()


def test_a_lone_surrogate_is_a_422_naming_the_text_as_on_every_other_route(server):
    """orjson refuses the escape ("not valid JSON: no low surrogate in string", 400): the header is read again as
    the other routes read JSON, and the text refused by name (red team helper-66)."""
    response = httpx.post(server.url + "/v2/models/sentiment/infer", timeout=30,
                          content=b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[2],"data":["ok","\\ud800"]}]}')
    assert response.status_code == 422, response.text
    assert response.json() == {"error": "text[1]: contains an unpaired surrogate (U+D800) at character 0; send "
                                        "valid Unicode text (a JSON \\uD800-\\uDFFF escape must be half of a pair)",
                               "type": "invalid_input"}


@pytest.mark.parametrize("binary", [False, True])
def test_an_id_with_a_lone_surrogate_is_refused_before_the_texts_are_classified(server, binary):
    """The id is echoed in the answer, whose JSON cannot hold the surrogate: the text was classified, its record
    stored, and the answer failed with a 500 (red team helper-73). Refused while the request is read, nothing is
    classified."""
    request_id = f"oip-surrogate-id-{binary}"
    if binary:
        header = b'{"id":"\\udfff","inputs":[{"name":"text","datatype":"BYTES","shape":[1],' \
                 b'"parameters":{"binary_data_size":8}}]}'
        content, headers = header + b"\x04\x00\x00\x00good", {"Inference-Header-Content-Length": str(len(header))}
    else:
        content, headers = b'{"id":"\\ud800","inputs":[{"name":"text","datatype":"BYTES","shape":[1],' \
                           b'"data":["good"]}]}', {}
    response = httpx.post(server.url + "/v2/models/sentiment/infer", content=content,
                          headers={**headers, "X-Request-ID": request_id}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("invalid inference request: id: contains an unpaired surrogate (U+D")


@pytest.mark.parametrize("declared", ["99", "-1", "x", b"\xb2", "1" * 5000])  # '²' and 5000 digits were a 500
def test_a_header_length_that_is_not_within_the_body_is_400(server, declared):
    response = httpx.post(server.url + "/v2/models/sentiment/infer", content=b"{}",
                          headers={"Inference-Header-Content-Length": declared}, timeout=30)
    assert response.status_code == 400 and "Inference-Header-Content-Length" in response.json()["error"]


def test_a_header_length_sent_twice_is_400_whichever_copy_is_right(server):
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["good"]}]}).encode()
    for copies in ([str(len(header)), "3"], ["3", str(len(header))], [str(len(header))] * 2):
        response = httpx.post(server.url + "/v2/models/sentiment/infer", content=header, timeout=30,
                              headers=[("Inference-Header-Content-Length", copy) for copy in copies])
        assert response.status_code == 400, (copies, response.text)
        assert "Inference-Header-Content-Length is sent 2 times" in response.json()["error"], response.text


def test_too_many_texts_or_too_large_a_body_is_413(server):
    too_many = {"name": "text", "datatype": "BYTES", "shape": [257], "parameters": {"binary_data_size": 0}}
    encoded = json.dumps({"inputs": [too_many]}).encode()
    response = httpx.post(server.url + "/v2/models/sentiment/infer", content=encoded,
                          headers={"Inference-Header-Content-Length": str(len(encoded))}, timeout=30)
    assert response.status_code == 413 and "MAX_TEXTS_PER_REQUEST" in response.json()["error"]
    huge = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x" * 1_100_000]}]})
    response = httpx.post(server.url + "/v2/models/sentiment/infer", content=huge, timeout=30)
    assert response.status_code == 413 and "MAX_REQUEST_BYTES" in response.json()["error"]


def test_infer_is_counted_under_its_route_and_recorded_once_per_text(tiny_artifact, tmp_path):
    live = start_server({"MODEL_PATH": str(tiny_artifact), "DRAIN_GRACE_S": "0"}, tmp_path)
    try:
        client = triton.InferenceServerClient(live.url.removeprefix("http://"), network_timeout=30)
        client.infer("sentiment", [text_input(TEXTS, True)], headers={"X-Request-ID": "oip-http-1"})
        metrics = httpx.get(live.url + "/metrics", timeout=30).text
        assert 'sentiment_requests_total{endpoint="/v2/models/{name}/infer",status="200"} 1.0' in metrics
    finally:
        assert stop_server(live) == 0
    with sqlite3.connect(tmp_path / "live.db") as db:
        rows = db.execute("SELECT text FROM predictions WHERE request_id = 'oip-http-1'").fetchall()
    assert sorted(text for (text,) in rows) == sorted(TEXTS)


def create_key(database_url: str, role: str) -> str:
    created = subprocess.run([sys.executable, "-m", "server.cli", "keys", "create", "--database-url", database_url,
                              "--name", f"oip-{role}", "--role", role], capture_output=True, text=True, timeout=60,
                             check=True)
    return created.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def keyed(tiny_artifact, tmp_path_factory) -> Iterator[tuple[LiveServer, str]]:
    tmp = tmp_path_factory.mktemp("oip-keyed")
    key = create_key(f"sqlite:///{Path(tmp)}/live.db", "predict")
    live = start_server({"MODEL_PATH": str(tiny_artifact), "AUTH_MODE": "required", "DRAIN_GRACE_S": "0"}, tmp)
    yield live, key
    stop_server(live)


def test_auth_required_takes_the_key_from_either_header(keyed):
    live, key = keyed
    client = triton.InferenceServerClient(live.url.removeprefix("http://"), network_timeout=30)
    assert client.is_server_ready() and client.get_model_metadata("sentiment")["name"]  # open, like /health
    text = text_input(TEXTS[:1], True)
    expect_error(lambda: client.infer("sentiment", [text]), "401", "API key", "Authorization: Bearer")
    expect_error(lambda: client.infer("sentiment", [text], headers={"Authorization": "Bearer wrong"}), "401",
                 "invalid API key")
    for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}):
        assert client.infer("sentiment", [text], headers=headers).as_numpy("label").shape == (1,)
