"""Request bodies in flight are held to the memory plan's budget (server/http.py, server/budget.py BodyBudget), and
what a parsed body costs per byte stays within the plan's figure (BODY_PARSED_PER_BYTE).

The middleware is the real one, over real HTTP (uvicorn in a thread of the test process); the app behind it is a
small one whose route holds its request until the test lets it go, so bodies can be kept in flight on purpose.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from scripts.benchlib.serverproc import free_port
from server.app import create_app
from server.budget import BODY_PARSED_PER_BYTE, BodyBudget
from server.config import load_settings
from server.http import ObservedASGI, install_error_handlers
from server.metrics import Metrics
from tests.asgi_thread import serve_in_thread
from tests.waiting import wait_for

LIMIT = 1000
WAIT_S = 30
POLL_S = 0.01


class Holding:
    """The route's requests wait here until ``release`` (bounded: a test that forgets cannot hang)."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.arrived = 0

    async def hold(self) -> None:
        self.arrived += 1
        deadline = time.monotonic() + WAIT_S
        while not self.released.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


@pytest.fixture
def held_app() -> Iterator[tuple[str, BodyBudget, Holding, Metrics]]:
    with serve_held(LIMIT) as served:
        yield served


@contextmanager
def serve_held(limit: int) -> Iterator[tuple[str, BodyBudget, Holding, Metrics]]:
    """The holding app behind the real middleware, its bodies' budget ``limit`` bytes, bodies up to 4 times that."""
    metrics, holding, bodies = Metrics(), Holding(), BodyBudget(limit)
    app = FastAPI()
    app.state.services = SimpleNamespace(memory_guard=SimpleNamespace(bodies=bodies),
                                         settings=SimpleNamespace(max_texts_per_request=256, auth_mode="open"))

    @app.post("/hold")
    async def hold(body: dict):
        await holding.hold()
        return {"keys": len(body)}

    install_error_handlers(app)
    app.add_middleware(ObservedASGI, metrics=metrics, max_body_bytes=4 * limit)
    try:
        with serve_in_thread(app) as url:
            yield url, bodies, holding, metrics
    finally:
        holding.released.set()


def body_of(size: int) -> bytes:
    """A JSON object of exactly ``size`` bytes."""
    return json.dumps({"pad": "x" * (size - 11)}).encode()


def refused(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("sentiment_rejected_requests_total", {"reason": "body_memory_full"}) or 0


def post_in_background(url: str, content) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def post() -> None:
        with httpx.Client(timeout=WAIT_S) as client:
            result["response"] = client.post(f"{url}/hold", content=content,
                                              headers={"Content-Type": "application/json"})

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread, result


def test_a_declared_body_past_the_budget_is_refused_before_it_is_read_and_admitted_once_room_is_freed(held_app):
    url, bodies, holding, metrics = held_app
    first, result = post_in_background(url, body_of(600))
    wait_for(lambda: holding.arrived == 1, "the first request held", timeout=WAIT_S, every=POLL_S)
    assert bodies.held == 600
    with httpx.Client(timeout=WAIT_S) as client:
        response = client.post(f"{url}/hold", content=body_of(600), headers={"Content-Type": "application/json"})
        assert response.status_code == 503
        assert response.json()["type"] == "body_memory_full" and "600 of the 1000 bytes" in response.json()["error"]
        assert int(response.headers["Retry-After"]) >= 1 and refused(metrics) == 1
        assert bodies.held == 600  # the refused body was read and dropped, not held
        holding.released.set()
        first.join(WAIT_S)
        assert result["response"].status_code == 200
        wait_for(lambda: bodies.held == 0, "every body's bytes given back", timeout=WAIT_S, every=POLL_S)
        assert client.post(f"{url}/hold", content=body_of(600), headers={"Content-Type": "application/json"}
                           ).status_code == 200  # room again: the same body is taken, on the same connection
    assert bodies.held == 0


def test_a_declared_body_that_does_not_arrive_holds_only_its_bytes_so_it_cannot_lock_other_bodies_out(held_app):
    """Red-team finding: a few connections declaring 1 MiB and sending a byte held the whole budget until their
    body deadline, and every other body was refused meanwhile."""
    url, bodies, holding, metrics = held_app
    holding.released.set()
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"POST /hold HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 900"
                     b"\r\n\r\n" + body_of(900)[:1])
        wait_for(lambda: bodies.held == 1, "the one byte sent held", timeout=WAIT_S, every=POLL_S)
        with httpx.Client(timeout=WAIT_S) as client:
            assert client.post(f"{url}/hold", content=body_of(600), headers={"Content-Type": "application/json"}
                               ).status_code == 200
        assert refused(metrics) == 0 and bodies.held == 1
    wait_for(lambda: bodies.held == 0, "every body's bytes given back", timeout=WAIT_S, every=POLL_S)


