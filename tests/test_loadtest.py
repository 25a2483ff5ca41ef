"""The load test: workload, statistics and status accounting against a small fake server."""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections import Counter
from pathlib import Path

import orjson
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from models.data import LabeledData
from scripts import loadtest
from scripts.benchlib.loadgen import Sample, arrival_times, score
from scripts.benchlib.loadrun import LoadTestConfig, run_loadtest, summarize
from scripts.benchlib.workload import Workload
from tests.asgi_thread import serve_in_thread
from tests.labeled_files import write_labeled

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_app() -> FastAPI:
    """POST /predict: POSITIVE iff the text says "good"; every 4th request 503 + Retry-After, every 7th
    other one 429 without it. POST /slow answers one request at a time, 0.1 s each. GET /health."""
    app = FastAPI()
    app.state.counts = Counter()
    lock = asyncio.Lock()

    def predictions(body: dict) -> dict:
        texts = [body["text"]] if "text" in body else body["texts"]
        return {"predictions": [{"label": "POSITIVE" if "good" in t else "NEGATIVE", "score": 0.9,
                                 "cached": t.endswith("7")} for t in texts]}

    @app.post("/predict")
    async def predict(request: Request):
        n = sum(app.state.counts.values()) + 1
        status = 503 if n % 4 == 0 else 429 if n % 7 == 0 else 200
        app.state.counts[status] += 1
        if status != 200:
            headers = {"Retry-After": "1"} if status == 503 else None
            return JSONResponse({"error": "overloaded"}, status, headers=headers)
        return predictions(await request.json())

    @app.post("/slow")
    async def slow(request: Request):
        async with lock:
            await asyncio.sleep(0.1)
        return predictions(await request.json())

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


@pytest.fixture(scope="module")
def server():
    app = fake_app()
    with serve_in_thread(app) as url:
        yield app, url


@pytest.fixture
def data_file(tmp_path) -> Path:
    rows = [(f"a {'good' if i % 2 else 'bad'} film{' indeed' * (i % 5)} number {i}", i % 2) for i in range(40)]
    return write_labeled(tmp_path / "labeled.tsv", rows)


def labeled(n: int) -> LabeledData:
    return LabeledData([f"text {i} " + "x" * i for i in range(n)], [i % 2 for i in range(n)])


def test_workload_without_duplicates_sends_each_text_once_per_pass():
    workload = Workload(labeled(30), duplicate_ratio=0.0)
    draws = [workload.next() for _ in range(30)]
    assert len({d.texts[0] for d in draws}) == 30 and sum(d.duplicates for d in draws) == 0
    assert workload.next().duplicates == 1  # the second pass repeats, and says so


def test_workload_duplicate_ratio_and_bodies():
    workload = Workload(labeled(5000), duplicate_ratio=0.3, texts_per_request=4, seed=1)
    draws = [workload.next() for _ in range(250)]
    assert 0.22 < sum(d.duplicates for d in draws) / 1000 < 0.38
    assert set(draws[0].body()) == {"texts"} and len(draws[0].body()["texts"]) == 4
    single = Workload(labeled(3)).next()
    assert single.body() == {"text": single.texts[0]}
    assert single.labels == [int(single.texts[0].split()[1]) % 2]


def test_workload_length_mix_draws_from_the_chosen_class():
    data = labeled(30)  # text i is longer than text i - 1
    short = Workload(data, length_mix=(1, 0, 0))
    assert {len(short.next().texts[0]) for _ in range(20)} <= {len(t) for t in data.texts[:10]}
    long = Workload(data, length_mix=(0, 0, 2))
    assert {len(long.next().texts[0]) for _ in range(20)} <= {len(t) for t in data.texts[20:]}


@pytest.mark.parametrize("kwargs", [{"duplicate_ratio": 1.5}, {"texts_per_request": 0}, {"length_mix": (0, 0, 0)}])
def test_workload_rejects(kwargs):
    with pytest.raises(ValueError):
        Workload(labeled(10), **kwargs)


def test_score_counts_correct_and_cached():
    payload = orjson.dumps({"predictions": [{"label": "POSITIVE", "cached": True}, {"label": "NEGATIVE"},
                                            {"label": "NEGATIVE", "cached": False}]})
    assert score(payload, [1, 1, 0]) == (2, 1)
    with pytest.raises(ValueError):
        score(payload, [1])


def test_arrival_times():
    constant = arrival_times(10, 1.0, "constant", random.Random(0))
    assert constant == pytest.approx([k / 10 for k in range(10)])
    poisson = arrival_times(2000, 1.0, "poisson", random.Random(0))
    assert 1800 < len(poisson) < 2200 and poisson == sorted(poisson) and 0 < poisson[0] and poisson[-1] < 1.0
    assert len(arrival_times(20, 1.0, "constant", random.Random(0))) == 20


