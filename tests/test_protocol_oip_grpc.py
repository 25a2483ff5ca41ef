"""Open Inference Protocol v2 over gRPC (GRPC_PORT), driven by ``tritonclient.grpc`` against a real server.

Also: the status, details and trailing metadata of errors (through tritonclient's own stub, as any gRPC client
sees them), API keys in metadata, the request id, records, metrics, the drain, a port that cannot be bound, and
the committed generated code against its ``.proto``. Our generated module is never imported here: it registers
the same ``inference.*`` names as tritonclient's copy, and one process cannot hold both.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from scripts.benchlib.serverproc import ROOT, LiveServer, free_port, start_server, stop_server
from tests.test_lifecycle import metric, start_with_hanging_engine
from tests.test_protocol_oip_v2 import TEXTS, create_key, native
from tests.waiting import wait_for

PROTO = "server/protocols/oip_proto/grpc_service.proto"
TIMEOUT_S = 30


class BoundedClient:
    """``tritonclient.grpc``'s client with every call bounded in time (by default its calls wait forever)."""

    def __init__(self, address: str) -> None:
        self._client = triton.InferenceServerClient(address)

    def __getattr__(self, name: str):
        return functools.partial(getattr(self._client, name), client_timeout=TIMEOUT_S)


def grpc_server(tiny_artifact, tmp, **env: str) -> tuple[LiveServer, str]:
    port = free_port()
    live = start_server({"MODEL_PATH": str(tiny_artifact), "GRPC_PORT": str(port), "DRAIN_GRACE_S": "0", **env}, tmp)
    return live, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served(tiny_artifact, tmp_path_factory) -> Iterator[tuple[LiveServer, str]]:
    live, address = grpc_server(tiny_artifact, tmp_path_factory.mktemp("oip-grpc"))
    yield live, address
    stop_server(live)


@pytest.fixture(scope="module")
def client(served) -> BoundedClient:
    return BoundedClient(served[1])


def text_input(texts: list[str]) -> triton.InferInput:
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object))
    return tensor


def expect_error(call, code: grpc.StatusCode, *fragments: str) -> None:
    with pytest.raises(InferenceServerException) as raised:
        call()
    assert raised.value.status() == str(code), raised.value
    for fragment in fragments:
        assert fragment in raised.value.message(), raised.value.message()


def raw_infer(address: str, request: service_pb2.ModelInferRequest, metadata=()) -> tuple[object, grpc.Call]:
    """ModelInfer through tritonclient's generated stub: the answer and the call (status, metadata)."""
    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            return stub.ModelInfer.with_call(request, metadata=metadata, timeout=TIMEOUT_S)
        except grpc.RpcError as error:
            return None, error


def test_health_metadata_and_config(served, client):
    live, _ = served
    model = httpx.get(live.url + "/health", timeout=30).json()["model"]
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("sentiment") and client.is_model_ready(model["name"], model["version"])
    assert not client.is_model_ready("sentiment", "no-such-version")
    assert list(client.get_server_metadata().extensions) == ["binary_tensor_data", "model_configuration"]
    metadata = client.get_model_metadata("sentiment", as_json=True)
    assert metadata["name"] == model["name"] and metadata["versions"] == [model["version"]]
    assert [(t["name"], t["datatype"]) for t in metadata["inputs"] + metadata["outputs"]] == [
        ("text", "BYTES"), ("label", "BYTES"), ("score", "FP32"), ("probabilities", "FP32")]
    config = client.get_model_config(model["name"], as_json=True)["config"]
    assert config["name"] == model["name"] and config["input"][0]["data_type"] == "TYPE_STRING"
    assert config["output"][2]["dims"] == ["-1", str(len(model["labels"]))]
    expect_error(lambda: client.get_model_metadata("no-such-model"), grpc.StatusCode.NOT_FOUND,
                 "no model named 'no-such-model'")
    # a name or version echoed whole overflowed gRPC's 16 KiB of metadata: RESOURCE_EXHAUSTED, not NOT_FOUND
    expect_error(lambda: client.get_model_metadata("x" * 20_000), grpc.StatusCode.NOT_FOUND, "no model named 'xxx")
    expect_error(lambda: client.get_model_metadata("sentiment", "9" * 20_000), grpc.StatusCode.NOT_FOUND,
                 "has no version '999")


def test_infer_answers_as_predict_does(served, client):
    live, _ = served
    expected = native(live, TEXTS)
    result = client.infer("sentiment", [text_input(TEXTS)], request_id="g-1")
    answer = result.get_response()
    assert answer.id == "g-1" and [o.name for o in answer.outputs] == ["label", "score", "probabilities"]
    assert [label.decode() for label in result.as_numpy("label")] == [p["label"] for p in expected]
    np.testing.assert_allclose(result.as_numpy("score"), [p["score"] for p in expected], rtol=1e-5)
    labels = list(expected[0]["probabilities"])
    np.testing.assert_allclose(result.as_numpy("probabilities"),
                               [[p["probabilities"][label] for label in labels] for p in expected], rtol=1e-5)
    only = client.infer("sentiment", [text_input(TEXTS)], outputs=[triton.InferRequestedOutput("label")])
    assert [o.name for o in only.get_response().outputs] == ["label"] and only.as_numpy("score") is None


