"""Start-up failures, signals and the drain (server/lifecycle.py): real processes, real signals, real sockets.

Every wait is bounded; the only timing assertions are upper bounds with a wide margin (the drain's bound).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

import server.app
from scripts.benchlib.serverproc import ROOT, LiveServer, free_port, start_server
from server.batcher import Batcher
from server.config import load_settings
from server.exitcodes import ExitCode, StartupError
from server.lifecycle import DrainClock, DrainingServer, run_server
from server.metrics import Metrics
from server.primitives import Draining
from server.store.migrate import SchemaBehind
from tests.test_protocol_oip_v2 import create_key
from tests.waiting import wait_for  # also imported from here by test_protocol_oip_grpc

WAIT_S = 30.0
MARGIN_S = 30.0  # beyond DRAIN_GRACE_S + DRAIN_TIMEOUT_S: the store's close, process exit, a loaded machine
SHUTDOWN_LINE = re.compile(r"shutdown: answered (\d+) requests during drain, abandoned (\d+)$")


def wait_exit(live: LiveServer, timeout: float) -> tuple[int, float]:
    """The exit status and when it was seen; kills the server and fails the test past ``timeout``."""
    try:
        code = live.process.wait(timeout)
    except subprocess.TimeoutExpired:
        live.process.kill()
        pytest.fail(f"the server did not exit within {timeout} s:\n{live.log()[-3000:]}")
    return code, time.monotonic()


def shutdown_counts(live: LiveServer) -> tuple[int, int]:
    """(answered, abandoned) from the log's last line, which must be the shutdown line."""
    last = live.log().rstrip().splitlines()[-1]
    match = SHUTDOWN_LINE.search(last)
    assert match, f"the last log line is not the shutdown line: {last!r}"
    return int(match[1]), int(match[2])


def probe_ready(url: str) -> int | str:
    """/ready's status, or the name of the transport error instead of an answer."""
    try:
        return httpx.get(url + "/ready", timeout=WAIT_S).status_code
    except httpx.TransportError as error:
        return type(error).__name__


