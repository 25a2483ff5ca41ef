"""A real uvicorn on a free port: concurrency, drain on SIGTERM, and the runbook's start-up failures."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket

import httpx
import numpy as np
import pytest

from scripts.benchlib.serverproc import start_server, stop_server, wait_exit
from server.artifact import load_artifact
from server.engine import create_engine, softmax
from server.exitcodes import ExitCode
from server.tokenizer import TextEncoder, pad_batch
from tests.broken_artifacts import flip_a_byte


def distinct_texts(n: int) -> list[str]:
    words = ["good", "bad", "dull", "moving", "clever", "awful", "tender", "bland"]
    return [f"review {i}: a {' '.join(words[(i + k) % 8] for k in range(1 + i % 9))} film" for i in range(n)]


def reference(artifact_dir, make_settings, texts, variant):
    artifact = load_artifact(artifact_dir)
    engine = create_engine(artifact, make_settings(model_variant=variant))
    encoder = TextEncoder(artifact.tokenizer_path, artifact.max_length)
    return [softmax(engine.run(*pad_batch([ids])))[0] for ids in encoder.encode(texts)]


async def fire(url: str, bodies: list[dict], concurrency: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(body):
            async with gate:
                return await client.post("/predict", json=body)

        return await asyncio.gather(*(one(b) for b in bodies))


def test_concurrent_clients_each_get_exactly_their_own_prediction(tiny_artifact, make_settings, tmp_path):
    """fp32: batched results equal unbatched ones to float precision, whatever the batch-mates."""
    server = start_server({"MODEL_PATH": str(tiny_artifact), "MODEL_VARIANT": "fp32", "MAX_WAIT_MS": "5",
                           "ENABLE_MODEL_CACHING": "false"}, tmp_path)
    try:
        texts = distinct_texts(96)
        bodies = [{"text": t} for t in texts[:64]] + [{"texts": texts[i:i + 8]} for i in range(64, 96, 8)]
        responses = asyncio.run(fire(server.url, bodies, concurrency=32))
        metrics = httpx.get(server.url + "/metrics").text
    finally:
        assert stop_server(server) == 0
    assert all(r.status_code == 200 for r in responses)
    got = [p for r in responses for p in r.json()["predictions"]]
    expected = reference(tiny_artifact, make_settings, texts, "fp32")
    for prediction, probabilities in zip(got, expected, strict=True):
        np.testing.assert_allclose([prediction["probabilities"]["NEGATIVE"], prediction["probabilities"]["POSITIVE"]],
                                   probabilities, atol=1e-5)
    batch_count = float(metrics.split("sentiment_batch_size_count ")[1].split()[0])
    assert batch_count < len(texts)  # requests were batched together


def test_sigterm_drains_every_accepted_request_and_exits_zero(tiny_artifact, tmp_path):
    server = start_server({"MODEL_PATH": str(tiny_artifact), "MAX_QUEUE": "100000",
                           "ENABLE_MODEL_CACHING": "false"}, tmp_path)
    bodies = [{"texts": [f"{t} #{j}" for t in distinct_texts(200)]} for j in range(12)]

    async def post(client, body):
        try:
            return await client.post("/predict", json=body)
        except httpx.ConnectError as exc:  # never accepted: the listener had closed
            return exc

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            tasks = [asyncio.ensure_future(post(client, b)) for b in bodies]
            for _ in range(200):  # until texts are queued inside the server
                if (await client.get("/health")).json()["queue_depth"] > 0:
                    break
                await asyncio.sleep(0.02)
            server.process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    outcomes = asyncio.run(scenario())
    assert server.process.wait(60) == 0
    answered = [o for o in outcomes if isinstance(o, httpx.Response)]
    served = [o for o in answered if o.status_code == 200]
    assert served, "no request was in flight when SIGTERM arrived"
    assert all(len(o.json()["predictions"]) == 200 for o in served)
    # A request whose body had not been read when the drain began is refused as new work, never dropped:
    # 503 + Retry-After, type draining (on a busy machine some of the 12 bodies are still arriving).
    refused = [o for o in answered if o.status_code != 200]
    assert all(o.status_code == 503 and o.json()["type"] == "draining" and o.headers["Retry-After"]
               for o in refused), [(o.status_code, o.text) for o in refused]
    last_line = server.log().rstrip().splitlines()[-1]
    assert re.search(r"shutdown: answered [1-9]\d* requests during drain, abandoned 0$", last_line), last_line


def test_port_in_use_is_a_clear_error(tiny_artifact, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = start_server({"MODEL_PATH": str(tiny_artifact), "PORT": str(port)}, tmp_path, wait_ready=False)
        assert wait_exit(server) == ExitCode.PORT
    assert f"port {port} is already in use" in server.log()


def test_missing_model_file_is_a_clear_error(tiny_artifact, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_artifact, broken)
    (broken / "model.int8.onnx").unlink()
    server = start_server({"MODEL_PATH": str(broken)}, tmp_path, wait_ready=False)
    assert wait_exit(server) == ExitCode.MODEL
    assert "model file missing" in server.log() and "model.int8.onnx" in server.log()


def test_corrupt_model_file_is_refused_naming_the_file(tiny_artifact, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_artifact, broken)
    flip_a_byte(broken / "model.int8.onnx")
    server = start_server({"MODEL_PATH": str(broken)}, tmp_path, wait_ready=False)
    assert wait_exit(server) == ExitCode.MODEL
    assert "model file corrupt" in server.log() and "model.int8.onnx" in server.log()


@pytest.mark.parametrize("name, value", [("PORT", "eighty"), ("DEVICE", "tpu"), ("MAX_BATCH_SIZE", "0"),
                                         ("LOG_FORMAT", "xml")])
def test_invalid_environment_stops_start_up_with_one_line(tiny_artifact, tmp_path, name, value):
    server = start_server({"MODEL_PATH": str(tiny_artifact), name: value}, tmp_path, wait_ready=False)
    assert wait_exit(server) == ExitCode.CONFIG
    errors = [line for line in server.log().splitlines() if "invalid configuration" in line]
    assert len(errors) == 1 and f"{name}={value!r}" in errors[0]
