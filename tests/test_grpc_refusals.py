"""gRPC calls beyond one connection's stream limit (GRPC_STREAMS) are served, not refused unseen.

A red team's 400 concurrent ModelInfer calls over 10 channels (which grpcio shares as one connection) had 158 fail
on the client, UNAVAILABLE "Stream removed (RST_STREAM ... error code 7)", in no metric and no log line: gRPC core's
``grpc.http.overload_protection`` (on by default) counted a call against ``grpc.max_concurrent_streams`` until the
Python side freed it, after its answer was sent. The client, which holds its calls past the limit until a stream
closes, opened the next one at once and it was refused (REFUSED_STREAM) before any handler saw it. With the limit
counted as HTTP/2 counts it, the client's waiting calls are each served and counted.

Our generated module is never imported here (it registers the same ``inference.*`` names as tritonclient's copy).
"""

from __future__ import annotations

from collections import Counter

import grpc
import httpx
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from scripts.benchlib.serverproc import free_port, start_server, stop_server

STREAMS = 100  # oip_grpc.GRPC_STREAMS: the calls one connection may have open at once
TIMEOUT_S = 60
ENDPOINT = "/inference.GRPCInferenceService/ModelInfer"


def infer_request(call: int, texts: int) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="sentiment", id=str(call))
    request.inputs.add(name="text", datatype="BYTES", shape=[texts]).contents.bytes_contents.extend(
        f"call {call} text {index}: a fine film".encode() for index in range(texts))
    return request


def counted(url: str) -> dict[str, float]:
    """ModelInfer's ``sentiment_requests_total`` by status, those not 0."""
    prefix = f'sentiment_requests_total{{endpoint="{ENDPOINT}",status="'
    lines = httpx.get(url + "/metrics", timeout=TIMEOUT_S).text.splitlines()
    counts = {line[len(prefix):].split('"')[0]: float(line.split()[-1]) for line in lines if line.startswith(prefix)}
    return {status: count for status, count in counts.items() if count}


@pytest.mark.parametrize("channels,calls_each", [(1, 3 * STREAMS), (10, 40)])
def test_calls_past_a_connections_stream_limit_wait_for_a_stream_and_are_served(tiny_artifact, tmp_path, channels,
                                                                                calls_each):
    port = free_port()
    live = start_server({"MODEL_PATH": str(tiny_artifact), "GRPC_PORT": str(port), "DRAIN_GRACE_S": "0"}, tmp_path)
    address, opened = f"127.0.0.1:{port}", []
    try:
        opened = [grpc.insecure_channel(address) for _ in range(channels)]  # one connection: grpcio shares it
        stubs = [service_pb2_grpc.GRPCInferenceServiceStub(channel) for channel in opened]
        futures = [stubs[call % channels].ModelInfer.future(infer_request(call, 20), timeout=TIMEOUT_S)
                   for call in range(channels * calls_each)]
        outcomes: Counter[str] = Counter()
        for future in futures:
            error = future.exception()
            outcomes["OK" if error is None else f"{error.code().name}: {error.details()}"] += 1
        total = channels * calls_each
        assert outcomes == {"OK": total}, (outcomes, live.log()[-3000:])
        assert counted(live.url) == {"200": total}, counted(live.url)  # each call answered, and counted once
    finally:
        for channel in opened:
            channel.close()
        stop_server(live)