def attach_slow_sender(live: LiveServer) -> socket.socket:
    """A client that sends its headers and one byte of a 20-byte body, then nothing."""
    host, port = live.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=WAIT_S)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 20\r\n\r\n{")
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@dataclass
class Outcome:
    sent: float
    done: float
    status: int | None = None  # None: no HTTP answer
    error: str | None = None  # the transport error instead
    kind: str | None = None  # the error body's "type"
    closes: bool = False  # Connection: close
    retry_after: bool = False


def steady_traffic(url: str, worker: int, stop: threading.Event, outcomes: list[Outcome]) -> None:
    """Back-to-back /predict requests on one keep-alive client, until ``stop`` or, as a client behind a load
    balancer would, until this server says it is draining or refuses the connection."""
    with httpx.Client(base_url=url, timeout=WAIT_S) as client:
        for i in range(100_000):
            if stop.is_set():
                return
            sent = time.monotonic()
            try:
                response = client.post("/predict", json={"texts": [f"worker {worker}, review {i}.{k}: a fine film"
                                                                   for k in range(16)]})
            except httpx.TransportError as error:
                outcomes.append(Outcome(sent, time.monotonic(), error=type(error).__name__))
                if isinstance(error, httpx.ConnectError):
                    return
                continue
            outcome = Outcome(sent, time.monotonic(), response.status_code,
                              closes=response.headers.get("connection") == "close",
                              retry_after="retry-after" in response.headers)
            if response.status_code != 200:
                outcome.kind = response.json().get("type")
            outcomes.append(outcome)
            if outcome.kind == "draining":
                return


def test_sigterm_under_steady_traffic_with_a_slow_sender_attached(tiny_artifact, tmp_path):
    grace_s, drain_timeout_s, request_timeout_s = 2.0, 10.0, 4.0
    live = start_server({"MODEL_PATH": str(tiny_artifact), "DRAIN_GRACE_S": str(grace_s),
                         "DRAIN_TIMEOUT_S": str(drain_timeout_s), "REQUEST_TIMEOUT_S": str(request_timeout_s),
                         "HEADER_TIMEOUT_S": "30"}, tmp_path)
    stop, outcomes = threading.Event(), []
    workers = [threading.Thread(target=steady_traffic, args=(live.url, n, stop, outcomes)) for n in range(4)]
    try:
        for worker in workers:
            worker.start()
        wait_for(lambda: sum(o.status == 200 for o in outcomes) >= 20, "steady traffic")
        slow = attach_slow_sender(live)
        signalled = time.monotonic()
        live.process.send_signal(signal.SIGTERM)
        probes = []  # until the first answer that is not an answer: the listener has closed
        while live.process.poll() is None and (not probes or isinstance(probes[-1][1], int)):
            probes.append((time.monotonic(), probe_ready(live.url)))
            time.sleep(0.05)
        code, exited = wait_exit(live, grace_s + drain_timeout_s + MARGIN_S)
        slow_answer = read_all(slow)
    finally:
        stop.set()
        for worker in workers:
            worker.join(WAIT_S)
        live.process.kill()

    assert code == 0 and exited - signalled < grace_s + drain_timeout_s + MARGIN_S
    # Every request: answered 200 (in flight when the drain began, or before it), or refused as the drain's
    # 503 (it reached the application after the signal), or refused at connect once the listener closed.
    # Never another error, a reset, or a request left unanswered.
    refused_properly = [o for o in outcomes if o.status == 503 and o.kind == "draining" and o.closes and o.retry_after]
    wrong = [o for o in outcomes if o.status != 200 and o not in refused_properly and o.error != "ConnectError"]
    assert not wrong, wrong
    assert any(o.status == 200 and o.sent < signalled <= o.done for o in outcomes), "nothing was in flight"
    assert not any(o.error for o in outcomes if o.sent < signalled), "a request sent before the signal was refused"
    statuses = [status for _, status in probes if isinstance(status, int)]
    assert 503 in statuses and statuses == sorted(statuses), f"/ready while draining: {statuses}"
    last_answered = max(t for t, status in probes if isinstance(status, int))
    assert last_answered - signalled >= grace_s / 2, "the listener closed long before DRAIN_GRACE_S"
    assert slow_answer.startswith(b"HTTP/1.1 408") and b'"type":"request_timeout"' in slow_answer

    answered, abandoned = shutdown_counts(live)
    assert abandoned == 0
    draining_503s = len(refused_properly) + statuses.count(503)
    answers_after_signal = (sum(o.status is not None and o.done >= signalled for o in outcomes)
                            + sum(isinstance(s, int) and t >= signalled for t, s in probes) + 1)  # + the 408
    assert draining_503s <= answered <= answers_after_signal


def start_with_hanging_engine(tiny_artifact: Path, tmp_path: Path, hang_file: Path,
                              overrides: dict[str, str]) -> LiveServer:
    """Like start_server, through tests.hanging_engine_server: the engine hangs once ``hang_file`` exists."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_", "DEVICE", "PORT", "HOST"))}
    env.update({"HOST": "127.0.0.1", "PORT": str(port), "DEVICE": "cpu", "INTRA_OP_THREADS": "1",
                "MODEL_PATH": str(tiny_artifact), "DATABASE_URL": f"sqlite:///{tmp_path}/live.db",
                "SPOOL_DIR": str(tmp_path / "spool"), "LOG_FORMAT": "text", "HANG_FILE": str(hang_file),
                **overrides})
    log_path = tmp_path / "server.log"
    process = subprocess.Popen([sys.executable, "-m", "tests.hanging_engine_server"], env=env, cwd=ROOT,
                               stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    live = LiveServer(f"http://127.0.0.1:{port}", process, env, log_path)
    try:
        wait_for(lambda: process.poll() is not None or probe_ready(live.url) == 200, "ready", timeout=60)
    except BaseException:
        process.kill()
        raise
    assert process.poll() is None, live.log()
    return live


def metric(live: LiveServer, line_start: str) -> float:
    for line in httpx.get(live.url + "/metrics", timeout=WAIT_S).text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_hung_engine_call_is_abandoned_at_the_deadline_and_the_store_still_closes(tiny_artifact, tmp_path):
    grace_s, drain_timeout_s = 2.0, 3.0
    hang_file = tmp_path / "hang"
    live = start_with_hanging_engine(tiny_artifact, tmp_path, hang_file, {
        "DRAIN_GRACE_S": str(grace_s), "DRAIN_TIMEOUT_S": str(drain_timeout_s),
        "REQUEST_TIMEOUT_S": "120"})  # the batcher's own deadline must not answer the hung request first
    hung: dict[str, httpx.Response] = {}
    try:
        assert httpx.post(live.url + "/predict", json={"text": "answered before the hang"},
                          timeout=WAIT_S).status_code == 200
        ran = metric(live, "sentiment_batch_size_count")
        hang_file.touch()
        caller = threading.Thread(target=lambda: hung.update(response=httpx.post(
            live.url + "/predict", json={"text": "this one hangs"}, timeout=WAIT_S + MARGIN_S)))
        caller.start()
        wait_for(lambda: metric(live, "sentiment_batch_size_count") > ran, "the hanging engine call to start")
        signalled = time.monotonic()
        live.process.send_signal(signal.SIGTERM)
        assert wait_for(lambda: status if (status := probe_ready(live.url)) != 200 else None, "/ready") == 503
        code, exited = wait_exit(live, grace_s + drain_timeout_s + MARGIN_S)
        caller.join(WAIT_S)
    finally:
        live.process.kill()

    assert code == ExitCode.RUNTIME, live.log()[-3000:]  # a request was abandoned: not a clean drain
    assert exited - signalled < grace_s + drain_timeout_s + MARGIN_S
    response = hung["response"]
    assert response.status_code == 503 and response.json()["type"] == "draining" and response.headers["retry-after"]
    answered, abandoned = shutdown_counts(live)
    assert abandoned == 1 and answered >= 1  # at least the /ready probe that saw the 503
    log = live.log()
    assert "exiting without waiting for 1 threads still running" in log
    assert "store closed" in log
    assert "draining: 1 requests not answered" in log and "(DRAIN_GRACE_S + DRAIN_TIMEOUT_S)" in log, log[-3000:]
    with sqlite3.connect(tmp_path / "live.db") as db:
        assert [row[0] for row in db.execute("SELECT text FROM predictions")] == ["answered before the hang"]


def test_blocking_calls_hung_in_the_loops_executor_hold_neither_the_store_s_close_nor_the_loops_end(make_settings):
    """``asyncio.run`` waits for its default executor's threads at the loop's end: an API key lookup hung on a
    frozen database held a drained server's exit 26 s past "store closed" (red team helper-99). The app's
    executor is not waited for (``server.lifecycle`` then ends the process without joining what still runs), and
    the store's close does not queue its own steps behind such calls (review helper-101: every worker held by
    one, it waited for them)."""
    app = server.app.create_app(make_settings())
    release = threading.Event()

    async def serve_while_a_call_hangs() -> None:
        async with app.router.lifespan_context(app):
            for _ in range(40):  # more than the executor's workers (at most 32)
                asyncio.get_running_loop().run_in_executor(None, release.wait, 120)

    started = time.monotonic()
    try:
        asyncio.run(serve_while_a_call_hangs())
        took = time.monotonic() - started
    finally:
        release.set()
    assert took < 60, took  # start-up and shutdown of the tiny model: seconds; waiting for the call: 120


def test_an_engine_stuck_past_the_request_timeout_is_on_health_not_ready_and_not_waited_for_by_the_drain(
        tiny_artifact, tmp_path):
    """A hung engine answered every request 503 deadline while /health said ok and /ready 200, and the drain then
    waited its whole timeout for work no request waited for (red team helper-90)."""
    drain_timeout_s = 60.0
    hang_file = tmp_path / "hang"
    live = start_with_hanging_engine(tiny_artifact, tmp_path, hang_file, {
        "REQUEST_TIMEOUT_S": "1", "ENGINE_WORKERS": "1", "DRAIN_GRACE_S": "0", "DRAIN_TIMEOUT_S": str(drain_timeout_s)})
    try:
        hang_file.touch()
        response = httpx.post(live.url + "/predict", json={"text": "the engine hangs on this"}, timeout=WAIT_S)
        assert response.status_code == 503 and response.json()["type"] == "deadline"

        def stuck() -> dict | None:
            health = httpx.get(live.url + "/health", timeout=WAIT_S).json()
            return health if any(r.startswith("engine: 1 of 1 engine workers") for r in health["reasons"]) else None

        health = wait_for(stuck, "/health to say the engine is stuck")
        assert health["status"] == "degraded"
        for probe in ("/ready", "/v2/health/ready"):  # every protocol's readiness says why
            ready = httpx.get(live.url + probe, timeout=WAIT_S)
            assert ready.status_code == 503 and ready.json()["type"] == "engine_stuck", probe
        assert metric(live, "sentiment_ready") == 0
        live.process.send_signal(signal.SIGTERM)
        code, _ = wait_exit(live, drain_timeout_s / 2)  # not the drain's timeout: no request waits for the engine
    finally:
        live.process.kill()
    assert code == 0, live.log()[-3000:]
    assert "work no request waits for" in live.log()


def test_an_engine_call_left_hung_by_a_reload_is_on_health_while_the_new_model_serves(tiny_artifact, tmp_path):
    """A reload swaps a hung model out: its drain gives up once no request waits (the hung one failed at its
    deadline) and leaves the worker in its call, holding that model's threads and memory, while /health said ok: the
    stuck reason looked at the serving model's workers only."""
    hang_file = tmp_path / "hang"
    live = start_with_hanging_engine(tiny_artifact, tmp_path, hang_file, {
        "REQUEST_TIMEOUT_S": "1", "ENGINE_WORKERS": "1", "DRAIN_GRACE_S": "0", "DRAIN_TIMEOUT_S": "60"})
    try:
        hang_file.touch()  # the reloaded model's engine is not wrapped: only the first model's call hangs
        response = httpx.post(live.url + "/predict", json={"text": "the engine hangs on this"}, timeout=WAIT_S)
        assert response.status_code == 503 and response.json()["type"] == "deadline"
        live.process.send_signal(signal.SIGHUP)
        wait_for(lambda: metric(live, 'sentiment_model_reloads_total{result="ok"}') >= 1, "the reload")
        wait_for(lambda: "its workers are not waited for" in live.log(), "the retired model's drain to give up")

        def retired_stuck() -> dict | None:
            health = httpx.get(live.url + "/health", timeout=WAIT_S).json()
            return health if any("swapped out by a reload" in r for r in health["reasons"]) else None

        health = wait_for(retired_stuck, "/health to name the retired model's stuck worker")
        assert health["status"] == "degraded"
        reason = next(r for r in health["reasons"] if "swapped out by a reload" in r)
        assert reason.startswith("engine: ") and "1 engine worker on one batch" in reason, reason
        assert "Restart the instance" in reason, reason
        assert not any(r.startswith("engine: 1 of 1") for r in health["reasons"])  # the serving model's is free
        assert probe_ready(live.url) == 200  # the serving model answers: no reason to take the instance out
        answered = httpx.post(live.url + "/predict", json={"text": "the new model answers"}, timeout=WAIT_S)
        assert answered.status_code == 200
        live.process.send_signal(signal.SIGTERM)
        code, _ = wait_exit(live, WAIT_S + MARGIN_S)
    finally:
        live.process.kill()
    assert code == 0, live.log()[-3000:]


