"""`sentiment-analyzer status`: figures from two real scrapes, the proposed severity, templates, errors."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from scripts.benchlib.serverproc import ROOT, free_port, start_server, stop_server
from server.metrics import PREDICTION_ENDPOINTS, Metrics
from server.status import Snapshot, assess, figures, parse_metrics, quantile, render_template, render_text
from tests.store_fixtures import SqliteLock
from tests.test_alerts import INFERENCE_ENDPOINTS


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
    assert snap.severity == "P2" and any("1 GPU OOM events" in f for f in snap.findings)


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
    failing = snapshot_from(before, scrape(metrics))  # 40 predictions answered: P1 (P0 answers none)
    assert failing.severity == "P1" and failing.figures["error_rate"] == round(260 / 300, 4)
    down = Metrics()
    down.store_up.set(1)
    down.requests.labels("/predict", "500").inc(10)
    assert snapshot_from(before, scrape(down)).severity == "P0"
    quiet = snapshot_from(before, before)
    assert quiet.severity == "P3"
    assert snapshot_from(before, before, ready=False).severity == "P0"


def test_template_is_the_runbooks_filled_with_the_figures():
    metrics = Metrics()
    before = scrape(metrics)
    metrics.requests.labels("/predict", "200").inc(10)
    snap = snapshot_from(before, scrape(metrics), health={"status": "degraded", "reasons": ["database: down"]})
    alert = render_template(snap, "alert")
    assert alert.startswith(f"**INCIDENT ALERT - {snap.severity}**")
    assert "**Impact:** predictions 5.0 req/s (/predict 5.0)" in alert
    assert "prediction database down" in alert  # store_up was never set: the store is down
    assert render_template(snap, "resolved").startswith("**INCIDENT RESOLVED")
    assert "database: down" in render_text(snap)


@pytest.mark.parametrize("output", [[], ["--json"]])
def test_unreachable_server_is_one_line_on_stderr_and_exit_2(output):
    """The line was on standard output, with --json too: `status --json | jq` read it."""
    result = status_cli("--url", f"http://127.0.0.1:{free_port()}", "--interval", "0.1", "--timeout", "2", *output)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ERROR cannot reach") and "P0" in (
        result.stderr)


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
    assert result.stderr.count("\n") == 1 and "/nothing/metrics is not this server's metrics (answered 404)" in (
        result.stderr) and "base URL" in result.stderr and "P0" not in result.stderr  # a wrong URL, not an outage


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
    assert result.returncode == 2 and "not this server's metrics (no sentiment_* metrics)" in result.stderr, (
        result.stderr)


def test_live_server_with_its_database_down_is_p2_with_the_backlog(tiny_artifact, tmp_path):
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
    assert report["store_up"] is False and report["severity"] == "P2"  # predictions continue: the runbook's P2
    assert report["predict_rate_per_s"] > 0 and report["error_rate"] == 0.0
    assert any("prediction database down" in finding for finding in report["findings"])


@pytest.mark.parametrize("template", ["alert", "update", "resolved"])
def test_templates_from_the_command_line(live_server, template):
    result = status_cli("--url", live_server.url, "--interval", "0.2", "--template", template)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"**INCIDENT {template.upper()}") and "**Summary:** " + live_server.url in (
        result.stdout)


# ------------------------------------------------ the runbook's classes and the alert rules' series (red team)

GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"


def healthy_metrics() -> Metrics:
    metrics = Metrics()
    metrics.store_up.set(1)
    return metrics


def test_the_figures_select_the_series_the_alert_rules_do():
    """status read /predict alone and left 503 out of the 5xx: its regexes are now the rules' own, character for
    character, and classify every endpoint of the server as tests/test_alert_series.py does."""
    from server import status
    from tests import test_alert_series as series

    matchers: dict[str, set[tuple[str, str, str]]] = {}
    for alert, _, found in series.alert_selectors():
        matchers.setdefault(alert, set()).update((label, op, series.promql_string(v)) for label, op, v in found)
    for alert in ("SentimentAnalyzerHighErrorRate", "SentimentAnalyzerElevatedErrorRate"):
        assert {("endpoint", "!~", status.NOT_AN_ERROR_RATE_RE), ("status", "=~", "5..")} <= matchers[alert], alert
    for alert in ("SentimentAnalyzerHighLatencyP99", "SentimentAnalyzerSlowP99", "SentimentAnalyzerLoadShedding",
                  "SentimentAnalyzerClientsGivingUp"):
        assert ("endpoint", "=~", status.INFERENCE_RE) in matchers[alert], alert
    assert ("status", "=", status.CLIENT_LEFT) in matchers["SentimentAnalyzerClientsGivingUp"]
    assert ("reason", "=~", "|".join(status.SHED_REASONS)) in matchers["SentimentAnalyzerLoadShedding"]
    everything = series.INFERENCE | series.NOT_COUNTED_IN_ERRORS | series.OTHER_ENDPOINTS
    assert {e for e in everything if re.fullmatch(status.INFERENCE_RE, e)} == series.INFERENCE == set(
        PREDICTION_ENDPOINTS)
    assert {e for e in everything if re.fullmatch(status.NOT_AN_ERROR_RATE_RE, e)} == series.NOT_COUNTED_IN_ERRORS


def test_grpc_calls_shed_are_seen_and_p1():
    """600 gRPC ModelInfer calls, 582 shed: status said "/predict 0.0 req/s, shed 0.0%" and proposed P2."""
    metrics = healthy_metrics()
    before = scrape(metrics)
    metrics.requests.labels(GRPC_INFER, "200").inc(18)
    metrics.requests.labels(GRPC_INFER, "503").inc(582)
    metrics.rejected.labels("queue_full").inc(582)
    snap = snapshot_from(before, scrape(metrics))
    assert snap.figures["predict_rate_per_s"] == 300.0 and snap.figures["shed_rate"] == 0.97
    assert snap.figures["predict_endpoints"] == {GRPC_INFER: 300.0}
    assert snap.severity == "P1" and any("97.0% of inference requests shed" in f for f in snap.findings)
    text = render_text(snap)
    assert f"predictions on every inference endpoint over 2 s: 300.0 req/s ({GRPC_INFER} 300.0)" in text, text
    quiet = render_text(snapshot_from(before, before))
    assert "none on /predict, /, /v1/models/{name}:predict, /v2/models/{name}/infer, " in quiet, quiet


@pytest.mark.parametrize("endpoint", sorted(INFERENCE_ENDPOINTS.values()))
def test_every_inference_endpoint_counts_for_rate_shedding_and_latency(endpoint):
    metrics = healthy_metrics()
    before = scrape(metrics)
    metrics.requests.labels(endpoint, "200").inc(900)
    metrics.requests.labels(endpoint, "503").inc(100)
    metrics.rejected.labels("deadline").inc(100)
    for _ in range(100):
        metrics.request_latency.labels(endpoint).observe(7.0)
    metrics.requests.labels("/health", "200").inc(5000)  # probes are no prediction
    snap = snapshot_from(before, scrape(metrics))
    assert snap.figures["predict_rate_per_s"] == 500.0 and snap.figures["shed_rate"] == 0.1
    assert snap.figures["predict_p99_ms"] is not None and snap.figures["predict_p99_ms"] > 5000
    assert snap.severity == "P1" and any("p99" in f and "above 5 s" in f for f in snap.findings)


def test_error_rate_is_the_alerts_503_included_probes_left_out():
    metrics = healthy_metrics()
    before = scrape(metrics)
    metrics.requests.labels("/predict", "200").inc(90)
    metrics.requests.labels("/predict", "503").inc(6)  # draining: a 5xx, not shed
    metrics.rejected.labels("draining").inc(6)
    metrics.requests.labels("/predictions", "200").inc(4)
    metrics.requests.labels("/ready", "503").inc(1000)  # readiness answers 503 by design: no error
    snap = snapshot_from(before, scrape(metrics))
    assert snap.figures["error_rate"] == 0.06 and snap.figures["shed_rate"] == 0.0
    assert snap.severity == "P1" and any("6.0% of API requests fail with 5xx" in f for f in snap.findings)


@pytest.mark.parametrize("errors, severity", [(1, "P3"), (2, "P2"), (5, "P2"), (6, "P1")])
def test_5xx_is_p1_above_5_percent_and_p2_above_1(errors, severity):
    metrics = healthy_metrics()
    before = scrape(metrics)
    metrics.requests.labels("/predict", "200").inc(100 - errors)
    metrics.requests.labels("/predict", "500").inc(errors)
    assert snapshot_from(before, scrape(metrics)).severity == severity


@pytest.mark.parametrize("shed, severity", [(1, "P2"), (5, "P2"), (6, "P1")])
def test_shedding_is_p1_above_5_percent(shed, severity):
    metrics = healthy_metrics()
    before = scrape(metrics)
    metrics.requests.labels("/v2/models/{name}/infer", "200").inc(100 - shed)
    metrics.requests.labels("/v2/models/{name}/infer", "503").inc(shed)
    metrics.rejected.labels("queue_full").inc(shed)
    # every 503 is also a 5xx of the error rate (the rule's): below its 1 % only with other traffic beside
    metrics.requests.labels("/predictions", "200").inc(900)
    snap = snapshot_from(before, scrape(metrics))
    assert snap.severity == severity, snap.findings


@pytest.mark.parametrize("left, severity", [(0, "P3"), (5, "P3"), (6, "P1")])
def test_clients_giving_up_is_p1_above_5_percent(left, severity):
    """Clients that leave before their answer (499) are failures to them that the 5xx rate does not count."""
    metrics = healthy_metrics()
    before = scrape(metrics)
    metrics.requests.labels(GRPC_INFER, "200").inc(100 - left)
    metrics.requests.labels(GRPC_INFER, "499").inc(left)
    metrics.requests.labels("/health", "499").inc(50)  # a probe's client leaving is no prediction given up
    snap = snapshot_from(before, scrape(metrics))
    assert snap.severity == severity and snap.figures["gave_up"] == left, snap.findings
    assert snap.figures["error_rate"] == 0.0
    assert any(f"{left / 100:.1%} of inference requests' clients left" in f for f in snap.findings) == (left > 5)


def test_database_down_is_p2_predictions_continue():
    metrics = Metrics()  # sentiment_store_up 0
    before = scrape(metrics)
    metrics.requests.labels("/predict", "200").inc(100)
    metrics.store_spool_rows.set(100)
    snap = snapshot_from(before, scrape(metrics), health={"status": "degraded", "reasons": ["database: down"]})
    assert snap.severity == "P2" and any("prediction database down" in f for f in snap.findings)


def test_two_p2s_at_once_are_one_class_up():
    """Incident classes: escalate when two P2s hit the same instance at once (for example OOM and database down)."""
    metrics = Metrics()
    before = scrape(metrics)
    metrics.requests.labels("/predict", "200").inc(100)
    metrics.oom_events.labels("cuda").inc()
    snap = snapshot_from(before, scrape(metrics))
    assert snap.severity == "P1" and any("2 P2 conditions at once" in f for f in snap.findings)


def lost_health(lost_rows: int, recent: bool, uptime_s: float = 86_400.0) -> dict:
    reason = (f"{lost_rows} answered predictions' records lost since start, the last 4 s ago: in no database and no "
              "spool (the log's 'records lost' lines say why)")
    return {"status": "degraded" if recent else "ok", "reasons": [f"database: {reason}"] if recent else [],
            "uptime_s": uptime_s,
            "database": {"status": "degraded" if recent else "ok", "reason": reason if recent else None,
                         "lost_rows": lost_rows}}


def test_records_lost_are_p1():
    """/health showing lost_rows and the counter rising: status said "no impact seen ... P3"."""
    metrics = healthy_metrics()
    metrics.store_lost.inc(40)
    before = scrape(metrics)
    metrics.requests.labels("/predict", "200").inc(100)
    metrics.store_lost.inc(12)
    snap = snapshot_from(before, scrape(metrics), health=lost_health(52, recent=True))
    assert snap.severity == "P1" and any("52 answered predictions' records lost" in f for f in snap.findings)
    assert snap.figures["store_lost_records"] == 12
    assert "52 records lost" in render_text(snap) and "52 lost" in render_template(snap, "alert")
    # no loss in the window, but /health says the last was minutes ago: still P1 (the alert holds 15 minutes)
    assert snapshot_from(scrape(metrics), scrape(metrics), health=lost_health(52, recent=True)).severity == "P1"
    # a process younger than the alert's window that lost any (the rule's second clause)
    young = lost_health(52, recent=False, uptime_s=120)
    assert snapshot_from(scrape(metrics), scrape(metrics), health=young).severity == "P1"
    # long ago in an old process: said, but no P1 any more
    old = snapshot_from(scrape(metrics), scrape(metrics), health=lost_health(52, recent=False))
    assert old.severity == "P3" and any("none in the last 10 minutes" in f for f in old.findings)


def test_spool_damage_and_a_full_spool_are_p1():
    metrics = healthy_metrics()
    metrics.store_spool_lost_bytes.set(4096)
    assert snapshot_from(scrape(metrics), scrape(metrics)).severity == "P1"
    metrics = healthy_metrics()
    before = scrape(metrics)
    metrics.requests.labels("/predict", "200").inc(1000)
    metrics.requests.labels("/predict", "503").inc(2)
    metrics.rejected.labels("spool_full").inc(2)
    snap = snapshot_from(before, scrape(metrics))
    assert snap.severity == "P1" and any("spool cannot take their records" in f for f in snap.findings)


def test_an_engine_that_answers_nothing_is_p0():
    """Every /predict 503 deadline, none answered: status printed "5xx 0.0%, shed 100%" and proposed P1."""
    metrics = healthy_metrics()
    before = scrape(metrics)
    metrics.requests.labels("/predict", "503").inc(40)
    metrics.rejected.labels("deadline").inc(40)
    metrics.requests.labels("/info", "200").inc(10)  # something answers, but no prediction
    snap = snapshot_from(before, scrape(metrics))
    assert snap.severity == "P0" and any("no prediction answered" in f for f in snap.findings), snap.findings
    assert "0 of 40 answered 2xx" in render_text(snap)
    refused = healthy_metrics()  # a client whose every request is refused 401 is no outage
    before = scrape(refused)
    refused.requests.labels("/predict", "401").inc(40)
    refused.rejected.labels("unauthorized").inc(40)
    assert snapshot_from(before, scrape(refused)).severity == "P3"


@pytest.mark.parametrize("seconds, severity", [(0.4, "P3"), (2.0, "P2"), (7.0, "P1")])
def test_latency_classes_are_the_runbooks(seconds, severity):
    """p99 over 1.5x the 250 ms default objective was P1; the runbook says P1 above 5 s, P2 above 1 s."""
    metrics = healthy_metrics()
    before = scrape(metrics)
    metrics.requests.labels("/", "200").inc(100)
    for _ in range(100):
        metrics.request_latency.labels("/").observe(seconds)
    snap = snapshot_from(before, scrape(metrics))
    assert snap.severity == severity, snap.findings
    if severity == "P3":
        assert any("over the 250 ms objective" in f for f in snap.findings)


# ------------------------------------------------ answers status cannot take a snapshot from (red team, a fake server)


def answer(status: int, body: bytes) -> Callable[[BaseHTTPRequestHandler], None]:
    def send(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    return send


def this_servers() -> dict[str, Callable[[BaseHTTPRequestHandler], None]]:
    """/ready, /health and /metrics answered as this server does."""
    return {"/ready": answer(200, b'{"status": "ready"}'), "/health": answer(200, b'{"status": "ok", "reasons": []}'),
            "/metrics": answer(200, healthy_metrics().render())}


@contextlib.contextmanager
def fake_server(routes: dict[str, Callable[[BaseHTTPRequestHandler], None]]) -> Iterator[str]:
    """A server answering each path of ``routes`` with its function (404 elsewhere); yields its base URL."""
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # http.server's name
            try:
                routes.get(self.path, answer(404, b"not found"))(self)
            except OSError:  # status gave up: the client's socket is gone
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def one_error_line(result: subprocess.CompletedProcess, *said: str) -> str:
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1, result
    assert all(words in result.stderr for words in said), result.stderr
    return result.stderr


@pytest.mark.parametrize("body, why", [(b"null", "null, not an object"), (b"[1, 2]", "[1, 2], not an object"),
                                       (b'"ok"', '"ok", not an object'),
                                       (b'{"status": "ok", "reasons": 5}', "reasons not a list of strings")])
def test_health_json_that_is_not_its_object_is_not_this_servers(body, why):
    """/health answering null or [1, 2] beside valid metrics: AttributeError (a traceback) in assess_store, exit 1."""
    with fake_server({**this_servers(), "/health": answer(200, body)}) as url:
        result = status_cli("--url", url, "--interval", "0.1", "--timeout", "3")
    said = one_error_line(result, f"{url}/health is not this server's health ({why})", "base URL")
    assert "P0" not in said


def test_a_health_answered_in_time_and_the_snapshot_taken():
    """The fake's answers, as this server's, make a snapshot: the tests below differ from it by one answer."""
    with fake_server(this_servers()) as url:
        result = status_cli("--url", url, "--interval", "0.1", "--timeout", "3", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["severity"] == "P3", result


def trickle(handler: BaseHTTPRequestHandler) -> None:
    """A whole answer, status line first, one byte every half second: a minute long."""
    for byte in b'HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n{"status": "ok", "reasons": []}':
        handler.wfile.write(bytes([byte]))
        time.sleep(0.5)


def test_timeout_bounds_each_whole_fetch_not_each_read():
    """A /health trickling a byte a second held `--timeout 3` until killed: urlopen's timeout is per socket read."""
    with fake_server({**this_servers(), "/health": trickle}) as url:
        started = time.monotonic()
        result = status_cli("--url", url, "--interval", "0.1", "--timeout", "1", timeout=30)
        took = time.monotonic() - started
    said = one_error_line(result, f"answered /ready but not {url}/health (timed out: no whole answer within "
                                  "--timeout 1 s)")
    assert took < 15 and "P0" not in said, (took, said)