def test_summarize_counts_window_statuses_and_accuracy():
    def sample(due, latency, status, **kw):
        return Sample(due, due + latency, 0.0, status, texts=kw.pop("texts", 1), **kw)

    samples = [
        sample(0.5, 0.1, 200, scored=1, correct=1),  # before the window: not counted
        sample(1.0, 0.2, 200, scored=2, correct=1, texts=2, cached=1, duplicates=1),
        sample(1.5, 0.4, 200, scored=1, correct=1),
        sample(2.0, 0.1, 503, retry_after=True),
        sample(2.0, 0.1, 429),
        sample(2.5, 0.5, None, error="ClientConnectorError"),
    ]
    result = summarize(samples, window_start=1.0, cpu_seconds=0.3, wall_seconds=3.0)
    assert result["requests"] == 5 and result["ok"] == 2
    assert result["by_status"] == {"200": 2, "429": 1, "503": 1}
    assert result["errors"] == {"ClientConnectorError": 1}
    assert (result["shed"], result["shed_without_retry_after"]) == (2, 1)
    assert result["throughput_rps"] == pytest.approx(5 / 2.0)  # last completion at 3.0 s
    assert result["goodput_rps"] == pytest.approx(1.0) and result["texts_per_s"] == pytest.approx(1.5)
    assert result["latency"]["p50_ms"] == pytest.approx(300) and result["latency"]["max_ms"] == pytest.approx(400)
    assert result["accuracy"] == pytest.approx(2 / 3) and result["cached_fraction"] == pytest.approx(1 / 3)
    assert result["duplicate_fraction"] == pytest.approx(1 / 6)
    assert result["client_cpu_percent"] == pytest.approx(10) and result["client_cpu_ms_per_request"] == 50


def test_parse_args():
    args = loadtest.parse_args(["--data", "d.tsv", "--mode", "open", "--rate", "5,10", "--length-mix", "0.5,0.5,0",
                                "--header", "X-API-Key: secret"])
    config = loadtest.config_from(args)
    assert (config.mode, config.levels, config.length_mix) == ("open", [5.0, 10.0], (0.5, 0.5, 0.0))
    assert config.headers == {"X-API-Key": "secret"}
    assert loadtest.config_from(loadtest.parse_args(["--data", "d"])).levels == [1, 2, 4, 8, 16]


@pytest.mark.parametrize("extra", [["--mode", "burst"], ["--concurrency", "0"], ["--length-mix", "1,2"],
                                   ["--duplicate-ratio", "2"], ["--header", "nocolon"]])
def test_parse_args_rejects(extra):
    with pytest.raises(SystemExit):
        loadtest.parse_args(["--data", "d", *extra])


def test_closed_loop_cli_accounts_every_response(server, data_file, tmp_path, capsys):
    app, url = server
    app.state.counts.clear()
    out = tmp_path / "out"
    assert loadtest.main(["--url", url, "--data", str(data_file), "--mode", "closed", "--concurrency", "1,3",
                          "--duration", "0.6", "--warmup", "0", "--baseline-duration", "0.3",
                          "--duplicate-ratio", "0.2", "--texts-per-request", "2", "--out", str(out)]) == 0
    report = json.loads((out / "loadtest-closed.json").read_text())
    assert (out / "loadtest-closed.png").read_bytes()[:8] == PNG_MAGIC
    phases = report["phases"]
    assert [p["level"] for p in phases] == [1, 3]
    client_counts = sum((Counter({int(k): v for k, v in p["by_status"].items()}) for p in phases), Counter())
    assert client_counts == app.state.counts and {200, 429, 503} <= set(client_counts)
    for phase in phases:
        assert phase["shed"] == phase["by_status"]["503"] + phase["by_status"].get("429", 0)
        assert phase["shed_without_retry_after"] == phase["by_status"].get("429", 0)
        assert phase["accuracy"] == 1.0 and phase["scored_texts"] == 2 * phase["ok"]
        assert phase["latency"]["count"] == phase["ok"] and phase["client_cpu_ms_per_request"] > 0
    assert report["baseline"]["by_status"] == {"200": report["baseline"]["requests"]}
    assert report["headroom"]["ratio"] > 0
    printed = capsys.readouterr().out
    assert "baseline GET /health" in printed and "closed 3:" in printed and "headroom" in printed


def test_open_loop_keeps_schedule_when_the_server_is_slow(server, data_file):
    """20 requests/s against a server that serves 10/s over one connection: all 20 still leave on
    time, and the queueing shows in the latency measured from each request's scheduled time."""
    _, url = server
    config = LoadTestConfig(url=url, data=data_file, mode="open", levels=[20], duration=1.0, warmup=0.0,
                            arrival="constant", predict_path="/slow", baseline_path=None, max_connections=1)
    phase = run_loadtest(config, log=lambda line: None)["phases"][0]
    assert phase["requests"] == 20 and phase["ok"] == 20
    assert phase["achieved_send_rps"] == pytest.approx(20)
    assert phase["send_lag"]["p99_ms"] < 50
    assert phase["latency"]["max_ms"] > 600  # the last one waited behind ~1 s of earlier work


def test_connection_errors_are_counted(data_file):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once closed
    config = LoadTestConfig(url=f"http://127.0.0.1:{port}", data=data_file, levels=[1], duration=0.2, warmup=0.0,
                            baseline_path=None)
    phase = run_loadtest(config, log=lambda line: None)["phases"][0]
    assert phase["requests"] > 0 and phase["ok"] == 0 and phase["by_status"] == {}
    assert sum(phase["errors"].values()) == phase["requests"]
    assert phase["accuracy"] is None and phase["latency"]["p50_ms"] is None


def test_a_labeled_file_the_model_cannot_score_is_one_line_not_a_traceback(live_server, tmp_path, capsys):
    url = live_server.url
    three_class = tmp_path / "three.tsv"
    write_labeled(three_class, [("good", 2), ("bad", 0)])  # 2 has no name among POSITIVE / NEGATIVE
    assert loadtest.main(["--url", url, "--data", str(three_class), "--mode", "closed", "--concurrency", "1",
                          "--duration", "0.3", "--warmup", "0", "--out", str(tmp_path / "out")]) == 2
    printed = capsys.readouterr().err
    assert printed.startswith("ERROR ") and printed.count("\n") == 1 and "POSITIVE" in printed