def test_a_drain_ended_by_a_second_signal_says_so_not_that_its_timeout_ran_out(tiny_artifact, tmp_path):
    """A red team read "(DRAIN_GRACE_S + DRAIN_TIMEOUT_S)" after its own second SIGTERM, 4 s into a 30 s drain, and
    the batcher's line "not answered within 0.0 s": an operator would raise DRAIN_TIMEOUT_S for nothing."""
    hang_file = tmp_path / "hang"
    live = start_with_hanging_engine(tiny_artifact, tmp_path, hang_file, {
        "DRAIN_GRACE_S": "0", "DRAIN_TIMEOUT_S": "60", "REQUEST_TIMEOUT_S": "120"})
    try:
        ran = metric(live, "sentiment_batch_size_count")
        hang_file.touch()
        caller = threading.Thread(target=lambda: httpx.post(live.url + "/predict", json={"text": "this one hangs"},
                                                            timeout=WAIT_S + MARGIN_S))
        caller.start()
        wait_for(lambda: metric(live, "sentiment_batch_size_count") > ran, "the hanging engine call to start")
        live.process.send_signal(signal.SIGTERM)
        wait_for(lambda: "draining: stopped listening" in live.log(), "the drain to wait for the hung request")
        live.process.send_signal(signal.SIGTERM)
        code, _ = wait_exit(live, WAIT_S + MARGIN_S)
        caller.join(WAIT_S)
    finally:
        live.process.kill()
    log = live.log()
    assert code == ExitCode.RUNTIME, log[-3000:]
    assert "draining: 1 requests not answered" in log and "(a second signal ended the drain)" in log, log[-3000:]
    assert "DRAIN_TIMEOUT_S): answered 503" not in log and "within 0.0 s" not in log, log[-3000:]


