"""Hostile input against a real uvicorn server: every refusal is a JSON error with "error" and "type", never a 500.

The cases are the ones attackers found (issue 13): lone surrogates, unbounded query parameters, a chunked body
over the limit, invalid UTF-8, a 5,000-digit number, deep nesting, Content-Encoding, the wrong Content-Type,
HEAD, a trailing slash with a forged Host header. The server runs once per database backend: the query cases
reach the database, where SQLite and PostgreSQL overflow differently.
"""

from __future__ import annotations

import gc
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from scripts.benchlib.databases import postgres_database, sqlite_database
from scripts.benchlib.serverproc import LiveServer, start_server, stop_server
from server.app import create_app
from server.primitives import PayloadTooLarge
from server.protocols.oip_model import ALIAS

MAX_REQUEST_BYTES = 64 * 1024
JSON = {"content-type": "application/json"}


@dataclass
class Server:
    live: LiveServer
    admin: dict[str, str]  # headers carrying an admin key

    @property
    def url(self) -> str:
        return self.live.url

    def rejected(self, reason: str) -> float:
        metrics = httpx.get(self.url + "/metrics", timeout=30).text
        found = re.search(rf'^sentiment_rejected_requests_total{{reason="{reason}"}} (\S+)$', metrics, re.M)
        assert found, f"no rejected counter for {reason}"
        return float(found.group(1))

    def requests(self, endpoint: str, status: int) -> float:
        metrics = httpx.get(self.url + "/metrics", timeout=30).text
        found = re.search(rf'^sentiment_requests_total{{endpoint="{re.escape(endpoint)}",status="{status}"}} (\S+)$',
                          metrics, re.M)
        return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def server(request, tiny_artifact, tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp(f"hostile-{request.param}")
    if request.param == "sqlite":
        database = sqlite_database(tmp)
    else:
        database = postgres_database(request.getfixturevalue("store_pg_server"))
    with database as db:
        live = start_server({"MODEL_PATH": str(tiny_artifact), "DATABASE_URL": db.url, "DB_AUTO_MIGRATE": "true",
                             "AUTH_MODE": "open", "MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES)}, tmp)
        try:
            created = subprocess.run([sys.executable, "-m", "server.cli", "keys", "create", "--database-url", db.url,
                                      "--name", "hostile-admin", "--role", "admin"],
                                     capture_output=True, text=True, timeout=60, check=True)
            key = created.stdout.strip().splitlines()[-1]
            yield Server(live, {"Authorization": f"Bearer {key}"})
        finally:
            stop_server(live)


def refused(response: httpx.Response, status: int, error_type: str, *fragments: str) -> dict:
    """Assert the one error format: the status, JSON with "error" (naming each fragment) and "type"."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["type"] == error_type, body
    for fragment in fragments:
        assert fragment in body["error"], body
    assert response.headers["x-request-id"]
    return body


def test_a_lone_surrogate_is_422_naming_the_text(server):
    before = server.rejected("invalid")
    one = httpx.post(server.url + "/predict", content=b'{"text": "caf\\ud800"}', headers=JSON, timeout=30)
    refused(one, 422, "invalid_input", "text: contains an unpaired surrogate (U+D800) at character 3")
    many = httpx.post(server.url + "/predict", content=b'{"texts": ["a", "b", "c", "\\udfff", "e"]}', headers=JSON,
                      timeout=30)
    refused(many, 422, "invalid_input", "texts[3]: contains an unpaired surrogate (U+DFFF)")
    assert server.rejected("invalid") == before + 2
    paired = httpx.post(server.url + "/predict", content=b'{"text": "\\ud83d\\ude00 great"}', headers=JSON, timeout=30)
    assert paired.status_code == 200  # a surrogate pair is one character (U+1F600)


V2_PATH = f"/v2/models/{ALIAS}/infer"


@pytest.mark.parametrize("path, body, named", [
    ("/predict", {"text": " "}, "text is empty"),
    ("/predict", {"texts": ["a", "\u200b"]}, "texts[1] holds no character the model reads"),
    ("/predict", {"inputs": "x" * 20_001}, "inputs has 20001 characters"),
    ("/predict", {"inputs": [["a"], [" "]]}, "inputs[1] is empty"),
    ("/predict", {"inputs": [" "]}, "inputs[0] is empty"),  # a list of one text
    (f"/v1/models/{ALIAS}:predict", {"instances": ["a", "b", "\u200b"]}, "instances[2] holds no character"),
    (V2_PATH, {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", " "]}]},
     "text[1] is empty"),
])
def test_a_refused_text_is_named_as_its_protocol_spells_it(server, path, body, named):
    """Every protocol's refusals named the text ``texts[i]``, /predict's spelling, whatever the client had sent."""
    answer = httpx.post(server.url + path, json=body, timeout=30)
    assert answer.status_code in (400, 413, 422) and named in answer.json()["error"], answer.text


def test_a_lone_surrogate_in_a_reload_path_is_422(server):
    response = httpx.post(server.url + "/admin/reload", content=b'{"model_path": "\\ud800"}',
                          headers={**JSON, **server.admin}, timeout=30)
    refused(response, 422, "invalid_input", "model_path: contains an unpaired surrogate")


def test_a_line_break_in_a_reload_path_cannot_forge_a_log_line(server):
    """The text log wrote the path as it came: a newline in it began a line of the attacker's own (red team 59)."""
    forged = "2026-01-01 00:00:00,000 ERROR server.forged: injected"
    response = httpx.post(server.url + "/admin/reload", json={"model_path": f"/no/such/artifact\n{forged}\r\t\x1b[2J"},
                          headers=server.admin, timeout=30)
    assert response.status_code == 409, response.text
    escaped = f"/no/such/artifact\\n{forged}\\r\\t\\x1b[2J"
    deadline = time.monotonic() + 10
    while escaped not in server.live.log() and time.monotonic() < deadline:  # written by the log writer's thread
        time.sleep(0.05)
    lines = server.live.log().splitlines()
    assert [line for line in lines if escaped in line and "model reload from" in line], server.live.log()[-2000:]
    assert not [line for line in lines if line.startswith(forged)]


@pytest.mark.parametrize("query, fragment", [
    ("offset=99999999999999999999", "offset"),
    ("offset=-1", "offset"),
    ("limit=0", "limit"),
    ("limit=1001", "limit"),
    ("since=1700000000", "since: is a number"),
    ("label=POS%00ITIVE", "label: contains a NUL character"),
    ("model_version=" + "v" * 257, "model_version: String should have at most 256 characters"),  # was "items"
    ("label=" + "x" * 257, "label: String should have at most 256 characters"),
    # an unknown one answered every key's predictions unfiltered, and of two copies the last was kept (helper-106)
    ("lable=NEGATIVE", "unknown query parameter 'lable'; this route takes label, limit, model_version, offset"),
    ("api_key_id=abc", "unknown query parameter 'api_key_id'"),
    ("LIMIT=3", "unknown query parameter 'LIMIT'"),
    ("limit=1&limit=2", "query parameter 'limit' is sent twice"),
    ("label=POSITIVE&label=NEGATIVE", "query parameter 'label' is sent twice"),
])
def test_query_parameters_out_of_range_are_422_not_500(server, query, fragment):
    response = httpx.get(f"{server.url}/predictions?{query}", headers=server.admin, timeout=30)
    refused(response, 422, "invalid_input", fragment)


def test_a_time_bound_past_the_datetime_range_selects_like_the_range_end_not_500(server):
    """In UTC, 0001-01-01T00:00+01:00 is in year 0 and 9999-12-31T23:00-23:59 in year 10000 (OverflowError)."""
    def ids(query: str) -> list[str]:
        response = httpx.get(f"{server.url}/predictions?limit=1000&{query}", headers=server.admin, timeout=30)
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    predicted = httpx.post(server.url + "/predict", json={"text": "a row to select"}, timeout=30)
    (row_id,) = [p["id"] for p in predicted.json()["predictions"]]
    deadline = time.monotonic() + 30
    while row_id not in ids(""):  # records reach the database shortly after the answer
        assert time.monotonic() < deadline, f"prediction {row_id} not in the database after 30 s"
        time.sleep(0.1)
    assert row_id in ids("since=0001-01-01T00:00:00%2B01:00") and row_id in ids("until=9999-12-31T23:00:00-23:59")
    assert ids("since=9999-12-31T23:00:00-23:59") == [] == ids("until=0001-01-01T00:00:00%2B01:00")


def test_a_nul_in_a_path_parameter_is_422(server):
    response = httpx.get(server.url + "/predictions/abc%00def", headers=server.admin, timeout=30)
    refused(response, 422, "invalid_input", "prediction_id: contains a NUL character")


@pytest.mark.parametrize("method, path, name", [("GET", "/predictions/", "prediction_id"),
                                                ("DELETE", "/admin/keys/", "key_id")])
def test_an_id_longer_than_any_stored_one_is_422_not_looked_up(server, method, path, name):
    """A 5,000-character id went to the database and came back whole in the 404 (red team helper-106)."""
    response = httpx.request(method, server.url + path + "a" * 5000, headers=server.admin, timeout=30)
    refused(response, 422, "invalid_input", f"{name}: String should have at most 32 characters")
    assert "a" * 100 not in response.text


def test_a_chunked_body_over_the_limit_is_413_and_counted(server):
    def chunks() -> Iterator[bytes]:
        yield b'{"text": "'
        for _ in range(MAX_REQUEST_BYTES // 4096 + 2):
            yield b"x" * 4096
        yield b'"}'

    before = server.rejected("too_large")
    response = httpx.post(server.url + "/predict", content=chunks(), headers=JSON, timeout=30)
    assert "content-length" not in response.request.headers  # it really went chunked
    refused(response, 413, "too_large", "MAX_REQUEST_BYTES")
    declared = httpx.post(server.url + "/predict", content=b"x" * (MAX_REQUEST_BYTES + 1), headers=JSON, timeout=30)
    refused(declared, 413, "too_large", "MAX_REQUEST_BYTES")
    assert server.rejected("too_large") == before + 2


@pytest.mark.parametrize("body, fragment", [
    (b'{"text": "\xff\xfe bad bytes"}', "not UTF-8 (byte 0xff at offset 10)"),
    (b'{"text": ' + b"9" * 5000 + b"}", "digits"),
    (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    (b'{"text": "unterminated', "not valid JSON"),
])
def test_a_body_that_is_not_json_is_422_invalid_json(server, body, fragment):
    response = httpx.post(server.url + "/predict", content=body, headers=JSON, timeout=30)
    refused(response, 422, "invalid_json", "the body is not valid JSON", fragment)


# A body each JSON route would answer, and the ways of sending it that are not JSON (RFC 8259: UTF-8, no NaN or
# Infinity) which the framework's reader took (``json.loads(bytes)``: UTF-16/32, a byte-order mark, NaN, bytes that
# are not UTF-8 inside a string): a red team had 200 for each, where the same body on the fast path or v2 was refused.
JSON_ROUTES = {"/predict": {"text": "a great film"}, "/predict (TEI)": {"inputs": "a great film"},
               "/": {"inputs": "a great film"}, "/v1/models/default:predict": {"instances": ["a great film"]},
               "/feedback": {"prediction_id": "0" * 32, "label": "POSITIVE"}}


def _duplicated_first_key(body: dict, value: bytes, escaped: bool = False) -> bytes:
    """``body`` as JSON with its first key sent twice, first with ``value`` (overridden by the second); ``escaped``:
    that first copy's first letter written as a ``\\u`` escape (the same key to a JSON reader)."""
    text = json.dumps(body).encode()
    key = next(iter(body))
    written = (b"\\u%04x" % ord(key[0]) + key[1:].encode()) if escaped else key.encode()
    return b'{"' + written + b'": ' + value + b", " + text[1:]


NOT_JSON = {
    "utf-16 with a byte-order mark": (lambda body: json.dumps(body).encode("utf-16"), "not UTF-8 (byte 0xff at"),
    "utf-16-le": (lambda body: json.dumps(body).encode("utf-16-le"), "not valid JSON"),
    "utf-32-be": (lambda body: json.dumps(body).encode("utf-32-be"), "not valid JSON"),
    "utf-8 with a byte-order mark": (lambda body: b"\xef\xbb\xbf" + json.dumps(body).encode(), "byte-order mark"),
    "NaN overridden": (lambda body: _duplicated_first_key(body, b"NaN"), "NaN is not a JSON value"),
    "-Infinity overridden": (lambda body: _duplicated_first_key(body, b"-Infinity"), "-Infinity is not a JSON value"),
    "a surrogate's bytes overridden": (lambda body: _duplicated_first_key(body, b'"\xed\xa0\x80"'), "not UTF-8"),
    # every reader kept the last copy, where a proxy reading the first would judge another request (helper-100)
    "a key sent twice": (lambda body: _duplicated_first_key(body, b'"a: first copy"'), "is sent twice in one object"),
    "a key sent twice, once escaped": (lambda body: _duplicated_first_key(body, b'"other"', escaped=True),
                                       "is sent twice in one object"),
}


@pytest.mark.parametrize("route", list(JSON_ROUTES))
@pytest.mark.parametrize("encoding", list(NOT_JSON))
def test_a_body_that_is_not_rfc_8259_json_is_422_invalid_json_on_every_json_route(server, route, encoding):
    encode, fragment = NOT_JSON[encoding]
    response = httpx.post(server.url + route.split()[0], content=encode(JSON_ROUTES[route]), headers=JSON, timeout=30)
    refused(response, 422, "invalid_json", "the body is not valid JSON", fragment)


@pytest.mark.parametrize("route", list(JSON_ROUTES) + ["/v2/models/sentiment/infer"])
@pytest.mark.parametrize("charset, encoding", [("utf-16", "utf-16"), ("ISO-8859-1", "latin-1"), ('"cp1252"', "cp1252")])
def test_a_body_declared_in_a_charset_other_than_utf_8_is_415_naming_it(server, route, charset, encoding):
    """It was read as UTF-8 whatever it said: UTF-16 got "not UTF-8", Latin-1's "é" the same, and a charset whose
    ASCII bytes agree with UTF-8 would have been read as other text than the client sent (red team helper-100)."""
    payload = JSON_ROUTES.get(route, {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["ok"]}]})
    before = server.rejected("unsupported_media_type")
    response = httpx.post(server.url + route.split()[0], content=json.dumps(payload).encode(encoding), timeout=30,
                          headers={"content-type": f"application/json; charset={charset}"})
    named = charset.strip('"').lower()
    refused(response, 415, "unsupported_media_type", f"charset={named!r}", "send the body in UTF-8")
    assert server.rejected("unsupported_media_type") == before + 1


@pytest.mark.parametrize("parameters", ["charset*=utf-8''utf-16", "charset*0=utf; charset*1=-16"])
def test_a_charset_written_as_rfc_2231_says_is_read_as_such(server, parameters):
    response = httpx.post(server.url + "/predict", content=json.dumps({"text": "fine"}).encode("utf-16"), timeout=30,
                          headers={"content-type": f"application/json; {parameters}"})
    refused(response, 415, "unsupported_media_type", "charset='utf-16'")


@pytest.mark.parametrize("parameters", ["charset=utf-8; charset=utf-16", "charset=utf-16; charset=utf-8",
                                        "charset=utf-8; charset*=utf-8''utf-16"])
def test_a_charset_named_twice_is_400_as_a_content_type_sent_twice_is(server, parameters):
    """By its first copy, ``utf-8; utf-16`` was read as UTF-8 where another reader could take the other (red team
    helper-102)."""
    response = httpx.post(server.url + "/predict", content=b'{"text": "fine"}', timeout=30,
                          headers={"content-type": f"application/json; {parameters}"})
    refused(response, 400, "bad_request", "names a charset 2 times")


@pytest.mark.parametrize("charset", ["utf-8", "UTF-8", '"utf-8"', "us-ascii"])
def test_a_body_declared_as_utf_8_or_ascii_is_answered(server, charset):
    response = httpx.post(server.url + "/predict", content=json.dumps({"text": "café au lait"}).encode(), timeout=30,
                          headers={"content-type": f"application/json; charset={charset}"})
    assert response.status_code == 200, response.text


def test_a_charset_is_not_judged_without_a_body_nor_on_a_binary_one(server):
    """Every GET with a charset was 415, and v2's binary-data extension sent as ``application/octet-stream;
    charset=binary`` too (red team helper-102)."""
    for path in ("/ready", "/health", "/v2/models/sentiment"):
        response = httpx.get(server.url + path, headers={"content-type": "text/plain; charset=latin1"}, timeout=30)
        assert response.status_code == 200, (path, response.text)
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    response = httpx.post(server.url + "/v2/models/sentiment/infer", content=header + b"\x04\x00\x00\x00good",
                          timeout=30, headers={"content-type": "application/octet-stream; charset=binary",
                                               "Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 200, response.text


def test_texts_that_mention_nan_and_infinity_are_answered(server):
    """Texts holding the words are texts: only a number (``NaN``) is refused (``server.fastpath._parsed``)."""
    texts = ["NaN is not a number", "Avengers: Infinity War was fun", "-Infinity"]
    response = httpx.post(server.url + "/predict", json={"texts": texts}, timeout=30)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == len(texts) and all(p["label"] in ("NEGATIVE", "POSITIVE") for p in predictions)


def test_an_x_request_id_sent_twice_counts_by_its_first_copy_as_over_grpc(server):
    """HTTP took the last copy, gRPC's metadata and the key headers the first: a proxy logging one id could have
    been looking at another."""
    response = httpx.post(server.url + "/predict", json={"text": "fine"}, timeout=30,
                          headers=[("X-Request-ID", "first-copy"), ("X-Request-ID", "second-copy")])
    assert response.status_code == 200 and response.headers["x-request-id"] == "first-copy"
    assert response.json()["request_id"] == "first-copy"


def test_a_client_address_forged_in_x_forwarded_for_is_logged_quoted_as_no_address(server):
    """uvicorn takes the client from X-Forwarded-For when the peer is on loopback (a proxy on this host); the
    refusal's line showed that text as it came: ``from forged<TAB>  security: 401 fake line``."""
    def refusal_line(forwarded_for: str) -> str:
        marker = f"/predictions/marker{time.monotonic_ns()}"  # a path of its own: its line is this request's
        response = httpx.get(server.url + marker, headers={"X-Forwarded-For": forwarded_for}, timeout=30)
        assert response.status_code == 401, response.text
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            lines = [line for line in server.live.log().splitlines() if "security: 401" in line and marker in line]
            if lines:
                return lines[-1]
            time.sleep(0.05)
        pytest.fail(f"no refusal logged for {marker}")

    forged = refusal_line("10.0.0.1, forged-host\t  security: 401 \"fake\" line")
    assert forged.endswith(' from "forged-host\\t  security: 401 \\"fake\\" line" (not an address)'), forged
    assert refusal_line("203.0.113.9").endswith(" from 203.0.113.9")


@pytest.mark.parametrize("path, endpoint", [("/predict", "/predict"), ("/v2/models/sentiment/infer",
                                                                       "/v2/models/{name}/infer")])
def test_a_compressed_body_is_415_and_counted_under_its_route(server, path, endpoint):
    """Refused on its headers before the app routed it, it was counted under ``unmatched``."""
    before = server.rejected("unsupported_media_type"), server.requests(endpoint, 415)
    response = httpx.post(server.url + path, content=b'{"text": "fine"}',
                          headers={**JSON, "Content-Encoding": "gzip"}, timeout=30)
    refused(response, 415, "unsupported_media_type", "Content-Encoding 'gzip'")
    assert (server.rejected("unsupported_media_type"), server.requests(endpoint, 415)) == (before[0] + 1,
                                                                                            before[1] + 1)


def test_a_content_encoding_sent_twice_is_read_as_one_list_not_by_its_last_copy(server):
    """``gzip`` then ``identity`` as two headers was taken as an uncompressed body by its last copy alone (a gzipped
    body then got 422 "not UTF-8", a plain one 200) (red team helper-65)."""
    for copies in (["gzip", "identity"], ["identity", "gzip"]):
        response = httpx.post(server.url + "/predict", content=b'{"text": "fine"}', timeout=30, headers=[
            ("Content-Type", "application/json"), *(("Content-Encoding", copy) for copy in copies)])
        refused(response, 415, "unsupported_media_type", f"Content-Encoding '{', '.join(copies)}'")
    response = httpx.post(server.url + "/predict", content=b'{"text": "fine"}', timeout=30, headers=[
        ("Content-Type", "application/json"), ("Content-Encoding", "identity"), ("Content-Encoding", "identity")])
    assert response.status_code == 200


@pytest.mark.parametrize("path", ["/predict", "/v2/models/sentiment/infer"])
@pytest.mark.parametrize("types", [["application/json", "text/plain"], ["text/plain", "application/json"],
                                   ["application/json", "application/json"]])
def test_a_content_type_sent_twice_is_400_whatever_the_copies_say(server, path, types):
    """The first copy was read: ``application/json`` then ``text/plain`` was answered 200 and the other order 415,
    where a proxy reading the last copy would judge the request the other way."""
    body = b'{"text": "fine"}' if path == "/predict" else \
        b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["fine"]}]}'
    before = server.rejected("invalid")
    response = httpx.post(server.url + path, content=body, timeout=30,
                          headers=[("Content-Type", value) for value in types])
    refused(response, 400, "bad_request", "Content-Type sent 2 times: send it once")
    assert server.rejected("invalid") == before + 1
    response = httpx.post(server.url + path, content=body, timeout=30, headers=[("Content-Type", types[0])])
    judged_by_type = path == "/predict"  # the OIP route reads its body as JSON whatever the type says
    assert response.status_code == (415 if judged_by_type and types[0] != "application/json" else 200)


MANY = 15_000  # items of a list past MAX_TEXTS_PER_REQUEST that fit MAX_REQUEST_BYTES


@pytest.mark.parametrize("path, body", [
    ("/predict", b'{"texts": [%s]}' % b",".join([b"1"] * MANY)),
    ("/v1/models/sentiment:predict", b'{"instances": [%s]}' % b",".join([b"1"] * MANY)),
    ("/predict", b'{"\\u0069nputs": [%s]}' % b",".join([b"[1]"] * MANY)),  # "inputs", spelled with an escape
    ("/", b'{"inputs": [%s]}' % b",".join([b"[1]"] * MANY)),
    ("/v2/models/sentiment/infer",
     b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [%s]}]}' % b",".join([b"1"] * MANY)),
], ids=["texts", "kserve-instances", "tei-escaped-key", "hf-root", "oip-data"])
def test_a_list_past_max_texts_is_refused_by_its_count_not_item_by_item(server, path, body):
    """Each item was validated first: 300,000 that are not strings made as many errors, 1.2 s of the event loop
    and a 41 MB answer."""
    response = httpx.post(server.url + path, content=body, headers=JSON, timeout=30)
    refused(response, 413, "too_large", f"{MANY} texts in one request; at most 256 (MAX_TEXTS_PER_REQUEST)")


