"""A caller without a valid API key learns nothing about its body: with AUTH_MODE=required, every endpoint that
needs a key answers 401 (403 for a key without the role) whatever the body holds, JSON or not; with a valid key,
the body's errors are answered as before. Over real HTTP and gRPC against a server in a subprocess.

Before: a body that is not JSON (or not UTF-8, or nested too deeply) was refused 422 ``invalid_json`` before the
key was checked (FastAPI reads the JSON before it solves the route's dependencies), on ``/predict`` (the fast path
hands such a body to the framework), ``POST /``, KServe v1, ``/feedback``, ``/admin/*``; and over gRPC a message
that could not be decoded was refused INVALID_ARGUMENT before the key was checked.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import grpc
import httpx
import pytest
from sqlalchemy import create_engine

from scripts.benchlib.serverproc import LiveServer, free_port, start_server, stop_server
from server.store.keys import KeyStore

TIMEOUT_S = 30
JSON = "application/json"
FRAMEWORK = "application/vnd.x+json"  # a JSON type the fast path leaves to the framework
NOT_JSON = b"this is not JSON"
NOT_UTF8 = b'{"text": "caf\xe9"}'
TOO_DEEP = b"[" * 5000 + b"]" * 5000
BAD_KEYS = {
    "no key": {},
    "unknown bearer": {"Authorization": "Bearer sap_not-a-key"},
    "unknown x-api-key": {"X-API-Key": "sap_not-a-key"},
    "basic": {"Authorization": "Basic eDp5"},
    "empty bearer": {"Authorization": "Bearer"},
    "revoked": {"Authorization": "Bearer {revoked}"},
}
INVALID_JSON = (422, "invalid_json")
INVALID_INPUT = (422, "invalid_input")
OIP_INVALID = (400, "bad_request")
# case -> (method, path, content type, body, extra headers, (status, type) with a valid key of the role)
CASES = {
    "predict not json": ("/predict", JSON, NOT_JSON, {}, INVALID_JSON),
    "predict not json (framework)": ("/predict", FRAMEWORK, NOT_JSON, {}, INVALID_JSON),
    "predict not utf-8": ("/predict", JSON, NOT_UTF8, {}, INVALID_JSON),
    "predict nested too deeply": ("/predict", JSON, TOO_DEEP, {}, INVALID_JSON),
    "predict texts a number": ("/predict", JSON, b'{"texts": 5}', {}, INVALID_INPUT),
    "predict texts a number (framework)": ("/predict", FRAMEWORK, b'{"texts": 5}', {}, INVALID_INPUT),
    "predict unknown field": ("/predict", JSON, b'{"text": "a", "extra": 1}', {}, INVALID_INPUT),
    "predict text/plain": ("/predict", "text/plain", b'{"texts": 5}', {}, (415, "unsupported_media_type")),
    "predict tei inputs a number": ("/predict", JSON, b'{"inputs": 5}', {}, INVALID_INPUT),
    "predict tei not json": ("/predict", JSON, b'{"inputs": "a"', {}, INVALID_JSON),
    "hf root not json": ("/", JSON, NOT_JSON, {}, INVALID_JSON),
    "hf root inputs a number": ("/", JSON, b'{"inputs": 5}', {}, INVALID_INPUT),
    "kserve not json": ("/v1/models/sentiment:predict", JSON, NOT_JSON, {}, INVALID_JSON),
    "kserve instances a number": ("/v1/models/sentiment:predict", JSON, b'{"instances": 5}', {}, INVALID_INPUT),
    "oip not json": ("/v2/models/sentiment/infer", JSON, NOT_JSON, {}, OIP_INVALID),
    "oip inputs a number": ("/v2/models/sentiment/infer", None, b'{"inputs": 5}', {}, OIP_INVALID),
    "oip versioned not json": ("/v2/models/sentiment/versions/1/infer", None, NOT_JSON, {}, (404, "model_not_found")),
    "oip binary header past the body": ("/v2/models/sentiment/infer", None, b'{"inputs": []}\x01\x00',
                                        {"Inference-Header-Content-Length": "99"}, OIP_INVALID),
    "oip binary header not json": ("/v2/models/sentiment/infer", None, b'{"inputs"\x04\x00\x00\x00abcd',
                                   {"Inference-Header-Content-Length": "9"}, OIP_INVALID),
    "feedback not json": ("/feedback", JSON, NOT_JSON, {}, INVALID_JSON),
}
ADMIN_CASES = {  # need the admin role: a predict key is 403
    "reload not json": ("/admin/reload", JSON, NOT_JSON, {}, INVALID_JSON),
    "create key not json": ("/admin/keys", JSON, NOT_JSON, {}, INVALID_JSON),
}


@pytest.fixture(scope="module")
def keyed(tiny_artifact, tmp_path_factory) -> Iterator[tuple[LiveServer, str, dict[str, str]]]:
    """AUTH_MODE=required, gRPC on, and a predict, an admin and a revoked key issued elsewhere (as the CLI does)."""
    grpc_port = free_port()
    live = start_server({"MODEL_PATH": str(tiny_artifact), "AUTH_MODE": "required", "DB_AUTO_MIGRATE": "true",
                         "GRPC_PORT": str(grpc_port), "DRAIN_GRACE_S": "0"}, tmp_path_factory.mktemp("keyed"))
    try:
        keys = KeyStore(create_engine(live.env["DATABASE_URL"]))
        issued = {role: keys.create(role, role)[1] for role in ("predict", "admin")}
        revoked, issued["revoked"] = keys.create("revoked", "predict")
        keys.revoke(revoked.id)
        yield live, f"127.0.0.1:{grpc_port}", issued
    finally:
        stop_server(live)


def post(live: LiveServer, issued: dict[str, str], case: tuple, key_headers: dict[str, str]) -> httpx.Response:
    path, content_type, body, extra, _ = case
    headers = {**extra, **{name: value.format(**issued) for name, value in key_headers.items()}}
    if content_type is not None:
        headers["Content-Type"] = content_type
    return httpx.post(live.url + path, content=body, headers=headers, timeout=TIMEOUT_S)


def assert_refused(answer: httpx.Response, status: int) -> None:
    kind = {401: "unauthorized", 403: "forbidden"}[status]
    assert (answer.status_code, answer.json()["type"]) == (status, kind), answer.text[:300]
    if status == 401:
        assert answer.headers["www-authenticate"].startswith("Bearer")
    text = answer.text.lower()
    assert "json" not in text and "body" not in text and "texts" not in text, answer.text  # nothing about the body


@pytest.mark.parametrize("key", list(BAD_KEYS))
@pytest.mark.parametrize("case", list(CASES))
def test_a_caller_without_a_valid_key_gets_401_whatever_the_body(keyed, case, key):
    live, _, issued = keyed
    assert_refused(post(live, issued, CASES[case], BAD_KEYS[key]), 401)


@pytest.mark.parametrize("key", ["no key", "unknown bearer", "basic"])
@pytest.mark.parametrize("case", list(ADMIN_CASES))
def test_an_admin_route_refuses_a_caller_without_a_key_before_its_body(keyed, case, key):
    live, _, issued = keyed
    assert_refused(post(live, issued, ADMIN_CASES[case], BAD_KEYS[key]), 401)


@pytest.mark.parametrize("case", list(ADMIN_CASES))
def test_an_admin_route_without_a_key_names_the_admin_role(keyed, case):
    """The refusal before the body named the predict role on every route (red team helper-73); without a body the
    route's own check named admin."""
    live, _, issued = keyed
    answer = post(live, issued, ADMIN_CASES[case], {})
    assert answer.status_code == 401 and "an API key with role admin is required" in answer.json()["error"]