def test_sighup_during_start_up_is_remembered_and_the_reload_runs_once_ready(tiny_artifact, tmp_path):
    live = start_server({"MODEL_PATH": str(tiny_artifact)}, tmp_path, wait_ready=False)
    try:
        wait_for(lambda: live.process.poll() is not None or "starting:" in live.log(), "the start-up line")
        while live.process.poll() is None and probe_ready(live.url) != 200:  # bounded by start-up failing or ending
            live.process.send_signal(signal.SIGHUP)
            time.sleep(0.1)
        assert live.process.poll() is None, f"SIGHUP during start-up killed the server:\n{live.log()}"
        wait_for(lambda: "the SIGHUP during start-up asked for" in live.log(), "the deferred reload")
        wait_for(lambda: metric(live, 'sentiment_model_reloads_total{result="ok"}') >= 1, "the reload to finish")
    finally:
        live.process.send_signal(signal.SIGTERM)
        code, _ = wait_exit(live, WAIT_S + MARGIN_S)
    assert code == 0
    assert live.log().count("SIGHUP during start-up: the model reload will run once the server is ready") == 1


def test_a_sighup_in_the_first_second_of_serve_is_remembered_not_fatal(tiny_artifact, tmp_path):
    """The handler was installed after the settings and the web stack were imported: a SIGHUP 0.3-1.3 s after
    `serve` began ended the process with 129 and an empty log (red team helper-67)."""
    live = start_server({"MODEL_PATH": str(tiny_artifact)}, tmp_path, wait_ready=False)
    try:
        time.sleep(0.7)
        live.process.send_signal(signal.SIGHUP)
        wait_for(lambda: live.process.poll() is not None or probe_ready(live.url) == 200, "the server to be ready")
        assert live.process.poll() is None, f"an early SIGHUP killed the server ({live.process.returncode}):\n" \
                                            f"{live.log()}"
        wait_for(lambda: metric(live, 'sentiment_model_reloads_total{result="ok"}') >= 1, "the deferred reload")
    finally:
        live.process.send_signal(signal.SIGTERM)
        code, _ = wait_exit(live, WAIT_S + MARGIN_S)
    assert code == 0