UNKNOWN_KEYS = b",".join(b'"k%d": 1' % n for n in range(3000))


@pytest.mark.parametrize("path, body, fields", [
    ("/predict", b'{"text": "fine", %s}' % UNKNOWN_KEYS, "send only text, texts, inputs"),
    ("/", b'{"inputs": "fine", "parameters": {"top_k": 1, %s}}' % UNKNOWN_KEYS, "send only top_k, function_to_apply"),
    ("/v1/models/sentiment:predict", b'{"instances": ["fine"], %s}' % UNKNOWN_KEYS, "send only instances"),
    ("/feedback", b'{"prediction_id": "x", "label": "POSITIVE", %s}' % UNKNOWN_KEYS, "send only prediction_id, label"),
], ids=["predict", "hf-parameters", "kserve", "feedback"])
def test_thousands_of_unknown_fields_are_one_problem_naming_twenty(server, path, body, fields):
    """One error each made 60,000 errors of a 750 KB body, whose conversion held the event loop 0.25-0.4 s per
    request (four such clients kept /ready waiting up to 0.8 s); now one error, found before the fields are read."""
    response = httpx.post(server.url + path, content=body, headers=JSON, timeout=30)
    error = refused(response, 422, "invalid_input", "3000 fields this body does not take ('k0', 'k1',", "'k19', ...)",
                    fields)
    assert len(error["detail"]) == 1 and error["detail"][0]["type"] == "extra_forbidden"
    assert len(response.content) < 4096


