"""Prometheus config and alert rules (docker/prometheus) and the runbook they point at (docs/RUNBOOK.md).

``promtool check config``, ``promtool check rules`` and ``promtool test rules``
(the unit tests in docker/prometheus/alerts_test.yml) run when promtool is
installed (Debian package ``prometheus``); the structural checks below run
everywhere.
"""

from __future__ import annotations

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


# counters of rare events: their alert fires on the first one (see the header of alerts.yml)
FIRST_EVENT_ALERTS = {
    "SentimentAnalyzerHostOOM", "SentimentAnalyzerGpuOOM", "SentimentAnalyzerInferenceErrors",
    "SentimentAnalyzerModelReloadFailed", "SentimentAnalyzerSpoolFullRefusing", "SentimentAnalyzerStoreRejectedRows",
    "SentimentAnalyzerKeyCacheFallback", "SentimentAnalyzerConnectionsRefused",
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
    "replay stuck": "sentiment_store_replaying",
    "slow spool disk": "sentiment_store_ack_seconds_bucket",
    "keys checked from the cache": "sentiment_auth_key_cache_fallbacks_total",
    "failed reload": "sentiment_model_reloads_total",
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