def test_a_sigterm_before_the_loop_handles_signals_stops_at_once_with_a_line_and_status_0(tiny_artifact, tmp_path):
    """Until the event loop installs its handlers (after the settings, checks and web stack are loaded: about a
    second), a SIGTERM took its default action: exit status 143 (-15) and nothing in the log (found by a test that
    signalled right after the "starting:" line, under load). Sent as soon as the process catches it."""
    live = start_server({"MODEL_PATH": str(tiny_artifact)}, tmp_path, wait_ready=False)
    try:
        wait_for(lambda: live.process.poll() is not None or catches(live.process.pid, signal.SIGTERM),
                 "the process to catch SIGTERM", every=0.001)
        live.process.send_signal(signal.SIGTERM)
        code, _ = wait_exit(live, WAIT_S)
    finally:
        live.process.kill()
    log = live.log()
    assert code == 0 and "SIGTERM during start-up, before the model load: stopping now" in log, (code, log)
    assert "Traceback" not in log and "listening on" not in log and "during drain" not in log, log


STOPPED_DURING_START_UP = "shutdown: stopped during start-up, before listening; no request was taken"


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (its ``SigCgt`` mask in /proc)."""
    with open(f"/proc/{pid}/status") as status:
        mask = next(line.split()[1] for line in status if line.startswith("SigCgt:"))
    return bool(int(mask, 16) >> (sig - 1) & 1)


def test_sigterm_during_start_up_stops_without_saying_it_listens(tmp_path):
    """"ready: ... listening on HOST:PORT" was logged though the server, stopped during start-up, never listened.
    (The default model: the signal comes during its warm-up, ~2 s after its memory plan is logged.)"""
    live = start_server({}, tmp_path, wait_ready=False)
    try:
        wait_for(lambda: live.process.poll() is not None or "memory plan:" in live.log(), "the model's warm-up",
                 timeout=WAIT_S)
        live.process.send_signal(signal.SIGTERM)
        code, _ = wait_exit(live, WAIT_S + MARGIN_S)
    finally:
        live.process.kill()
    log = live.log()
    assert code == 0 and "during start-up: stopping once the model has loaded, without listening" in log, log
    assert "listening on" not in log and "stopping: the model has loaded" in log, log
    assert STOPPED_DURING_START_UP in log and "during drain" not in log, log


def test_a_second_sigterm_during_start_up_stops_without_waiting_for_the_model_load(tmp_path):
    """Ctrl-C twice during start-up waited for the whole model load (17 s for a red team's 10 GB artifact) before
    the process ended. The second signal now stops it at once: the default model's warm-up (~2 s after its
    memory plan is logged) never finishes, and nothing listens."""
    live = start_server({}, tmp_path, wait_ready=False)
    try:
        wait_for(lambda: live.process.poll() is not None or "memory plan:" in live.log(), "the model's warm-up",
                 timeout=WAIT_S)
        live.process.send_signal(signal.SIGTERM)
        wait_for(lambda: "during start-up: stopping once the model has loaded" in live.log(), "the first signal")
        live.process.send_signal(signal.SIGTERM)
        code, _ = wait_exit(live, WAIT_S + MARGIN_S)
    finally:
        live.process.kill()
    log = live.log()
    assert code == 0 and "SIGTERM again during start-up: stopping now" in log, log[-3000:]
    assert "the model load under way is abandoned" in log and "model-load" in log, log[-3000:]
    assert " warm on " not in log and "listening on" not in log and "Traceback" not in log, log[-3000:]
    assert STOPPED_DURING_START_UP in log and "during drain" not in log, log[-3000:]


async def test_a_second_sigterm_while_the_store_starts_waits_for_it(make_settings, caplog):
    """A second signal cuts start-up only while the model loads: a schema migration or a spool replay under way is
    not cut in the middle (SQLite's DDL is not transactional)."""
    settings = make_settings()
    draining = DrainingServer(server.app.create_app(settings), settings)
    starting = asyncio.get_running_loop().create_task(asyncio.sleep(60))  # start-up, past the model load
    draining._starting = starting
    with caplog.at_level(logging.WARNING, logger="server.lifecycle"):
        draining.begin_drain("SIGTERM")
        draining.begin_drain("SIGTERM")
    await asyncio.sleep(0)
    assert not starting.cancelled(), "start-up was cut while the store started"
    assert "SIGTERM again during start-up: stopping once the store has started" in caplog.text
    starting.cancel()


def test_a_reload_under_way_at_sigterm_is_said_to_be_abandoned(tmp_path):
    """Shutdown cancels a SIGHUP's reload: the model it was loading was dropped without a word, after a "warm"
    line that read as if it had been swapped in. (The default model: its load outlasts the signal's handling.)"""
    live = start_server({"DRAIN_GRACE_S": "0"}, tmp_path)
    live.process.send_signal(signal.SIGHUP)
    time.sleep(0.2)
    live.process.send_signal(signal.SIGTERM)
    code, _ = wait_exit(live, WAIT_S + MARGIN_S)
    assert code == 0
    log = live.log()
    assert re.search(r"WARNING .*model reload from \S+ abandoned: the server is shutting down \(still serving "
                     r"sentiment-distilbert-minilm ", log), log
    assert "model reloaded" not in log


def test_a_model_load_under_way_holds_neither_the_exit_nor_the_log_clean(tmp_path):
    """A reload asked over HTTP, still loading at the drain's deadline: the client gets 503, the process ends
    without waiting for the load (it ran on the loop's default executor, which the loop's close waits for: 24-28 s
    past the signal for a 15 s load, a second SIGTERM or not), and the log has no ERROR "Exception in ASGI
    application" with a traceback for the cancelled handler (red team helper-67)."""
    database = f"sqlite:///{tmp_path}/live.db"
    live = start_server({"DRAIN_GRACE_S": "0", "DRAIN_TIMEOUT_S": "0.2", "DATABASE_URL": database}, tmp_path)
    key = create_key(database, "admin")
    answers: list[httpx.Response] = []
    reload = threading.Thread(target=lambda: answers.append(httpx.post(
        live.url + "/admin/reload", headers={"Authorization": f"Bearer {key}"}, json={}, timeout=WAIT_S)))
    try:
        reload.start()
        # at once when the reload starts: its load (~2 s on the development VM) outlasts the drain (0.2 s) and the
        # exit's grace for threads (1 s); sent at its warm-up (the last ~1.3 s), the load ended within the grace
        wait_for(lambda: ": loading (serving " in live.log(), "the reload to start",
                 timeout=WAIT_S, every=0.001)
        live.process.send_signal(signal.SIGTERM)
        code, _ = wait_exit(live, WAIT_S + MARGIN_S)
        reload.join(WAIT_S)
    finally:
        live.process.kill()
    log = live.log()
    assert answers and answers[0].status_code == 503 and answers[0].json()["type"] == "draining", answers
    assert "exiting without waiting for 1 threads still running" in log and "model-reload" in log, log[-3000:]
    assert "Exception in ASGI application" not in log and "Traceback" not in log, log[-3000:]
    assert "model reloaded" not in log and code == ExitCode.RUNTIME, (code, log[-3000:])


@pytest.mark.parametrize("error, code", [
    (StartupError("SPOOL_DIR /data/spool is locked by another server process (pid 4242); stop it or give this "
                  "one its own SPOOL_DIR", ExitCode.SPOOL_LOCKED), ExitCode.SPOOL_LOCKED),
    (SchemaBehind("the database schema is at 0001, this server needs 0002: run `sentiment-analyzer db upgrade`"),
     ExitCode.DATABASE),
], ids=["spool-locked", "schema-behind"])
def test_a_start_up_error_in_the_lifespan_is_one_line_and_its_exit_code(make_settings, monkeypatch, caplog,
                                                                        error, code):
    async def failing_build_services(*args, **kwargs):
        raise error

    monkeypatch.setattr(server.app, "build_services", failing_build_services)
    settings = make_settings()
    with caplog.at_level(logging.INFO):
        assert run_server(settings) == code
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [f"cannot start: {error}"]
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged"
    with socket.socket() as probe:  # the port was never opened
        probe.bind((settings.host, settings.port))


def test_a_second_server_on_the_same_spool_dir_stops_with_one_line_and_spool_locked(tiny_artifact, tmp_path):
    """The lifespan's StartupError from a real cause: the first server holds SPOOL_DIR's lock."""
    spool = {"MODEL_PATH": str(tiny_artifact), "SPOOL_DIR": str(tmp_path / "spool")}
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = start_server(spool, tmp_path / "first")
    try:
        second = start_server(spool, tmp_path / "second", wait_ready=False)
        code, _ = wait_exit(second, 60)
    finally:
        first.process.send_signal(signal.SIGTERM)
        assert wait_exit(first, WAIT_S + MARGIN_S)[0] == 0
    assert code == ExitCode.SPOOL_LOCKED
    errors = [line for line in second.log().splitlines() if " ERROR " in line or "Traceback" in line]
    assert len(errors) == 1 and "cannot start: SPOOL_DIR" in errors[0], second.log()


class GatedEngine:
    device, provider, variant = "cpu", "CPUExecutionProvider", "fp32"

    def __init__(self) -> None:
        self.gate = threading.Event()

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self.gate.wait(WAIT_S)
        return np.zeros((len(input_ids), 2), dtype=np.float32)


async def test_batcher_drain_fails_what_is_unanswered_at_its_time_limit_without_joining_a_hung_engine():
    engine = GatedEngine()
    batcher = Batcher(engine, load_settings(engine_workers=1, max_wait_ms=0), Metrics())
    batcher.start()
    running = asyncio.ensure_future(batcher.submit([np.array([101, 7, 102])]))
    queued = asyncio.ensure_future(batcher.submit([np.array([101, 8, 102])]))
    await asyncio.sleep(0.05)
    try:
        assert await batcher.drain(timeout=0.2) == 2
        for request in (running, queued):
            with pytest.raises(Draining):
                await request
    finally:
        engine.gate.set()
        await asyncio.sleep(0.2)  # the released engine call hands its batch back while this loop still runs


async def test_batcher_counts_workers_on_one_batch_past_a_time_and_its_drain_leaves_work_nobody_waits_for():
    engine = GatedEngine()
    batcher = Batcher(engine, load_settings(engine_workers=1, max_wait_ms=0), Metrics())
    batcher.start()
    left = asyncio.ensure_future(batcher.submit([np.array([101, 7, 102])]))
    try:
        await asyncio.sleep(0.2)
        stuck, longest = batcher.stuck_workers(0.1)
        assert stuck == 1 and longest >= 0.2 and batcher.stuck_workers(WAIT_S)[0] == 0
        left.cancel()  # its client went: the engine call runs on for nobody
        assert await asyncio.wait_for(batcher.drain(timeout=10 * WAIT_S), WAIT_S / 3) == 0  # the call runs WAIT_S
    finally:
        engine.gate.set()
        await asyncio.sleep(0.2)
    assert batcher.stuck_workers(0.0) == (0, 0.0)


async def test_batcher_drain_answers_everything_within_its_time_limit():
    engine = GatedEngine()
    engine.gate.set()
    batcher = Batcher(engine, load_settings(engine_workers=1), Metrics())
    batcher.start()
    request = asyncio.ensure_future(batcher.submit([np.array([101, 7, 102])]))
    await asyncio.sleep(0.05)  # submitted before the drain began
    assert await batcher.drain(timeout=WAIT_S) == 0
    assert len(await request) == 1



def test_a_third_signal_leaves_the_drain_marked_as_ended_by_a_signal():
    """The second signal moves the deadline to now; a third one then found "now" past that deadline and unmarked
    the drain, whose log line then blamed DRAIN_GRACE_S + DRAIN_TIMEOUT_S."""
    clock = DrainClock.starting_now(load_settings(drain_grace_s=5, drain_timeout_s=30))
    assert not clock.ended_early
    clock.end_now()
    assert clock.ended_early and clock.deadline <= time.monotonic()
    time.sleep(0.01)
    clock.end_now()
    assert clock.ended_early