def test_a_few_unknown_fields_are_named_one_by_one(server):
    body = b'{"text": "fine", %s}' % b",".join(b'"k%d": 1' % n for n in range(20))
    error = refused(httpx.post(server.url + "/predict", content=body, headers=JSON, timeout=30), 422,
                    "invalid_input", "k0: Extra inputs are not permitted", "k19: Extra inputs are not permitted")
    assert len(error["detail"]) == 20


def test_a_body_with_thousands_of_problems_names_twenty(server):
    body = b'{"texts": [%s]}' % b",".join([b"1"] * 200)
    error = refused(httpx.post(server.url + "/predict", content=body, headers=JSON, timeout=30), 422,
                    "invalid_input", "texts[0]: Input should be a valid string", "and 180 more problems")
    assert len(error["detail"]) == 20


@pytest.mark.parametrize("headers, fragment", [
    ({"content-type": "text/plain"}, "not 'text/plain'"),
    ({"content-type": "application/x-www-form-urlencoded"}, "x-www-form-urlencoded"),
    ({}, "none was sent"),
])
def test_a_json_body_sent_as_another_media_type_is_415(server, headers, fragment):
    response = httpx.post(server.url + "/predict", content=b'{"text": "fine"}', headers=headers, timeout=30)
    refused(response, 415, "unsupported_media_type", "Content-Type: application/json", fragment)
    as_json = httpx.post(server.url + "/predict", content=b'{"text": "fine"}',
                         headers={"content-type": "application/json; charset=utf-8"}, timeout=30)
    assert as_json.status_code == 200