def test_inputs_as_typed_contents_are_read_too(served):
    """Not every client sends raw_input_contents: bytes_contents is the protocol's other form."""
    live, address = served
    request = service_pb2.ModelInferRequest(model_name="sentiment")
    request.inputs.add(name="text", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(
        [t.encode() for t in TEXTS[:2]])
    answer, call = raw_infer(address, request)
    assert call.code() == grpc.StatusCode.OK
    labels = answer.raw_output_contents[0]
    assert [p["label"].encode() in labels for p in native(live, TEXTS[:2])] == [True, True]


def test_errors_carry_status_message_and_type(served, client):
    expect_error(lambda: client.infer("nope", [text_input(TEXTS[:1])]), grpc.StatusCode.NOT_FOUND,
                 "no model named 'nope'")
    expect_error(lambda: client.infer("sentiment", [text_input([" "])]), grpc.StatusCode.INVALID_ARGUMENT,
                 "empty or only whitespace")
    expect_error(lambda: client.infer("sentiment", [text_input(["a", "x" * 20_001])]), grpc.StatusCode.INVALID_ARGUMENT,
                 "text[1] has 20001 characters")  # named as the request's input, not as /predict's texts[1]
    column = triton.InferInput("text", [1, 1], "BYTES")
    column.set_data_from_numpy(np.array([["x"]], dtype=object))
    expect_error(lambda: client.infer("sentiment", [column]), grpc.StatusCode.INVALID_ARGUMENT, "shape [1, 1]")
    number = triton.InferInput("text", [1], "FP32")
    number.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    expect_error(lambda: client.infer("sentiment", [number]), grpc.StatusCode.INVALID_ARGUMENT, "datatype 'FP32'")
    expect_error(lambda: client.infer("sentiment", [text_input(["x"])], outputs=[triton.InferRequestedOutput("z")]),
                 grpc.StatusCode.INVALID_ARGUMENT, "unknown output 'z'")
    into_region = triton.InferRequestedOutput("score")
    into_region.set_shared_memory("out0", 4)  # was answered inline, OK: the client read its region for nothing
    expect_error(lambda: client.infer("sentiment", [text_input(["x"])], outputs=[into_region]),
                 grpc.StatusCode.INVALID_ARGUMENT, "shared-memory tensors are not supported")
    request = service_pb2.ModelInferRequest(model_name="sentiment", raw_input_contents=[b"\x09\x00\x00\x00ab"])
    request.inputs.add(name="text", datatype="BYTES", shape=[1])
    _, call = raw_infer(served[1], request)
    assert call.code() == grpc.StatusCode.INVALID_ARGUMENT and "declares 9 bytes" in call.details()
    assert dict(call.trailing_metadata())["error-type"] == "bad_request"
    huge = service_pb2.ModelInferRequest(model_name="sentiment")
    huge.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x" * 1_100_000)
    _, call = raw_infer(served[1], huge)
    assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # over MAX_REQUEST_BYTES, refused by gRPC itself


def test_counted_by_rpc_and_recorded_under_the_request_id(tiny_artifact, tmp_path):
    live, address = grpc_server(tiny_artifact, tmp_path)
    try:
        request = service_pb2.ModelInferRequest(model_name="sentiment")
        request.inputs.add(name="text", datatype="BYTES", shape=[3]).contents.bytes_contents.extend(
            [t.encode() for t in TEXTS])
        _, call = raw_infer(address, request, metadata=(("x-request-id", "oip-grpc-1"),))
        assert call.code() == grpc.StatusCode.OK and dict(call.initial_metadata())["x-request-id"] == "oip-grpc-1"
        _, call = raw_infer(address, service_pb2.ModelInferRequest(model_name="nope"))
        assert call.code() == grpc.StatusCode.NOT_FOUND
        with grpc.insecure_channel(address) as channel:  # methods not served: grpcio answers before any handler
            for method in ("/inference.GRPCInferenceService/ModelStreamInfer", "/grpc.health.v1.Health/Check",
                           "/no.such.Service/Anything"):
                with pytest.raises(grpc.RpcError) as refused:
                    channel.unary_unary(method)(b"", timeout=30)
                assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
        metrics = httpx.get(live.url + "/metrics", timeout=30).text
        for status, count in (("200", 1), ("404", 1)):
            assert (f'sentiment_requests_total{{endpoint="/inference.GRPCInferenceService/ModelInfer",'
                    f'status="{status}"}} {count}.0') in metrics
        assert 'sentiment_requests_total{endpoint="unmatched",status="404"} 3.0' in metrics  # one label value
        assert 'sentiment_request_latency_seconds_count{endpoint="/inference.GRPCInferenceService/ModelInfer"} 2.0' \
            in metrics
    finally:
        assert stop_server(live) == 0
    with sqlite3.connect(tmp_path / "live.db") as db:
        rows = db.execute("SELECT text FROM predictions WHERE request_id = 'oip-grpc-1'").fetchall()
    assert sorted(text for (text,) in rows) == sorted(TEXTS)


def test_auth_required_reads_the_key_from_metadata(tiny_artifact, tmp_path):
    key = create_key(f"sqlite:///{tmp_path}/live.db", "predict")
    live, address = grpc_server(tiny_artifact, tmp_path, AUTH_MODE="required")
    try:
        client = BoundedClient(address)
        assert client.is_server_ready() and client.get_model_metadata("sentiment").name  # open, like /health
        text = text_input(TEXTS[:1])
        expect_error(lambda: client.infer("sentiment", [text]), grpc.StatusCode.UNAUTHENTICATED,
                     "an API key with role predict is required: send it as metadata 'authorization: Bearer <key>' "
                     "or 'x-api-key: <key>' (lower-case names")  # 'Authorization: ...' as said: grpcio refuses it
        expect_error(lambda: client.infer("sentiment", [text], headers={"authorization": "Basic abc"}),
                     grpc.StatusCode.UNAUTHENTICATED, "scheme 'Basic' is not accepted")
        for headers in ({"authorization": f"Bearer {key}"}, {"x-api-key": key}):
            assert client.infer("sentiment", [text], headers=headers).as_numpy("label").shape == (1,)
    finally:
        stop_server(live)
    assert "security: 401 missing API key: gRPC /inference.GRPCInferenceService/ModelInfer from 127.0.0.1" \
        in live.log()  # the address as HTTP's lines give it, not grpcio's "ipv4:127.0.0.1:<port>"


def test_draining_says_not_ready_and_refuses_new_calls_then_stops(tiny_artifact, tmp_path):
    live, address = grpc_server(tiny_artifact, tmp_path, DRAIN_GRACE_S="30")
    client = BoundedClient(address)
    try:
        live.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while client.is_server_ready() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not client.is_server_ready() and not client.is_model_ready("sentiment") and client.is_server_live()
        http = httpx.get(live.url + "/v2/health/ready", timeout=30)
        assert http.status_code == 503 and http.json()["type"] == "draining"
        request = service_pb2.ModelInferRequest(model_name="sentiment")
        request.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x")
        _, call = raw_infer(address, request)
        assert call.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in call.details()
        assert dict(call.trailing_metadata()) == {"error-type": "draining", "retry-after": "5"}
        live.process.send_signal(signal.SIGTERM)  # a second signal ends the drain's waiting at once
        assert live.process.wait(60) == 0
    finally:
        stop_server(live)
    assert "gRPC: stopped" in live.log()


def test_a_grpc_port_in_use_stops_start_up_before_the_model_loads_with_the_port_exit_code(tiny_artifact, tmp_path):
    """Checked before the model loads, like PORT: one line naming GRPC_PORT, exit code 5 (ExitCode.PORT)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        live = start_server({"MODEL_PATH": str(tiny_artifact), "GRPC_PORT": str(port)}, tmp_path, wait_ready=False)
        try:
            assert live.process.wait(120) == 5
        finally:
            stop_server(live)
    errors = [line for line in live.log().splitlines() if "ERROR" in line or "Traceback" in line]
    assert len(errors) == 1, live.log()
    assert f"cannot start: GRPC_PORT: port {port} is already in use on 127.0.0.1" in errors[0]
    assert "set GRPC_PORT to a free port" in errors[0]
    assert "memory plan:" not in live.log()  # refused by the checks, before the model was loaded


def test_the_committed_generated_code_matches_the_proto(tmp_path):
    """Regenerated from the .proto, the descriptor is the one committed (compared in a process of its own)."""
    descriptor_set = tmp_path / "fresh.pb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--descriptor_set_out={descriptor_set}",
                    PROTO], cwd=ROOT, check=True, timeout=120)
    compare = """
import sys
from google.protobuf import descriptor_pb2
from server.protocols.oip_proto import grpc_service_pb2

def without_json_names(messages):  # protoc writes them into a descriptor set, the Python plugin leaves them out
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        without_json_names(message.nested_type)

fresh = descriptor_pb2.FileDescriptorSet.FromString(open(sys.argv[1], "rb").read()).file[0]
without_json_names(fresh.message_type)
committed = descriptor_pb2.FileDescriptorProto.FromString(grpc_service_pb2.DESCRIPTOR.serialized_pb)
print(fresh == committed, [method.name for method in committed.service[0].method])
"""
    out = subprocess.run([sys.executable, "-c", compare, str(descriptor_set)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("True ['ServerLive', 'ServerReady', 'ModelReady', 'ServerMetadata', "
                                  "'ModelMetadata', 'ModelInfer', 'ModelConfig']"), out.stdout


@pytest.mark.parametrize("drain_ends_by", ["its deadline", "a second signal"])
def test_calls_cancelled_by_their_client_are_499_and_unanswered_at_the_drain_deadline_are_abandoned(
        tiny_artifact, tmp_path, drain_ends_by):
    """As over HTTP: a call still unanswered when the drain's time is up (DRAIN_TIMEOUT_S, or a second SIGTERM) is
    refused 503-like (UNAVAILABLE, error type draining) and counted in the shutdown line's abandoned, and the exit
    status says so (1); a call whose client gave up (its deadline passed) is the client's doing: counted as 499,
    not abandoned."""
    from tests.test_lifecycle import MARGIN_S, metric, shutdown_counts, start_with_hanging_engine, wait_exit

    grace_s, port = 1.0, free_port()
    drain_timeout_s = 3.0 if drain_ends_by == "its deadline" else 600.0
    hang_file = tmp_path / "hang"
    live = start_with_hanging_engine(tiny_artifact, tmp_path, hang_file, {
        "GRPC_PORT": str(port), "DRAIN_GRACE_S": str(grace_s), "DRAIN_TIMEOUT_S": str(drain_timeout_s),
        "REQUEST_TIMEOUT_S": "120"})  # the batcher's own deadline must not answer the hung calls first
    address, calls = f"127.0.0.1:{port}", {}

    def call(name: str, timeout: float) -> None:
        request = service_pb2.ModelInferRequest(model_name="sentiment")  # its own text: not the other's cached run
        request.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(name.encode())
        with grpc.insecure_channel(address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            try:
                calls[name] = stub.ModelInfer.with_call(request, timeout=timeout)[1]
            except grpc.RpcError as error:
                calls[name] = error

    try:
        hang_file.touch()
        call("gave up", timeout=1.0)  # its deadline passes while the engine hangs
        endpoint = '{endpoint="/inference.GRPCInferenceService/ModelInfer",status="499"}'
        wait_for(lambda: f"sentiment_requests_total{endpoint} 1.0" in httpx.get(live.url + "/metrics", timeout=30).text,
                 "the cancelled call to be counted as 499")
        batches = metric(live, "sentiment_batch_size_count")
        caller = threading.Thread(target=call, args=("unanswered", grace_s + drain_timeout_s + MARGIN_S))
        caller.start()
        wait_for(lambda: metric(live, "sentiment_batch_size_count") > batches
                 or metric(live, "sentiment_queue_depth") > 0, "the call to reach the engine or its queue")
        live.process.send_signal(signal.SIGTERM)
        if drain_ends_by == "a second signal":
            wait_for(lambda: "SIGTERM: draining" in live.log(), "the first signal to be handled")
            live.process.send_signal(signal.SIGTERM)
        code, _ = wait_exit(live, grace_s + min(drain_timeout_s, 3.0) + MARGIN_S)
        caller.join(30)
    finally:
        live.process.kill()
    assert calls["gave up"].code() == grpc.StatusCode.DEADLINE_EXCEEDED
    unanswered = calls["unanswered"]
    assert unanswered.code() == grpc.StatusCode.UNAVAILABLE, (unanswered, live.log()[-3000:])
    answered, abandoned = shutdown_counts(live)
    assert abandoned == 1 and code == 1, live.log()[-3000:]
    assert dict(unanswered.trailing_metadata()).get("error-type") == "draining", unanswered
    assert "DRAIN_TIMEOUT_S" in unanswered.details()


def bodies_in_flight(live: LiveServer) -> int:
    return httpx.get(live.url + "/health", timeout=TIMEOUT_S).json()["memory"]["bodies_in_flight_bytes"]


def hold_calls(live: LiveServer, address: str, request: service_pb2.ModelInferRequest,
               count: Callable[[int], int]) -> tuple[int, int]:
    """ModelInfer calls of ``request`` in the bodies' budget, each waiting for the hung engine until the server is
    killed: one, then as many more as ``count(what one holds)`` says in all. Returns what each holds (its message
    and its answer's share, taken ahead) and how many are held."""
    threading.Thread(target=raw_infer, args=(address, request), daemon=True).start()
    wait_for(lambda: bodies_in_flight(live) > 0, "the first call to be held", timeout=TIMEOUT_S)
    each = bodies_in_flight(live)
    assert each > request.ByteSize(), each  # the answer's share too
    calls = count(each)
    assert 1 <= calls <= 64, (each, calls)
    for _ in range(calls - 1):
        threading.Thread(target=raw_infer, args=(address, request), daemon=True).start()
    wait_for(lambda: bodies_in_flight(live) == calls * each, f"{calls} calls to be held", timeout=TIMEOUT_S)
    return each, calls


def bodies_limit(live: LiveServer) -> int:
    return httpx.get(live.url + "/health", timeout=TIMEOUT_S).json()["memory"]["plan"]["bodies"]["max_bytes"]


def refused_for_memory(live: LiveServer, error: grpc.Call) -> None:
    """UNAVAILABLE with HTTP's body_memory_full type and Retry-After, counted once as a 503."""
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert "request bodies" in error.details() and "retry after" in error.details(), error.details()
    trailing = dict(error.trailing_metadata())
    assert trailing["error-type"] == "body_memory_full" and trailing["retry-after"] == "1", trailing
    assert metric(live, 'sentiment_rejected_requests_total{reason="body_memory_full"}') == 1
    assert metric(live, 'sentiment_requests_total{endpoint="/inference.GRPCInferenceService/ModelInfer",'
                        'status="503"}') == 1


@contextlib.contextmanager
def hung_engine_grpc(tiny_artifact, tmp_path) -> Iterator[tuple[LiveServer, str, Path]]:
    """A server with gRPC whose engine hangs once the yielded file exists (killed after), its message bodies
    bounded by a 64 KiB MAX_REQUEST_BYTES: the server, its gRPC address and the file."""
    hang_file, port = tmp_path / "hang", free_port()
    live = start_with_hanging_engine(tiny_artifact, tmp_path, hang_file, {
        "GRPC_PORT": str(port), "MAX_REQUEST_BYTES": "65536", "ENABLE_MODEL_CACHING": "false"})
    try:
        yield live, f"127.0.0.1:{port}", hang_file
    finally:
        live.process.kill()
        live.process.wait(timeout=TIMEOUT_S)


def test_messages_are_held_in_the_bodies_budget_and_a_call_past_it_is_refused_and_counted(tiny_artifact, tmp_path):
    """A call's message counts in the request bodies' budget (shared with HTTP) until it is answered: with the
    engine hung, calls that fill the budget wait, and the next one is refused at once, UNAVAILABLE with HTTP's
    body_memory_full type and Retry-After, and counted."""
    with hung_engine_grpc(tiny_artifact, tmp_path) as (live, address, hang_file):
        request = infer_request(*["a fine film " * 400] * 12)  # ~58 KB
        hang_file.touch()
        hold_calls(live, address, request, lambda each: bodies_limit(live) // each)  # the budget is full
        answer, error = raw_infer(address, request)
        assert answer is None
        refused_for_memory(live, error)


def test_an_infer_call_whose_answer_cannot_fit_is_refused_before_its_texts_are_classified(tiny_artifact, tmp_path):
    """ModelInfer takes its answer's share of the bodies' budget before it classifies: taken after, a full budget
    refused calls whose predictions were recorded already, and a client retrying as told (UNAVAILABLE,
    retry-after) recorded them twice (red team helper-83: a 960,000-character ``id``, echoed in the answer). With
    the engine hung, a call whose message fits in the room left but whose answer would not is refused at once:
    classifying it would have waited for the engine."""
    with hung_engine_grpc(tiny_artifact, tmp_path) as (live, address, hang_file):
        limit = bodies_limit(live)
        hang_file.touch()
        request = infer_request(*["a fine film " * 400] * 12)
        each, calls = hold_calls(live, address, request, lambda each: limit // each - 1)
        room = limit - calls * each  # one call's or two
        probe = infer_request("a fine film")
        probe.id = "i" * (room * 55 // 100 - probe.ByteSize())  # the answer echoes it: it cannot fit beside it
        assert probe.ByteSize() <= min(room, 65536) < 2 * probe.ByteSize(), (probe.ByteSize(), room)
        answer, error = raw_infer(address, probe)
        assert answer is None
        refused_for_memory(live, error)
        assert bodies_in_flight(live) == calls * each  # the refused call holds nothing


RPCS = ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig", "ModelInfer"]


def infer_request(*texts: str) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="sentiment")
    request.inputs.add(name="text", datatype="BYTES", shape=[len(texts)]).contents.bytes_contents.extend(
        [text.encode() for text in texts])
    return request


def valid_request(rpc: str):
    """A message the RPC answers OK (tritonclient's copy of the protocol's messages)."""
    if rpc == "ModelInfer":
        return infer_request("a fine film")
    request = getattr(service_pb2, f"{rpc}Request")()
    if "name" in request.DESCRIPTOR.fields_by_name:
        request.name = "sentiment"
    return request


def call_with_bytes(address: str, rpc: str, payload: bytes, request_id: str) -> grpc.RpcError | grpc.Call:
    """The RPC with ``payload`` sent as its message as it is, whatever it holds; the error, or the call."""
    with grpc.insecure_channel(address) as channel:
        method = channel.unary_unary(f"/inference.GRPCInferenceService/{rpc}")  # no serializers: bytes as they are
        try:
            return method.with_call(payload, metadata=(("x-request-id", request_id),), timeout=TIMEOUT_S)[1]
        except grpc.RpcError as error:
            return error


def undecodable_cases() -> dict[str, tuple[str, bytes]]:
    """Messages no protobuf library decodes as the RPC's request: case -> (RPC, bytes)."""
    valid = infer_request(*TEXTS).SerializeToString()
    without_name = infer_request(*TEXTS)
    without_name.ClearField("model_name")
    tensor = service_pb2.ModelInferRequest.InferInputTensor(datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(b"x")
    named_badly = b"\x0a\x02\xff\xfe" + tensor.SerializeToString()  # name (1): 2 bytes that are not UTF-8
    cases = {
        "invalid UTF-8 in model_name": ("ModelInfer", b"\x0a\x02\xff\xfe" + without_name.SerializeToString()),
        "invalid UTF-8 in an input's name": ("ModelInfer", b"\x2a" + bytes([len(named_badly)]) + named_badly),
        "random garbage": ("ModelInfer", random.Random(5).randbytes(256)),
        "a truncated message": ("ModelInfer", valid[:-5]),
        "invalid UTF-8 in ModelMetadata's name": ("ModelMetadata", b"\x0a\x02\xc3\x28"),
    }
    for rpc in RPCS:  # every RPC: a field tag of field number 0
        cases[f"field number 0 to {rpc}"] = (rpc, b"\x00\x01")
    for rpc, payload in cases.values():  # what the cases are about: each is undecodable, by any protobuf library
        with pytest.raises(DecodeError):
            getattr(service_pb2, f"{rpc}Request").FromString(payload)
    return cases


@pytest.fixture(scope="module")
def undecodable(tiny_artifact, tmp_path_factory) -> dict:
    """A server of its own sent each undecodable case, each followed by a valid call of the same RPC; then
    stopped, so that its log is whole. The answers, the metrics before the stop, and the log."""
    live, address = grpc_server(tiny_artifact, tmp_path_factory.mktemp("oip-grpc-undecodable"))
    answers, valid_after = {}, {}
    try:
        for index, (case, (rpc, payload)) in enumerate(undecodable_cases().items()):
            answers[case] = call_with_bytes(address, rpc, payload, f"undecodable-{index}")
            with grpc.insecure_channel(address) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                try:
                    valid_after[case] = getattr(stub, rpc).with_call(valid_request(rpc), timeout=TIMEOUT_S)[1]
                except grpc.RpcError as error:
                    valid_after[case] = error
        metrics = httpx.get(live.url + "/metrics", timeout=TIMEOUT_S).text
    finally:
        code = stop_server(live)
    return {"answers": answers, "valid_after": valid_after, "metrics": metrics, "log": live.log(), "exit": code}


@pytest.mark.parametrize("case", list(undecodable_cases()))
def test_an_undecodable_message_is_invalid_argument_saying_what_is_wrong(undecodable, case):
    """grpcio's default answered UNKNOWN, "Unexpected <class 'google.protobuf.message.DecodeError'>", before any
    handler: no request id, no error type, nothing the client could act on."""
    rpc, _ = undecodable_cases()[case]
    answer = undecodable["answers"][case]
    assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT, (answer.code(), answer.details())
    assert answer.details() == (f"the request is not a valid inference.{rpc}Request protobuf (corrupt or truncated, "
                                "a string field that is not UTF-8, or another message): send the RPC's request "
                                "message as a protobuf library serializes it")
    assert dict(answer.trailing_metadata()) == {"error-type": "invalid_protobuf"}
    index = list(undecodable_cases()).index(case)
    assert dict(answer.initial_metadata())["x-request-id"] == f"undecodable-{index}"
    after = undecodable["valid_after"][case]
    assert after.code() == grpc.StatusCode.OK, after  # the next call, on a new channel, is answered as ever


def test_undecodable_messages_are_counted_as_400s_of_their_rpc(undecodable):
    cases = undecodable_cases().values()
    metrics = undecodable["metrics"]
    for rpc in RPCS:
        refused = sum(1 for called, _ in cases if called == rpc)
        assert (f'sentiment_requests_total{{endpoint="/inference.GRPCInferenceService/{rpc}",status="400"}} '
                f'{refused}.0') in metrics, (rpc, refused)
        assert (f'sentiment_requests_total{{endpoint="/inference.GRPCInferenceService/{rpc}",status="200"}} '
                f'{refused}.0') in metrics, (rpc, refused)  # the valid calls after them
    assert f'sentiment_rejected_requests_total{{reason="invalid"}} {len(cases)}.0' in metrics


def test_undecodable_messages_log_one_throttled_warning_and_no_error(undecodable):
    """Before, each was an ERROR with a traceback (grpc._cython.cygrpc), which anyone could send without a key."""
    assert undecodable["exit"] == 0
    lines = undecodable["log"].splitlines()
    assert not [line for line in lines if "ERROR" in line or "Traceback" in line], undecodable["log"]
    warnings = [line for line in lines if "answered INVALID_ARGUMENT" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], warnings  # the rest within the minute: counted, quiet
    assert ("gRPC /inference.GRPCInferenceService/ModelInfer from 127.0.0.1 answered" in warnings[0]
            and "not a valid inference.ModelInferRequest protobuf" in warnings[0]), warnings[0]


def h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def h2_infer_headers() -> bytes:
    """ModelInfer's request headers, HPACK literals without indexing (every length under 127)."""
    return b"".join(b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()
                    for name, value in ((":method", "POST"), (":scheme", "http"),
                                        (":path", "/inference.GRPCInferenceService/ModelInfer"),
                                        (":authority", "localhost"), ("content-type", "application/grpc"),
                                        ("te", "trailers")))


def h2_connection(address: str) -> socket.socket:
    """A raw HTTP/2 connection that grants no flow-control window: no answer's data can be sent on it."""
    host, port = address.rsplit(":", 1)
    connection = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
    settings = h2_frame(4, 0, 0, (4).to_bytes(2, "big") + (0).to_bytes(4, "big"))  # SETTINGS_INITIAL_WINDOW_SIZE 0
    connection.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings)
    return connection


def h2_calls_never_read(address: str, messages: list[bytes], hold_s: float,
                        released: threading.Event | None = None) -> None:
    """ModelInfer calls over raw HTTP/2 on one connection from a client that never lets their answers be sent, and
    closes the connection after ``hold_s``, or once ``released`` is set: no gRPC library lets a client stop reading
    so."""
    with h2_connection(address) as connection:
        for index, message in enumerate(messages):
            stream = 1 + 2 * index
            connection.sendall(h2_frame(1, 4, stream, h2_infer_headers())
                               + h2_frame(0, 1, stream, b"\x00" + len(message).to_bytes(4, "big") + message))
        (released or threading.Event()).wait(hold_s)


def test_an_answer_its_client_never_reads_is_one_warning_not_an_error_with_a_traceback(tiny_artifact, tmp_path):
    """grpcio logged an ERROR with a Cython traceback for each answer it could not send (a red team's client that
    stopped reading): the log of a server one such client can fill, and an alert on ERROR lines set off."""
    live, address = grpc_server(tiny_artifact, tmp_path)
    try:
        for attempt in range(2):
            h2_calls_never_read(address, [infer_request(f"never read {attempt}").SerializeToString()], hold_s=1.0)
        wait_for(lambda: "could not be sent" in live.log(), "the warning")
        log = live.log()
        assert "ExecuteBatchError" not in log and "Traceback" not in log and " ERROR " not in log, log[-3000:]
        assert log.count("gRPC: an answer to /inference.GRPCInferenceService/ModelInfer could not be sent: its client "
                         "went away or stopped reading") == 1, log[-3000:]  # throttled
    finally:
        stop_server(live)


ONE_CALL = """
import asyncio, json, logging, sys
import grpc
from fastapi.testclient import TestClient
from server.app import create_app
from server.config import load_settings
from server.primitives import InputFailed
from server.protocols.oip_grpc import InferenceService
from server.protocols.oip_proto import grpc_service_pb2 as pb

class Aborted(Exception):
    pass

class Context:
    def invocation_metadata(self):
        return ()
    async def send_initial_metadata(self, metadata):
        pass
    def peer(self):
        return "ipv4:127.0.0.1:5000"
    async def abort(self, code, details, trailing_metadata=()):
        self.aborted = code.name
        raise Aborted()
    def done(self):
        return hasattr(self, "aborted")

errors = []
class Collect(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.ERROR:
            errors.append(record.getMessage())

model, tmp = sys.argv[1:3]
settings = load_settings(model_path=model, device="cpu", database_url=f"sqlite:///{tmp}/store.db",
                         spool_dir=f"{tmp}/spool", intra_op_threads=1)
with TestClient(create_app(settings)) as client:
    logging.getLogger().addHandler(Collect())
    services = client.app.state.services
    async def failing(*args, **kwargs):
        raise InputFailed("inference failed: on this input; the fault is in this request's texts")
    services.predictor.predict = failing
    request = pb.ModelInferRequest(model_name="sentiment")
    request.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"hello")
    context = Context()
    try:
        client.portal.call(InferenceService(services).ModelInfer, request, context)
    except Aborted:
        pass
print(json.dumps({"code": context.aborted, "errors": errors}))
"""


def test_a_500_logged_where_it_was_raised_is_not_logged_again_for_each_grpc_call(tiny_artifact, tmp_path):
    """A failing input's 500 is logged by the batcher, throttled; the gRPC API logged "request failed" for every call
    as well (a red team: 171 ERROR lines), where HTTP logs none. Run in its own process: the server's protocol
    module cannot be imported beside tritonclient's copy of the same messages."""
    done = subprocess.run([sys.executable, "-c", ONE_CALL, str(tiny_artifact), str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["code"] == "INTERNAL"
    assert not [line for line in outcome["errors"] if "request failed" in line], outcome["errors"]


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # and an empty SETTINGS


def answered_once_a_slot_is_free(address: str, what: str) -> None:
    """A call answered once the server has seen a held connection go and freed its slot."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            assert BoundedClient(address).is_server_ready()
            return
        except InferenceServerException:
            assert time.monotonic() < deadline, what
            time.sleep(0.2)


def test_grpc_connections_are_bounded_by_max_connections_and_idle_ones_do_not_starve_http(tiny_artifact, tmp_path):
    """Idle connections that sent the HTTP/2 preface and nothing more took every file descriptor the process had:
    HTTP, the spool and the database failed with them (red team helper-63)."""
    live, address = grpc_server(tiny_artifact, tmp_path, MAX_CONNECTIONS="3")
    host, port = address.rsplit(":", 1)
    held = []
    try:
        for _ in range(3):
            sock = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
            sock.sendall(HTTP2_PREFACE)
            assert sock.recv(9)[3:4] == b"\x04"  # the server's SETTINGS frame: the connection is taken
            held.append(sock)
        with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as refused:
            refused.sendall(HTTP2_PREFACE)
            assert refused.recv(9) == b""  # closed, not handshaken
        assert httpx.get(live.url + "/ready", timeout=TIMEOUT_S).status_code == 200  # HTTP has its own bound
        for sock in held:
            sock.close()
        answered_once_a_slot_is_free(address, "a freed gRPC connection slot was never reused")
    finally:
        for sock in held:
            sock.close()
        assert stop_server(live) == 0


def test_answers_a_client_never_reads_count_in_the_bodies_budget_until_its_connection_goes(tiny_artifact, tmp_path):
    """grpcio holds a call's message and answer until the answer is sent: a red team's one connection of 400 unread
    calls of 1 MB (an echoed ``id``) held 1.8 GB outside the memory plan, /health saying no body was in flight.
    They count in the bodies' budget until the call ends, and leave it when the connection goes."""
    live, address = grpc_server(tiny_artifact, tmp_path)
    request = infer_request("never read")
    request.id = "i" * 10_000  # echoed in the answer; 5 calls of it fit HTTP/2's first frame and window sizes
    calls, each = 5, 2 * request.ByteSize()
    try:
        counted = threading.Event()  # the connection is held until then: a fixed hold could end first on a slow machine
        holder = threading.Thread(target=h2_calls_never_read,
                                  args=(address, [request.SerializeToString()] * calls, TIMEOUT_S, counted),
                                  daemon=True)
        holder.start()
        try:
            wait_for(lambda: bodies_in_flight(live) >= calls * each, "the unread answers to be counted",
                     timeout=TIMEOUT_S)
        finally:
            counted.set()
        holder.join()
        wait_for(lambda: bodies_in_flight(live) == 0, "the budget back once the connection went", timeout=TIMEOUT_S)
    finally:
        stop_server(live)


def test_a_connection_whose_call_stalls_mid_message_is_closed_at_its_age(tiny_artifact, tmp_path):
    """A call whose message never completes is not seen by any handler, and held its connection for good: 20 such
    connections took every slot of the gRPC port (red team helper-66). Every connection is closed at
    GRPC_MAX_CONNECTION_AGE_S + REQUEST_TIMEOUT_S, and its slot is free again."""
    live, address = grpc_server(tiny_artifact, tmp_path, MAX_CONNECTIONS="1", GRPC_MAX_CONNECTION_AGE_S="1",
                                REQUEST_TIMEOUT_S="1")
    message = infer_request("stalled").SerializeToString()
    try:
        with h2_connection(address) as stalled:
            stalled.sendall(h2_frame(1, 4, 1, h2_infer_headers())  # declares 10 bytes more than it will ever send
                            + h2_frame(0, 0, 1, b"\x00" + (len(message) + 10).to_bytes(4, "big") + message))
            started = time.monotonic()
            while stalled.recv(65536):  # the server's frames, until it closes the connection
                assert time.monotonic() - started < TIMEOUT_S, "the stalled connection was never closed"
            assert time.monotonic() - started < 10
        answered_once_a_slot_is_free(address, "the closed connection's slot was never freed")
    finally:
        stop_server(live)