def test_a_body_sent_to_no_route_is_404_not_401(keyed):
    """No route takes it, so no key is asked for it: it was refused 401 naming the predict role (red team
    helper-73)."""
    live, issued = keyed[0], keyed[2]
    answer = post(live, issued, ("/no/such/path", JSON, b'{"text": "a"}', {}, None), {})
    assert answer.status_code == 404, answer.text


@pytest.mark.parametrize("case", list(ADMIN_CASES))
def test_a_key_without_the_role_gets_403_whatever_the_body(keyed, case):
    live, _, issued = keyed
    assert_refused(post(live, issued, ADMIN_CASES[case], {"Authorization": "Bearer {predict}"}), 403)


@pytest.mark.parametrize("header", ["Authorization", "X-API-Key"])
@pytest.mark.parametrize("case", list(CASES) + list(ADMIN_CASES))
def test_with_a_valid_key_the_body_error_is_answered_as_before(keyed, case, header):
    live, _, issued = keyed
    path, *_, (status, kind) = spec = {**CASES, **ADMIN_CASES}[case]
    key = issued["admin" if spec in ADMIN_CASES.values() else "predict"]
    answer = post(live, issued, spec, {header: f"Bearer {key}" if header == "Authorization" else key})
    assert (answer.status_code, answer.json()["type"]) == (status, kind), answer.text[:300]
    if kind == "invalid_json":
        assert answer.json()["error"].startswith("the body is not valid JSON: "), answer.text
    if kind == "invalid_input" and path == "/predict":
        assert answer.json()["error"].startswith("invalid request: "), answer.text