def test_an_endless_answer_is_read_no_further_than_16_mib():
    """An answer of no length that goes on (64 MiB here, to end the test's server) was read whole: into the memory
    of the server's container, where the runbook runs status."""
    sent: list[int] = []

    def endless(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Connection", "close")
        handler.end_headers()
        try:
            for _ in range(64):
                handler.wfile.write(b" " * 2**20)
                sent.append(2**20)
        finally:
            sent.append(0)  # done: status read it all, or left

    with fake_server({**this_servers(), "/metrics": endless}) as url:
        result = status_cli("--url", url, "--interval", "0.1", "--timeout", "10")
        deadline = time.monotonic() + 10
        while 0 not in sent and time.monotonic() < deadline:
            time.sleep(0.1)
    one_error_line(result, f"{url}/metrics answered more than 16 MiB, too large to be this server's")
    assert 0 in sent and sum(sent) < 48 * 2**20, sum(sent)  # what status read, and the sockets' buffers


def test_metrics_timing_out_after_health_answered_is_no_outage():
    """/ready and /health 200, /metrics silent: "cannot reach .../metrics: timed out ... Outage of every replica"."""
    def silent(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(5)

    with fake_server({**this_servers(), "/metrics": silent}) as url:
        result = status_cli("--url", url, "--interval", "0.1", "--timeout", "1")
    said = one_error_line(result, f"the server answered /ready and /health but not {url}/metrics (timed out",
                          "no outage of every replica")
    assert "P0" not in said and "cannot reach" not in said


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_metrics_answering_5xx_is_said_so_not_a_wrong_url(status):
    """A load balancer with no healthy backend (503) was "not this server's metrics ... give --url the base URL"."""
    with fake_server({**this_servers(), "/metrics": answer(status, b"no healthy upstream")}) as url:
        result = status_cli("--url", url, "--interval", "0.1", "--timeout", "3")
    said = one_error_line(result, f"{url}/metrics answered {status}: the server or something in front of it")
    assert "base URL" not in said and "not this server's" not in said
