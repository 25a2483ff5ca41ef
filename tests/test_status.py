"""`sentiment-analyzer status`: figures from two real scrapes, the proposed severity, templates, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest

from scripts.benchlib.serverproc import ROOT, free_port, start_server, stop_server
from server.metrics import Metrics
from server.status import Snapshot, assess, figures, parse_metrics, quantile, render_template, render_text
from tests.store_fixtures import SqliteLock


def scrape(metrics: Metrics):
    return parse_metrics(metrics.render().decode())


def status_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", "status", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_quantile_follows_the_increase_between_scrapes_only():
    metrics = Metrics()
    for _ in range(1000):  # history before the window: slow requests
        metrics.request_latency.labels("/predict").observe(2.0)
    before = scrape(metrics)
    for _ in range(99):
        metrics.request_latency.labels("/predict").observe(0.003)
    metrics.request_latency.labels("/predict").observe(0.7)
    after = scrape(metrics)
    p50 = quantile(0.5, before, after, "sentiment_request_latency_seconds", endpoint="/predict")
    p99 = quantile(0.99, before, after, "sentiment_request_latency_seconds", endpoint="/predict")
    assert p50 is not None and p50 < 0.01  # the window's requests, not the 2 s history
    assert p99 is not None and p99 < 0.01 < quantile(0.999, before, after, "sentiment_request_latency_seconds",
                                                     endpoint="/predict")
    assert quantile(0.5, after, after, "sentiment_request_latency_seconds", endpoint="/predict") is None


def snapshot_from(before, after, ready: bool = True, health: dict | None = None) -> Snapshot:
    snap = Snapshot(url="http://x", interval_s=2, ready=ready, health=health or {"status": "ok", "reasons": []},
                    figures=figures(before, after, 2.0))
    assess(snap, slo_p99_ms=250)
    return snap


def test_first_oom_in_the_window_is_reported_and_raises_the_severity():
    metrics = Metrics()
    metrics.store_up.set(1)
    metrics.requests.labels("/predict", "200").inc(100)
    before = scrape(metrics)
    metrics.requests.labels("/predict", "200").inc(50)
    metrics.oom_events.labels("cuda").inc()
    metrics.batch_splits.labels("cuda").inc()
    snap = snapshot_from(before, scrape(metrics))
    assert snap.figures["oom_events"] == 1 and snap.figures["batch_splits"] == 1
    assert snap.figures["predict_rate_per_s"] == 25.0
    assert snap.severity == "P2" and any("1 OOM events" in f for f in snap.findings)


def test_failures_and_shedding_map_to_the_runbook_levels():
    metrics = Metrics()
    metrics.store_up.set(1)
    before = scrape(metrics)
    metrics.requests.labels("/predict", "200").inc(40)
    metrics.requests.labels("/predict", "503").inc(60)
    metrics.rejected.labels("queue_full").inc(60)
    shed = snapshot_from(before, scrape(metrics))
    assert shed.severity == "P1" and shed.figures["shed_rate"] == 0.6 and shed.figures["rejected"] == {
        "queue_full": 60}
    metrics.requests.labels("/predict", "500").inc(200)
    down = snapshot_from(before, scrape(metrics))
    assert down.severity == "P0" and down.figures["error_rate"] == round(200 / 300, 4)
    quiet = snapshot_from(before, before)
    assert quiet.severity == "P3"
    assert snapshot_from(before, before, ready=False).severity == "P0"


def test_template_is_the_runbooks_filled_with_the_figures():
    metrics = Metrics()
    before = scrape(metrics)
    metrics.requests.labels("/predict", "200").inc(10)
    snap = snapshot_from(before, scrape(metrics), health={"status": "degraded", "reasons": ["database: down"]})
    alert = render_template(snap, "alert")
    assert alert.startswith(f"**INCIDENT ALERT - {snap.severity}**") and "**Impact:** /predict 5.0 req/s" in alert
    assert "prediction database down" in alert  # store_up was never set: the store is down
    assert render_template(snap, "resolved").startswith("**INCIDENT RESOLVED")
    assert "database: down" in render_text(snap)


def test_unreachable_server_is_one_line_and_exit_2():
    result = status_cli("--url", f"http://127.0.0.1:{free_port()}", "--interval", "0.1", "--timeout", "2")
    assert result.returncode == 2
    assert result.stdout.count("\n") == 1 and result.stdout.startswith("ERROR cannot reach") and "P0" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flag, value, said", [
    ("--interval", "-1", "above 0"), ("--interval", "nan", "above 0"), ("--interval", "1e308", "above 0"),
    ("--timeout", "0", "at least 0.1"), ("--timeout", "1e-300", "at least 0.1"), ("--slo-p99-ms", "inf", "above 0"),
])
def test_a_setting_out_of_range_is_refused_by_name_not_a_traceback(flag, value, said):
    result = status_cli("--url", "http://127.0.0.1:1", flag, value, timeout=30)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"argument {flag}: '{value}' is not a number {said}" in result.stderr


def test_a_url_that_is_not_the_servers_base_is_one_line_and_exit_2(live_server):
    """A 404 page where /metrics should be crashed in the Prometheus parser."""
    result = status_cli("--url", live_server.url + "/nothing", "--interval", "0.1")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.count("\n") == 1 and "/nothing/metrics is not this server's metrics (answered 404)" in (
        result.stdout) and "base URL" in result.stdout and "P0" not in result.stdout  # a wrong URL, not an outage


def test_another_programs_metrics_are_not_read_as_this_servers(tmp_path):
    """Any Prometheus text was accepted: a stub serving `foo_total 1` was reported as P1, database down."""
    (tmp_path / "metrics").write_text("# TYPE foo_total counter\nfoo_total 1\n")
    port = free_port()
    stub = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        result = status_cli("--url", f"http://127.0.0.1:{port}", "--interval", "0.1")
    finally:
        stub.terminate()
        stub.wait()
    assert result.returncode == 2 and "not this server's metrics (no sentiment_* metrics)" in result.stdout, (
        result.stdout)


def test_live_server_with_its_database_down_is_p1_with_the_backlog(tiny_artifact, tmp_path):
    database = tmp_path / "live.db"
    server = start_server({"MODEL_PATH": str(tiny_artifact), "DATABASE_URL": f"sqlite:///{database}",
                           "ENABLE_MODEL_CACHING": "false", "DB_POOL_TIMEOUT_S": "0.5"}, tmp_path)
    lock = SqliteLock(database)
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            i = 0
            while not stop.is_set():
                client.post("/predict", json={"text": f"status drill {i}"})
                i += 1

    worker = threading.Thread(target=traffic, daemon=True)
    try:
        lock.acquire()
        worker.start()
        deadline = time.monotonic() + 30
        while httpx.get(server.url + "/health").json()["database"]["status"] == "ok":
            assert time.monotonic() < deadline, "the store never noticed the locked database"
            time.sleep(0.2)
        result = status_cli("--url", server.url, "--interval", "1", "--json")
    finally:
        stop.set()
        worker.join(30)
        lock.release()
        stop_server(server)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "degraded" and report["ready"] is True
    assert report["store_up"] is False and report["severity"] == "P1"
    assert report["predict_rate_per_s"] > 0 and report["error_rate"] == 0.0
    assert any("prediction database down" in finding for finding in report["findings"])


@pytest.mark.parametrize("template", ["alert", "update", "resolved"])
def test_templates_from_the_command_line(live_server, template):
    result = status_cli("--url", live_server.url, "--interval", "0.2", "--template", template)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"**INCIDENT {template.upper()}") and "**Summary:** " + live_server.url in (
        result.stdout)