def test_the_framework_and_the_fast_path_word_a_refused_body_alike(keyed):
    """The valid key's 422 is the same whichever layer reads the body (the framework's handlers in both)."""
    live, _, issued = keyed
    for body in (NOT_JSON, b'{"texts": 5}', NOT_UTF8):
        answers = [post(live, issued, ("/predict", kind, body, {}, None), {"Authorization": "Bearer {predict}"})
                   for kind in (JSON, FRAMEWORK)]
        assert [a.status_code for a in answers] == [422, 422] and answers[0].json() == answers[1].json()


def test_refusals_before_the_body_are_logged_and_counted_as_auth_failures(keyed):
    live, _, issued = keyed
    before = httpx.get(live.url + "/metrics", timeout=TIMEOUT_S).text
    answer = post(live, issued, CASES["kserve not json"], {"X-API-Key": "sap_never-issued"})
    assert answer.status_code == 401
    after = httpx.get(live.url + "/metrics", timeout=TIMEOUT_S).text
    assert unauthorized(after) == unauthorized(before) + 1
    assert "security: 401 invalid API key (fingerprint" in live.log()


def unauthorized(metrics: str) -> float:
    line = next(line for line in metrics.splitlines()
                if line.startswith('sentiment_rejected_requests_total{reason="unauthorized"}'))
    return float(line.rsplit(" ", 1)[1])


def chunked_with_trailer(live: LiveServer, path: str, head: str, body: bytes, trailer: str) -> tuple[int, dict]:
    """POST ``body`` as one chunk with ``trailer`` after the last chunk, over a raw socket: status and JSON body."""
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as connection:
        connection.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n{head}\r\n".encode()
                           + f"{len(body):x}\r\n".encode() + body + f"\r\n0\r\n{trailer}\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < int(
                answer.lower().partition(b"content-length: ")[2].partition(b"\r\n")[0] or 0):
            answer += connection.recv(65536)
    head_bytes, _, payload = answer.partition(b"\r\n\r\n")
    return int(head_bytes.split(b" ", 2)[1]), json.loads(payload)


@pytest.mark.parametrize("content_type", [JSON, FRAMEWORK])
@pytest.mark.parametrize("trailer", ["Authorization: Bearer {predict}", "X-API-Key: {predict}"])
def test_a_key_sent_in_a_chunked_body_s_trailer_is_not_a_key(keyed, trailer, content_type):
    """uvicorn added trailer fields to the request's headers, which are read once the body is in: a key sent after
    the body was accepted (red team helper-65), out of sight of a proxy that checks or replaces keys in the head."""
    live, _, issued = keyed
    body = b'{"text": "sent with its key in a trailer"}'
    status, answer = chunked_with_trailer(live, "/predict", f"Content-Type: {content_type}\r\n", body,
                                          trailer.format(**issued) + "\r\n")
    assert (status, answer["type"]) == (401, "unauthorized"), answer
    status, answer = chunked_with_trailer(live, "/predict", f"Content-Type: {content_type}\r\n"
                                          f"Authorization: Bearer {issued['predict']}\r\n", body, "X-Note: fine\r\n")
    assert status == 200 and len(answer["predictions"]) == 1  # a trailer of anything else is ignored


def test_an_admin_key_in_a_trailer_does_not_lift_a_predict_key_to_admin(keyed):
    live, _, issued = keyed
    status, answer = chunked_with_trailer(live, "/admin/keys", f"Content-Type: {JSON}\r\nX-API-Key: "
                                          f"{issued['predict']}\r\n", b'{"name": "escalated", "role": "admin"}',
                                          f"Authorization: Bearer {issued['admin']}\r\n")
    assert (status, answer["type"]) == (403, "forbidden"), answer