def test_a_chunked_body_is_held_as_it_arrives_and_refused_when_it_would_pass_the_budget(held_app):
    url, bodies, holding, metrics = held_app
    first, _ = post_in_background(url, body_of(600))
    wait_for(lambda: holding.arrived == 1, "the first request held", timeout=WAIT_S, every=POLL_S)
    chunks = [body_of(800)[i:i + 100] for i in range(0, 800, 100)]
    with httpx.Client(timeout=WAIT_S) as client:
        response = client.post(f"{url}/hold", content=iter(chunks), headers={"Content-Type": "application/json"})
    assert response.status_code == 503 and response.json()["type"] == "body_memory_full"
    assert "Retry-After" in response.headers and refused(metrics) == 1
    assert bodies.held == 600  # what the refused body had taken was given back
    holding.released.set()
    first.join(WAIT_S)
    wait_for(lambda: bodies.held == 0, "every body's bytes given back", timeout=WAIT_S, every=POLL_S)
    with httpx.Client(timeout=WAIT_S) as client:
        assert client.post(f"{url}/hold", content=iter(chunks), headers={"Content-Type": "application/json"}
                           ).status_code == 200


def test_a_client_still_sending_a_large_refused_body_reads_its_503_not_a_reset_connection():
    size = 4 << 20  # more than the sockets' buffers hold: the client is still sending when the server decides
    with serve_held(6 << 20) as (url, bodies, holding, metrics):
        first, _ = post_in_background(url, body_of(size))
        wait_for(lambda: holding.arrived == 1, "the first request held", timeout=WAIT_S, every=POLL_S)
        with httpx.Client(timeout=WAIT_S) as client:
            for content in (body_of(size), iter([body_of(size)[i:i + 65536] for i in range(0, size, 65536)])):
                response = client.post(f"{url}/hold", content=content, headers={"Content-Type": "application/json"})
                assert response.status_code == 503 and response.json()["type"] == "body_memory_full"
        assert refused(metrics) == 2 and bodies.held == size
        holding.released.set()
        first.join(WAIT_S)
        wait_for(lambda: bodies.held == 0, "every body's bytes given back", timeout=WAIT_S, every=POLL_S)


def test_every_way_a_request_ends_gives_its_bytes_back(held_app):
    url, bodies, holding, _ = held_app
    holding.released.set()
    with httpx.Client(timeout=WAIT_S) as client:
        assert client.post(f"{url}/hold", content=b"{not json", headers={"Content-Type": "application/json"}
                           ).status_code == 422
        assert client.post(f"{url}/hold", content=b"x" * (4 * LIMIT + 1)).status_code == 413
        assert client.post(f"{url}/nowhere", content=body_of(500)).status_code == 404
        assert client.post(f"{url}/hold", content=body_of(500), headers={"Content-Type": "text/plain"}
                           ).status_code == 415
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:  # gone mid-body
        sock.sendall(b"POST /hold HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 900\r\n\r\n"
                     + body_of(900)[:300])
        wait_for(lambda: bodies.held == 300, "the 300 bytes sent held, not the 900 declared",
                 timeout=WAIT_S, every=POLL_S)
    wait_for(lambda: bodies.held == 0, "every body's bytes given back", timeout=WAIT_S, every=POLL_S)


# --- what a parsed body costs, through the real app ---

@contextmanager
def app_in_thread(app) -> Iterator[int]:
    """Serve the real app (its lifespan included) with uvicorn in this process; yield the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), "the app to start", timeout=120, every=POLL_S)
        assert server.started, "the app did not start"
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def max_size_body(tag: str, limit: int, texts: int = 256) -> bytes:
    """``texts`` distinct texts filling ``limit`` bytes of JSON, each ending in a character outside the BMP, so
    that Python holds every one of their characters in 4 bytes: the dearest body per byte."""
    size = (limit - 16) // texts - 12
    words = "the film was a wonderful moving story " * (size // 30 + 1)
    body = json.dumps({"texts": [f"{tag}{i} {words}"[: size - 4] + "\U0001F600" for i in range(texts)]},
                      ensure_ascii=False).encode()
    assert 0.99 * limit <= len(body) <= limit
    return body


def post_raw(port: int, body: bytes) -> bytes:
    request = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
               "\r\nConnection: close\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S * 4) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(1 << 16):
            answer += chunk
    return answer


def test_a_parsed_max_size_body_costs_no_more_per_byte_than_the_plan_charges(tiny_artifact, tmp_path):
    settings = load_settings(model_path=tiny_artifact, device="cpu", database_url=f"sqlite:///{tmp_path}/s.db",
                             spool_dir=tmp_path / "spool", port=free_port(), intra_op_threads=1,
                             store_predictions=False)
    with app_in_thread(create_app(settings)) as port:
        assert post_raw(port, max_size_body("warm", settings.max_request_bytes)).startswith(b"HTTP/1.1 200")
        body = max_size_body("measured", settings.max_request_bytes)  # other texts: no cache hits
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            answer = post_raw(port, body)
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert len(body) < peak <= BODY_PARSED_PER_BYTE * len(body), f"{peak / len(body):.2f} bytes per byte of body"
