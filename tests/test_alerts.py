"""Prometheus config and alert rules (docker/prometheus) and the runbook they point at (docs/RUNBOOK.md).

``promtool check config``, ``promtool check rules`` and ``promtool test rules``
(the unit tests in docker/prometheus/alerts_test.yml) run when promtool is
installed (Debian package ``prometheus``); the structural checks below run
everywhere.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "docker" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERT_TESTS = PROMETHEUS / "alerts_test.yml"
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"
SEVERITIES = {"P0", "P1", "P2", "P3"}
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)")


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    slug = heading.strip().lower()
    slug = re.sub(r"[^\w\- ]", "", slug)
    return slug.replace(" ", "-")


def runbook_anchors() -> set[str]:
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", RUNBOOK.read_text(), re.M)}


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_check_config() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------- inference traffic of every protocol
#
# A deployment may serve one protocol only (the KServe InferenceService of docker/k8s/kserve speaks OIP v2, over
# HTTP or gRPC), so the latency, shedding, error-rate and giving-up alerts are checked with inference traffic on one
# endpoint at a time, beside a flood of fast probes, scrapes and metadata calls that must not dilute them. The endpoint
# labels are the server's (tests/test_alert_series.py holds the rules' lists to its routes and RPCs); the cases
# are promtool unit tests in the form of alerts_test.yml, generated here, one file per protocol.

INFERENCE_ENDPOINTS = {
    "native /predict": "/predict",
    "Hugging Face / TEI": "/",
    "KServe v1": "/v1/models/{name}:predict",
    "OIP v2 HTTP": "/v2/models/{name}/infer",
    "OIP v2 HTTP, one version": "/v2/models/{name}/versions/{version}/infer",
    "OIP v2 gRPC ModelInfer": "/inference.GRPCInferenceService/ModelInfer",
}
# liveness and readiness of every protocol (readiness answers 503 while an instance is not ready or drains)
PROBE_ENDPOINTS = [
    "GET /", "/health", "/ready", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}/ready",
    "/v2/models/{name}/versions/{version}/ready", "/v1/models/{name}", "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady", "/inference.GRPCInferenceService/ModelReady",
]
READINESS_ENDPOINTS = [e for e in PROBE_ENDPOINTS if "live" not in e.lower() and e != "/health"]
OTHER_ENDPOINTS = [  # the scrape and metadata calls
    "/metrics", "/v2", "/v2/models/{name}", "/v2/models/{name}/config", "/v1/models", "/info",
    "/inference.GRPCInferenceService/ModelMetadata", "/inference.GRPCInferenceService/ModelConfig",
]
LATENCY_LE = ("0.005", "0.05", "1.0", "2.5", "5.0", "10.0", "+Inf")  # some of the server's bucket bounds
MINUTES = 30  # the series' length: the longest `for` here is 15m
INFERENCE_RATE = 1000  # inference requests a minute
FLOOD = 20_000  # requests a minute on each probe, scrape and metadata endpoint: 18 of them dwarf the inference
TARGET = 'job="sentiment-analyzer", instance="a:8000"'


def counter(name: str, per_minute: int, **labels: str) -> dict:
    """A counter child created by its first request (a `status` child never starts at 0) or, without one, at 0."""
    text = ", ".join([TARGET, *(f'{k}="{v}"' for k, v in labels.items())])
    start = per_minute if "status" in labels else 0
    return {"series": f"{name}{{{text}}}", "values": f"{start}+{per_minute}x{MINUTES}"}


def requests(endpoint: str, **per_status: int) -> list[dict]:
    return [counter("sentiment_requests_total", n, endpoint=endpoint, status=status)
            for status, n in per_status.items() if n]


def latency(endpoint: str, per_minute: int, within: str) -> list[dict]:
    """The cumulative buckets of `per_minute` requests a minute, each taking between the bound below `within`
    and `within`."""
    reached = LATENCY_LE.index(within)
    return [counter("sentiment_request_latency_seconds_bucket", per_minute if i >= reached else 0,
                    endpoint=endpoint, le=le) for i, le in enumerate(LATENCY_LE)]


def shed(queue_full: int) -> list[dict]:
    return [counter("sentiment_rejected_requests_total", queue_full, reason="queue_full"),
            counter("sentiment_rejected_requests_total", 0, reason="deadline")]


def side_traffic(endpoints: list[str], not_ready: int = 0) -> list[dict]:
    """FLOOD fast successful requests a minute on each endpoint; readiness also answers `not_ready` 503s."""
    series = []
    for endpoint in endpoints:
        unready = not_ready if endpoint in READINESS_ENDPOINTS else 0
        series += requests(endpoint, **{"200": FLOOD, "503": unready})
        series += latency(endpoint, FLOOD + unready, "0.005")
    return series


@functools.cache
def rules_by_name() -> dict[str, dict]:
    return {rule["alert"]: rule for rule in alert_rules()}


def firing(alert: str, value: str, labels: dict[str, str]) -> dict:
    """The alert as alerts.yml has it, with the series' `labels` its expression keeps, its annotations' `$value`
    and `$labels.<name>` rendered as promtool renders `value` and `labels`."""
    rule = rules_by_name()[alert]
    annotations = {}
    for key, text in rule["annotations"].items():
        text = re.sub(r"{{\s*\$value\b[^}]*}}", value, text)
        annotations[key] = re.sub(r"{{\s*\$labels\.(\w+)\s*}}", lambda m: labels[m.group(1)], text)
    assert not any("{{" in v for v in annotations.values()), annotations
    return {"exp_labels": {**rule["labels"], **labels}, "exp_annotations": annotations}


def expect(eval_time: str, alert: str, value: str | None = None, **labels: str) -> dict:
    """`alert` fires at `eval_time` (with `labels` besides the rule's), or (value None) does not."""
    return {"eval_time": eval_time, "alertname": alert,
            "exp_alerts": [] if value is None else [firing(alert, value, labels)]}


def protocol_cases(endpoint: str) -> list[dict]:
    """promtool test cases with all inference traffic on `endpoint`."""
    everything_else = PROBE_ENDPOINTS + OTHER_ENDPOINTS
    return [
        {"name": f"{endpoint} only: 10% shed (queue full), p99 between 5 and 10 s, beside a flood of probes",
         "input_series": (requests(endpoint, **{"200": 900, "503": 100}) + latency(endpoint, INFERENCE_RATE, "10.0")
                          + shed(100) + side_traffic(everything_else)),
         "alert_rule_test": [
             expect("10m", "SentimentAnalyzerLoadShedding", "10%"),
             expect("10m", "SentimentAnalyzerHighLatencyP99", "9.95s"),
             expect("15m", "SentimentAnalyzerSlowP99", "9.95s"),
             expect("15m", "SentimentAnalyzerSheddingRequests", "500", instance="a:8000", reason="queue_full"),
         ]},
        {"name": f"{endpoint} only: 2% shed, p99 between 1 and 2.5 s (the P2 alerts, not the P1)",
         "input_series": (requests(endpoint, **{"200": 980, "503": 20}) + latency(endpoint, INFERENCE_RATE, "2.5")
                          + shed(20) + side_traffic(everything_else)),
         "alert_rule_test": [
             expect("15m", "SentimentAnalyzerSlowP99", "2.485s"),
             expect("15m", "SentimentAnalyzerSheddingRequests", "100", instance="a:8000", reason="queue_full"),
             expect("15m", "SentimentAnalyzerHighLatencyP99"),
             expect("15m", "SentimentAnalyzerLoadShedding"),
         ]},
        {"name": f"{endpoint} only: clients leave 10% before their answer (499), beside a flood of probes",
         "input_series": requests(endpoint, **{"200": 900, "499": 100}) + shed(0) + side_traffic(everything_else),
         "alert_rule_test": [
             expect("10m", "SentimentAnalyzerClientsGivingUp", "10%"),
             expect("10m", "SentimentAnalyzerHighErrorRate"),
         ]},
        {"name": f"{endpoint} only: 10% answered 500, beside a flood of readiness and liveness probes",
         "input_series": requests(endpoint, **{"200": 900, "500": 100}) + shed(0) + side_traffic(PROBE_ENDPOINTS),
         "alert_rule_test": [
             expect("10m", "SentimentAnalyzerHighErrorRate", "10%"),
             expect("20m", "SentimentAnalyzerElevatedErrorRate", "10%"),
         ]},
        # one of two instances stuck not ready (SentimentAnalyzerInstanceNotReady's case): readiness polled
        # through the Service answers 503 as often as 200, by design, and is no server error
        {"name": f"{endpoint} only, healthy, while one instance's readiness answers 503",
         "input_series": (requests(endpoint, **{"200": INFERENCE_RATE}) + latency(endpoint, INFERENCE_RATE, "0.05")
                          + shed(0) + side_traffic(everything_else, not_ready=FLOOD)),
         "alert_rule_test": [expect(f"{MINUTES - 1}m", alert) for alert in (
             "SentimentAnalyzerLoadShedding", "SentimentAnalyzerSheddingRequests", "SentimentAnalyzerHighLatencyP99",
             "SentimentAnalyzerSlowP99", "SentimentAnalyzerHighErrorRate", "SentimentAnalyzerElevatedErrorRate",
             "SentimentAnalyzerClientsGivingUp")]},
    ]


def protocol_case_file(protocol: str) -> dict:
    """The promtool test file of one protocol."""
    return {"rule_files": [str(ALERTS)], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", **case} for case in protocol_cases(INFERENCE_ENDPOINTS[protocol])]}


@needs_promtool
@pytest.mark.parametrize("protocol", sorted(INFERENCE_ENDPOINTS))
def test_inference_alerts_watch_every_protocol(protocol: str, tmp_path: Path) -> None:
    """Latency, shedding and error rate fire (and keep quiet) alike whichever protocol carries the inference."""
    path = tmp_path / "protocol_test.yml"
    path.write_text(yaml.safe_dump(protocol_case_file(protocol), sort_keys=False, width=200))
    result = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_protocol_cases_flood_the_inference_traffic() -> None:
    """Probes, scrapes and metadata outnumber inference a hundredfold, so an alert that counted them would not
    fire: the cases test the rules' endpoint lists, not only their presence."""
    assert FLOOD * len(PROBE_ENDPOINTS) > 100 * INFERENCE_RATE
    assert FLOOD * len(PROBE_ENDPOINTS + OTHER_ENDPOINTS) > 100 * INFERENCE_RATE


def test_every_alert_has_severity_summary_and_runbook() -> None:
    anchors = runbook_anchors()
    rules = alert_rules()
    assert rules
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, f"{name}: severity must be one of P0..P3"
        annotations = rule["annotations"]
        assert annotations.get("summary"), f"{name}: no summary"
        url = annotations.get("runbook_url", "")
        match = re.fullmatch(r"(?:.*/)?docs/RUNBOOK\.md#([\w\-]+)", url)
        assert match, f"{name}: runbook_url {url!r} must point at a section of docs/RUNBOOK.md"
        assert match.group(1) in anchors, f"{name}: docs/RUNBOOK.md has no section #{match.group(1)}"


def test_every_severity_is_used() -> None:
    assert {r["labels"]["severity"] for r in alert_rules()} == SEVERITIES


def test_every_alert_is_unit_tested() -> None:
    """Each alert fires in at least one promtool test case."""
    cases = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {t["alertname"] for case in cases for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    missing = {r["alert"] for r in alert_rules()} - fired
    assert not missing, f"alerts without a firing test in alerts_test.yml: {sorted(missing)}"


def test_a_healthy_server_is_quiet_for_every_alert() -> None:
    """The healthy case asserts silence for every alert, so a new rule cannot fire on normal traffic unnoticed."""
    (healthy,) = [c for c in yaml.safe_load(ALERT_TESTS.read_text())["tests"] if c["name"] == "healthy server is quiet"]
    quiet = {t["alertname"] for t in healthy["alert_rule_test"] if t["exp_alerts"] == []}
    missing = {r["alert"] for r in alert_rules()} - quiet
    assert not missing, f"the healthy case does not check {sorted(missing)}"


# counters whose alert fires on the first event: rare events, and the first request shed (see the header of
# alerts.yml)
FIRST_EVENT_ALERTS = {
    "SentimentAnalyzerHostOOM", "SentimentAnalyzerGpuOOM", "SentimentAnalyzerInferenceErrors",
    "SentimentAnalyzerModelReloadFailed", "SentimentAnalyzerSpoolFullRefusing", "SentimentAnalyzerStoreRejectedRows",
    "SentimentAnalyzerKeyCacheFallback", "SentimentAnalyzerConnectionsRefused", "SentimentAnalyzerLogLinesLost",
    "SentimentAnalyzerSheddingRequests", "SentimentAnalyzerRecordsLost",
}


@pytest.mark.parametrize("name", sorted(FIRST_EVENT_ALERTS))
def test_rare_event_alerts_fire_on_the_first_event(name: str) -> None:
    """No `for` (one event keeps increase() above 0 for less than its window), and an event before a new process's
    first scrape counts too."""
    (rule,) = [r for r in alert_rules() if r["alert"] == name]
    assert "for" not in rule, f"{name}: a `for` would let a single event pass unseen"
    assert "increase(" in rule["expr"] and "process_start_time_seconds" in rule["expr"], rule["expr"]


# the runbook's incident classes and the metric each one's alert must watch
INCIDENT_METRICS = {
    "service down": "up",
    "memory near the container limit": "sentiment_process_resident_memory_bytes",
    "container memory limit": "sentiment_memory_limit_bytes",
    "OOM events": "sentiment_oom_events_total",
    "GPU memory pressure": "sentiment_gpu_memory_used_bytes",
    "fallback to CPU": "sentiment_cpu_fallbacks_total",
    "queue saturation": "sentiment_queue_depth",
    "shedding": "sentiment_rejected_requests_total",
    "error rate": "sentiment_requests_total",
    "p99 latency": "sentiment_request_latency_seconds_bucket",
    "database degraded": "sentiment_store_up",
    "spool growing": "sentiment_store_spool_rows",
    "low-confidence drift": "sentiment_low_confidence_predictions_total",
    "drift denominator": "sentiment_predictions_total",
    "engine failures": "sentiment_inference_errors_total",
    "spool filling": "sentiment_store_spool_bytes",
    "spool cap": "sentiment_store_spool_limit_bytes",
    "records refused by the database": "sentiment_store_rejected_rows_total",
    "answered records lost": "sentiment_store_lost_records_total",
    "replay stuck": "sentiment_store_replaying",
    "slow spool disk": "sentiment_store_ack_seconds_bucket",
    "keys checked from the cache": "sentiment_auth_key_cache_fallbacks_total",
    "failed reload": "sentiment_model_reloads_total",
    "lost log lines": "sentiment_log_lines_lost_total",
}


@pytest.mark.parametrize("incident", sorted(INCIDENT_METRICS))
def test_incident_class_has_an_alert(incident: str) -> None:
    metric = INCIDENT_METRICS[incident]
    exprs = [r["expr"] for r in alert_rules()]
    assert any(re.search(rf"(?<![\w:]){re.escape(metric)}(?![\w:])", e) for e in exprs), (
        f"no alert watches {metric} ({incident})")


def test_service_down_is_p0() -> None:
    down = [r for r in alert_rules() if re.search(r"(?<![\w:])up\{", r["expr"])]
    assert any(r["labels"]["severity"] == "P0" for r in down)


# ------------------------------------------------------------------ runbook

def test_runbook_lists_every_alert() -> None:
    text = RUNBOOK.read_text()
    for rule in alert_rules():
        assert re.search(rf"^\|\s*{rule['alert']}\s*\|\s*{rule['labels']['severity']}\s*\|", text, re.M), (
            f"{rule['alert']} ({rule['labels']['severity']}) missing from the runbook's alert table")


def test_runbook_internal_links_resolve() -> None:
    anchors = runbook_anchors()
    links = re.findall(r"\]\(#([\w\-]+)\)", RUNBOOK.read_text())
    assert links
    broken = sorted(set(links) - anchors)
    assert not broken, f"links to missing sections: {broken}"


RUNBOOK_SECTIONS = ["Incident classes", "Missing model file", "OOMKilled / High Memory Usage",
                    "Database connection issues", "Model prediction errors", "Hot model reload",
                    "Spool filling or full", "Records refused by the database",
                    "Slow clients and refused connections"]
RUNBOOK_COMMANDS = [
    "/health", "/ready", "/metrics", '"status": "ok"', '"status": "degraded"',
    "docker logs sentiment-analyzer", "grep ERROR",
    # the workload is a StatefulSet; the operators' runbook's deployment/ commands are mapped to it
    "kubectl rollout undo deployment/sentiment-analyzer",
    "kubectl rollout undo statefulset/sentiment-analyzer",
    "kubectl scale statefulset/sentiment-analyzer --replicas=5",
    "pg_isready", "SPOOL_DIR",
    "sentiment-analyzer doctor", "sentiment-analyzer db upgrade",
    "sentiment-analyzer keys create --name NAME --role admin",
    'curl -X POST -H "Authorization: Bearer $ADMIN_KEY" localhost:8000/admin/reload',
    '{"model_path": ', "kill -HUP <pid>", "grep -E '401|403|security'",
]


@pytest.mark.parametrize("heading", RUNBOOK_SECTIONS)
def test_runbook_has_section(heading: str) -> None:
    assert github_anchor(heading) in runbook_anchors(), f"docs/RUNBOOK.md lacks the section {heading!r}"


@pytest.mark.parametrize("needle", RUNBOOK_COMMANDS)
def test_runbook_mentions(needle: str) -> None:
    assert needle in RUNBOOK.read_text(), f"docs/RUNBOOK.md does not mention {needle!r}"


def test_runbook_has_every_incident_class() -> None:
    text = RUNBOOK.read_text()
    for severity in sorted(SEVERITIES):
        assert re.search(rf"^\|\s*\*\*{severity}\*\*", text, re.M), f"incident class {severity} not described"