def test_a_content_type_sent_in_a_trailer_is_not_the_request_s(keyed):
    live, _, issued = keyed
    status, answer = chunked_with_trailer(live, "/predict", f"Authorization: Bearer {issued['predict']}\r\n",
                                          b'{"text": "no content type in the head"}', f"Content-Type: {JSON}\r\n")
    assert (status, answer["type"]) == (415, "unsupported_media_type"), answer


def read_head(connection: socket.socket) -> bytes:
    """The status line and headers of the answer on ``connection``."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        more = connection.recv(65536)
        if not more:
            break
        answer += more
    return answer.partition(b"\r\n\r\n")[0]


@pytest.mark.parametrize("key", ["no key", "unknown bearer", "revoked"])
def test_a_body_without_a_valid_key_is_refused_before_a_byte_of_it_is_read(keyed, key):
    """The bodies' memory budget is shared: 17 connections without a key, each declaring a 1 MB body and sending most
    of it, held the whole budget and every keyed request got 503 ``body_memory_full`` (red team helper-65). Now the
    401 comes at the head, the connection closes, and nothing is held."""
    live, _, issued = keyed
    host, port = live.url.removeprefix("http://").split(":")
    sent_key = "".join(f"{name}: {value.format(**issued)}\r\n" for name, value in BAD_KEYS[key].items())
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as connection:
        connection.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{sent_key}"
                           "Content-Length: 1000000\r\n\r\n".encode() + b'{"text": "' + b"a" * 100_000)
        head = read_head(connection).lower()
        assert head.startswith(b"http/1.1 401") and b"connection: close" in head, head
        health = httpx.get(live.url + "/health", timeout=TIMEOUT_S).json()
        assert health["memory"]["bodies_in_flight_bytes"] == 0


def test_a_client_that_expects_100_continue_without_a_valid_key_gets_its_401_instead(keyed):
    """It got ``100 Continue`` first, then sent its whole body to be refused."""
    live, _, _ = keyed
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as connection:
        connection.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Expect: 100-continue\r\nContent-Length: 20\r\n\r\n")
        assert read_head(connection).startswith(b"HTTP/1.1 401")


# -- gRPC ----------------------------------------------------------------------------------------------------------

def model_infer(address: str, payload: bytes, metadata: tuple) -> grpc.RpcError | grpc.Call:
    """ModelInfer with ``payload`` sent as its message as it is (no protobuf module imported here: the server's
    generated one and a client's cannot share a process); the error, or the call."""
    with grpc.insecure_channel(address) as channel:
        method = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        try:
            return method.with_call(payload, metadata=metadata, timeout=TIMEOUT_S)[1]
        except grpc.RpcError as error:
            return error


UNDECODABLE = {"garbage": b"\xff" * 64, "field number 0": b"\x00\x01", "not utf-8 model_name": b"\x0a\x02\xff\xfe"}
GRPC_BAD_KEYS = {"no key": (), "unknown bearer": (("authorization", "Bearer sap_not-a-key"),),
                 "unknown x-api-key": (("x-api-key", "sap_not-a-key"),), "basic": (("authorization", "Basic eDp5"),)}


@pytest.mark.parametrize("key", list(GRPC_BAD_KEYS))
@pytest.mark.parametrize("payload", list(UNDECODABLE))
def test_grpc_refuses_an_undecodable_message_without_a_valid_key_as_unauthenticated(keyed, payload, key):
    _, address, _ = keyed
    answer = model_infer(address, UNDECODABLE[payload], GRPC_BAD_KEYS[key] + (("x-request-id", "grpc-bad-key"),))
    assert answer.code() == grpc.StatusCode.UNAUTHENTICATED, (answer.code(), answer.details())
    assert "protobuf" not in answer.details() and "ModelInfer" not in answer.details()
    assert dict(answer.trailing_metadata()) == {"error-type": "unauthorized"}
    assert dict(answer.initial_metadata())["x-request-id"] == "grpc-bad-key"


@pytest.mark.parametrize("payload", list(UNDECODABLE))
def test_grpc_with_a_valid_key_refuses_an_undecodable_message_as_before(keyed, payload):
    _, address, issued = keyed
    answer = model_infer(address, UNDECODABLE[payload], (("authorization", f"Bearer {issued['predict']}"),))
    assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT, (answer.code(), answer.details())
    assert answer.details().startswith("the request is not a valid inference.ModelInferRequest protobuf")
    assert dict(answer.trailing_metadata()) == {"error-type": "invalid_protobuf"}


def test_grpc_with_a_valid_key_and_an_empty_message_is_answered_as_before(keyed):
    """An empty message decodes (every field at its default): the key, then the model name, as before."""
    _, address, issued = keyed
    refused = model_infer(address, b"", ())
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED, (refused.code(), refused.details())
    answer = model_infer(address, b"", (("x-api-key", issued["predict"]),))
    assert answer.code() == grpc.StatusCode.NOT_FOUND, (answer.code(), answer.details())


def test_a_content_type_sent_twice_is_refused_before_the_key_as_a_body_s_encoding_is(keyed):
    """Like a Content-Encoding, a header that makes the body unreadable is judged first, whoever sends it; the
    answer names the header, nothing of the body."""
    live, _, issued = keyed
    for key in ({}, {"Authorization": f"Bearer {issued['predict']}"}):
        headers = [("Content-Type", JSON), ("Content-Type", JSON), *key.items()]
        answer = httpx.post(live.url + "/predict", content=NOT_JSON, headers=headers, timeout=TIMEOUT_S)
        assert (answer.status_code, answer.json()["type"]) == (400, "bad_request"), answer.text
        assert answer.json()["error"].startswith("Content-Type sent 2 times") and "body" not in answer.text


@pytest.mark.parametrize("name", ["authorization", "x-api-key"])
def test_a_key_header_sent_twice_is_refused_whichever_copy_is_valid(keyed, name):
    """The first copy was taken, over HTTP and gRPC alike (before that, HTTP judged the first and gRPC the last):
    a key a proxy appends was overridden by the client's own (red team helper-73). Both copies are refused now,
    on every path: the fast path, the framework's routes, an admin route without a body, gRPC."""
    live, address, issued = keyed

    def sent(key: str) -> str:
        return f"Bearer {key}" if name == "authorization" else key

    bad, predict, admin = sent("sap_not-a-key"), sent(issued["predict"]), sent(issued["admin"])
    for pair in ((bad, predict), (predict, bad), (predict, predict)):
        answer = model_infer(address, b"", tuple((name, value) for value in pair))
        assert answer.code() == grpc.StatusCode.UNAUTHENTICATED, (answer.code(), answer.details())
        assert answer.details().startswith("send one key, in one header")
        for content_type in (JSON, FRAMEWORK):
            twice = [(b"content-type", content_type.encode()), *((name.encode(), value.encode()) for value in pair)]
            answer = httpx.post(live.url + "/predict", content=b'{"text": "fine"}', headers=twice, timeout=TIMEOUT_S)
            assert answer.status_code == 401 and answer.json()["error"].startswith("send one key"), answer.text
    answer = httpx.get(live.url + "/admin/keys", headers=[(name.encode(), value.encode()) for value in (admin, bad)],
                       timeout=TIMEOUT_S)
    assert answer.status_code == 401 and answer.json()["error"].startswith("send one key"), answer.text
    assert httpx.get(live.url + "/admin/keys", headers={name: admin}, timeout=TIMEOUT_S).status_code == 200


# -- AUTH_MODE=open ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def open_mode(tiny_artifact, tmp_path_factory) -> Iterator[LiveServer]:
    live = start_server({"MODEL_PATH": str(tiny_artifact), "DRAIN_GRACE_S": "0"}, tmp_path_factory.mktemp("open"))
    yield live
    stop_server(live)


@pytest.mark.parametrize("case", ["predict not json", "predict not json (framework)", "predict nested too deeply",
                                  "hf root not json", "kserve not json"])
def test_open_mode_answers_a_keyless_body_error_as_before_but_refuses_a_bad_key_first(open_mode, case):
    """In open mode a keyless caller may predict, so its body error is its answer; a key that is sent must still be
    valid (server.auth), and is judged before the body as in required mode."""
    keyless = post(open_mode, {}, CASES[case], {})
    assert (keyless.status_code, keyless.json()["type"]) == INVALID_JSON, keyless.text[:300]
    assert_refused(post(open_mode, {}, CASES[case], {"X-API-Key": "sap_not-a-key"}), 401)