def test_unknown_paths_and_methods_are_json_404_and_405(server):
    before = server.rejected("not_found")
    refused(httpx.get(server.url + "/nope", timeout=30), 404, "not_found", "/nope")
    assert server.rejected("not_found") == before + 1
    wrong = httpx.put(server.url + "/predict", timeout=30)
    refused(wrong, 405, "method_not_allowed", "PUT", "POST")
    assert wrong.headers["allow"] == "POST"
    both = httpx.delete(server.url + "/admin/keys", headers=server.admin, timeout=30)
    refused(both, 405, "method_not_allowed")
    assert both.headers["allow"] == "GET, HEAD, POST"  # every route on the path, not the first one's


def test_a_trailing_slash_is_a_404_and_never_echoes_the_host_header(server):
    response = httpx.post(server.url + "/predict/", json={"text": "fine"}, headers={"Host": "evil.example"},
                          timeout=30, follow_redirects=False)
    refused(response, 404, "not_found", "/predict/")
    assert "location" not in response.headers and "evil.example" not in response.text


@pytest.mark.parametrize("method, path", [("POST", "/predict"), ("GET", "/health"), ("GET", "/ready"),
                                          ("GET", "/docs"), ("GET", "/v2/models/sentiment")])
def test_a_path_ending_in_a_newline_is_a_404_counted_unmatched(server, method, path):
    """The routes' patterns end in "$", which also matches before a final newline: /predict%0A was answered 200,
    and /docs%0A added a label value to the request metrics."""
    before = server.requests("unmatched", 404)
    response = httpx.request(method, server.url + path + "%0A", json={"text": "fine"}, timeout=30)
    refused(response, 404, "not_found", repr(path + "\n"))
    assert server.requests("unmatched", 404) == before + 1


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics", "/openapi.json"])
def test_head_answers_like_get_without_a_body(server, path):
    get = httpx.get(server.url + path, timeout=30)
    head = httpx.head(server.url + path, timeout=30)
    assert get.status_code == head.status_code == 200
    assert head.content == b"" and get.content
    assert head.headers["content-type"] == get.headers["content-type"]


