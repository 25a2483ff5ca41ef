"""A client that closes its connection while its request waits: the request is cancelled at once, its texts not yet
on the engine are dropped from the queue, and it is counted 499 (server/connections.py, README "499").

Against a real uvicorn over real sockets, with an engine made slow (tests/hanging_engine_server.py, ``HANG_S``) so
that a request of many texts is still queued when its client leaves. Every wait is bounded by WAIT_S.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from scripts.benchlib.serverproc import ROOT, LiveServer, free_port, stop_server
from tests.test_slow_clients import metric, read_responses
from tests.waiting import wait_for

WAIT_S = 30.0
ENGINE_CALL_S = 0.5  # each engine call while the hang file exists: 64 texts in batches of 4 take 8 s
TEXTS = 64


@pytest.fixture(scope="module")
def busy(tiny_artifact, tmp_path_factory):
    """A server whose engine takes ``ENGINE_CALL_S`` a call (of at most 4 texts, one at a time) once ``hang``
    exists; the file is removed between tests, so the drain at the end is quick."""
    tmp_path = tmp_path_factory.mktemp("client_left")
    hang = tmp_path / "slow"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_", "DEVICE", "PORT", "HOST"))}
    env.update({"HOST": "127.0.0.1", "PORT": str(port), "DEVICE": "cpu", "INTRA_OP_THREADS": "1",
                "MODEL_PATH": str(tiny_artifact), "DATABASE_URL": f"sqlite:///{tmp_path}/live.db",
                "SPOOL_DIR": str(tmp_path / "spool"), "LOG_FORMAT": "text", "HANG_FILE": str(hang),
                "HANG_S": str(ENGINE_CALL_S), "ENGINE_WORKERS": "1", "MAX_BATCH_SIZE": "4", "CACHE_MAX_BYTES": "0",
                "DRAIN_GRACE_S": "0"})
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "tests.hanging_engine_server"], env=env, cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT)
    live = LiveServer(f"http://127.0.0.1:{port}", process, env, log_path)
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, live.log()
        try:
            if httpx.get(live.url + "/ready", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"server not ready:\n{live.log()}")
        time.sleep(0.1)
    yield live, hang
    hang.unlink(missing_ok=True)
    assert stop_server(live) == 0, live.log()[-3000:]


LEFT = 'sentiment_requests_total{endpoint="/predict",status="499"}'
ANSWERED = 'sentiment_requests_total{endpoint="/predict",status="200"}'
ENGINE_TEXTS = "sentiment_batch_size_sum"  # texts handed to the engine
QUEUED = "sentiment_queue_depth"


def predict_request(text_chars: int) -> bytes:
    texts = [(f"take {i}: a fine film, " * text_chars)[:text_chars] for i in range(TEXTS)]
    body = json.dumps({"texts": texts}).encode()
    return (b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


def send_request(sock: socket.socket, text_chars: int) -> None:
    """The request; when its body is larger than 128 KB, its last 96 KB a moment after the rest, so that they arrive
    in one read: uvicorn stops reading a connection when what arrives of a body between two reads of the application
    passes 64 KiB, and an application that has its whole body then never reads again, so the connection was not
    read (its close not seen, the socket left in CLOSE-WAIT) until the answer was written (red team helper-69)."""
    request = predict_request(text_chars)
    tail = 96 * 1024 if len(request) > 128 * 1024 else 0
    sock.sendall(request[:len(request) - tail])
    if tail:
        time.sleep(0.3)
        sock.sendall(request[-tail:])


@pytest.mark.parametrize("text_chars", [20, 4000], ids=["small-body", "body-paused-at-64KiB"])
@pytest.mark.parametrize("how", ["close", "reset", "half-close"])
def test_a_client_that_leaves_while_its_texts_are_queued_is_counted_499_at_once_and_its_texts_are_dropped(
        busy, text_chars, how):
    live, hang = busy
    left, answered, computed = metric(live, LEFT), metric(live, ANSWERED), metric(live, ENGINE_TEXTS)
    hang.touch()
    try:
        sock = socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1])), timeout=WAIT_S)
        send_request(sock, text_chars)
        wait_for(lambda: metric(live, ENGINE_TEXTS) > computed and metric(live, QUEUED) > 0, "texts queued")
        if how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        elif how == "half-close":  # taken as gone (README): until an answer is written it cannot be told apart
            sock.shutdown(socket.SHUT_WR)
        if how == "half-close":
            assert sock.recv(65536) == b""  # no answer: the server closed
        sock.close()
        wait_for(lambda: metric(live, LEFT) == left + 1, "the request counted 499")
        # counted as soon as it left, with the rest of its texts dropped from the queue, not computed for no one
        assert metric(live, QUEUED) == 0
        ran = metric(live, ENGINE_TEXTS) - computed
        assert ran < TEXTS / 2, f"{ran:g} of the {TEXTS} texts of a client that left were computed"
        assert metric(live, ANSWERED) == answered
    finally:
        hang.unlink(missing_ok=True)
    log = live.log()
    assert " ERROR " not in log and "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("path, key", [("/", "inputs"), ("/v1/models/{model}:predict", "instances")],
                         ids=["tei", "kserve-v1"])
def test_a_request_through_the_framework_routes_is_cancelled_too_when_its_client_leaves(busy, path, key):
    live, hang = busy
    model = httpx.get(live.url + "/v1/models", timeout=WAIT_S).json()["models"][0]
    path = path.format(model=model)
    endpoint = f'sentiment_requests_total{{endpoint="{path if key == "inputs" else "/v1/models/{name}:predict"}"'
    left, computed = metric(live, endpoint + ',status="499"}'), metric(live, ENGINE_TEXTS)
    texts = [f"take {i}: a fine film" for i in range(TEXTS)]
    body = json.dumps({key: [[text] for text in texts] if key == "inputs" else texts}).encode()  # TEI: a batch
    hang.touch()
    try:
        with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1])), timeout=WAIT_S) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_for(lambda: metric(live, ENGINE_TEXTS) > computed and metric(live, QUEUED) > 0, "texts queued")
        wait_for(lambda: metric(live, endpoint + ',status="499"}') == left + 1, "the request counted 499")
        assert metric(live, QUEUED) == 0
        assert metric(live, ENGINE_TEXTS) - computed < TEXTS / 2
    finally:
        hang.unlink(missing_ok=True)
    log = live.log()
    assert " ERROR " not in log and "Traceback" not in log, log[-3000:]


def test_clients_that_stay_are_answered_keep_alive_and_pipelined_while_the_engine_is_slow(busy):
    live, hang = busy
    answered = metric(live, ANSWERED)
    hang.touch()
    try:
        one = predict_request(20)
        sock = socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1])), timeout=WAIT_S)
        with sock:
            sock.sendall(one)  # keep-alive: answered, then the next on the same connection
            first = read_responses(sock, 1)
            sock.sendall(one * 2)  # pipelined
            rest = read_responses(sock, 2)
        assert [status for status, _ in first + rest] == [200, 200, 200]
        assert all(len(json.loads(body)["predictions"]) == TEXTS for _, body in first + rest)
    finally:
        hang.unlink(missing_ok=True)
    assert metric(live, ANSWERED) == answered + 3