class Boom(Exception):
    pass


def test_an_unexpected_exception_is_a_json_500_with_the_request_id_and_a_logged_traceback(make_settings, caplog):
    app: FastAPI = create_app(make_settings())

    @app.get("/boom")
    async def boom():
        raise Boom("kaboom")

    with TestClient(app, raise_server_exceptions=False) as client, \
            caplog.at_level(logging.ERROR, logger="server.http"):
        response = client.get("/boom", headers={"X-Request-ID": "trace-me-42"})
        metrics = client.get("/metrics").text
    body = refused(response, 500, "internal_error", "trace-me-42")
    assert body["request_id"] == "trace-me-42" and "Traceback" not in response.text and "kaboom" not in response.text
    (record,) = [r for r in caplog.records if r.name == "server.http" and r.levelno == logging.ERROR]
    assert record.exc_info and record.exc_info[0] is Boom and "GET /boom" in record.getMessage()
    assert 'sentiment_requests_total{endpoint="/boom",status="500"} 1.0' in metrics


@pytest.mark.parametrize("message, status, error_type, fragment", [
    (PayloadTooLarge("body over the limit"), 413, "too_large", "body over the limit"),
    ({"type": "http.disconnect"}, 400, "bad_request", "closed the connection before the body ended"),
])
def test_what_ends_a_body_read_is_answered_as_itself(make_settings, message, status, error_type, fragment):
    """A ServerError raised inside ``receive``, or a disconnect, is not reported as "the body is not valid JSON"."""
    app = create_app(make_settings())

    async def reading_fails(scope, receive, send):
        async def failing_receive():
            if isinstance(message, Exception):
                raise message
            return message

        return await app(scope, failing_receive if scope["type"] == "http" else receive, send)

    with TestClient(reading_fails) as client:
        response = client.post("/predict", json={"text": "fine"})
    body = refused(response, status, error_type, fragment)
    assert "not valid JSON" not in body["error"]


@pytest.mark.parametrize("path", ["/predict", "/v1/models/default:predict", "/"])
def test_a_refused_body_is_freed_once_answered_not_left_in_a_reference_cycle(make_settings, path):
    """The body of a request refused as not JSON is held by the parser's error (``JSONDecodeError.doc``), whose
    traceback made a cycle with the framework's frame: each such body waited for the cyclic garbage collector,
    which the server runs seldom (``server.heap``)."""
    with TestClient(create_app(make_settings())) as client:
        gc.collect()
        gc.disable()
        try:
            for _ in range(3):
                response = client.post(path, content=b'{"text": "' + b"x" * 100_000 + b'"', headers=JSON)
                refused(response, 422, "invalid_json")
            assert [o for o in gc.get_objects() if isinstance(o, json.JSONDecodeError)] == []
        finally:
            gc.enable()
