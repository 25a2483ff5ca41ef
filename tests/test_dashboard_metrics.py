"""Every metric the alerts, the Grafana dashboard and the runbook use is one the server exports.

The exported names come from ``server.metrics.Metrics`` itself: every family
gets at least one (labelled) sample, the registry is rendered in the
Prometheus text format and parsed back, so counters appear with ``_total``
and histograms with ``_bucket``/``_sum``/``_count`` exactly as on /metrics.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram, Summary
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "docker" / "prometheus" / "alerts.yml"
GRAFANA = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "sentiment-analyzer.json"
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"
# series Prometheus makes itself rather than scraping them
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# Not followed by ".word": sentiment_analyzer.log is a file name, not a metric.
METRIC_NAME = re.compile(r"(?<![\w:.\-/])((?:sentiment|process|python)_[a-z0-9_]+)(?![\w:]|\.\w)")
NOT_METRICS = {"sentiment_user"}  # the operators' runbook's PostgreSQL user, quoted in docs/RUNBOOK.md
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}


def exercised_metrics() -> Metrics:
    metrics = Metrics()
    for collector in vars(metrics).values():
        if not isinstance(collector, (Counter, Gauge, Histogram, Summary)):
            continue
        sample = collector.labels(*["x"] * len(collector._labelnames)) if collector._labelnames else collector
        if isinstance(collector, Counter):
            sample.inc()
        elif isinstance(collector, Gauge):
            sample.set(1)
        else:
            sample.observe(0.5)
    return metrics


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    families = list(text_string_to_metric_families(exercised_metrics().render().decode()))
    samples = {s.name for f in families for s in f.samples}
    histograms = {f.name for f in families if f.type in ("histogram", "summary")}
    own = {f.name for f in families if f.name.startswith("sentiment_") and not f.name.endswith("_created")}
    return {"samples": samples, "histograms": histograms, "families": own}


def alert_exprs() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs() -> list[str]:
    board = dashboard()
    exprs = [t["expr"] for p in panels(board) for t in p.get("targets", []) if t.get("expr")]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def names_in(texts: list[str]) -> set[str]:
    return {m.group(1) for text in texts for m in METRIC_NAME.finditer(text)}


def test_every_family_gets_a_sample(exported) -> None:
    empty = {f for f in exported["families"] if not any(s.startswith(f) for s in exported["samples"])}
    assert not empty


def test_alert_metrics_are_exported(exported) -> None:
    used = names_in(alert_exprs())
    assert "sentiment_requests_total" in used
    missing = used - exported["samples"]
    assert not missing, f"alerts.yml uses metrics the server does not export: {sorted(missing)}"
    others = {m for e in alert_exprs() for m in re.findall(r"\b([a-z_:][a-z0-9_:]*)\{", e)} - names_in(alert_exprs())
    assert others <= SYNTHETIC, f"alerts.yml uses unknown series {sorted(others - SYNTHETIC)}"


def test_dashboard_metrics_are_exported(exported) -> None:
    used = names_in(dashboard_exprs())
    missing = used - exported["samples"]
    assert not missing, f"the dashboard uses metrics the server does not export: {sorted(missing)}"


def test_runbook_metrics_are_exported(exported) -> None:
    used = names_in([RUNBOOK.read_text()]) - NOT_METRICS
    assert used
    missing = used - exported["samples"] - exported["histograms"]
    assert not missing, f"docs/RUNBOOK.md names metrics the server does not export: {sorted(missing)}"


def test_dashboard_shows_every_family(exported) -> None:
    """A family nobody can see is a family nobody watches: each one has a panel."""
    used = names_in(dashboard_exprs())
    unseen = {f for f in exported["families"] if not any(u == f or u.startswith(f + "_") for u in used)}
    assert not unseen, f"families without a dashboard panel: {sorted(unseen)}"


DASHBOARD_TOPICS = {
    "traffic": "sentiment_requests_total",
    "latency percentiles": "sentiment_request_latency_seconds_bucket",
    "batch sizes": "sentiment_batch_size_bucket",
    "queue": "sentiment_queue_depth",
    "cache": "sentiment_cache_hits_total",
    "host memory": "sentiment_process_resident_memory_bytes",
    "GPU memory": "sentiment_gpu_memory_used_bytes",
    "OOM events": "sentiment_oom_events_total",
    "CPU fallback": "sentiment_cpu_fallbacks_total",
    "database": "sentiment_store_up",
}


@pytest.mark.parametrize("topic", sorted(DASHBOARD_TOPICS))
def test_dashboard_covers(topic: str) -> None:
    assert DASHBOARD_TOPICS[topic] in names_in(dashboard_exprs()), f"no dashboard panel for {topic}"


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", f"panel {panel['title']!r}: hard-coded datasource"
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            for variable in re.findall(r"\$(\w+)", target["expr"]):
                assert variable.startswith("__") or variable in variables, f"unknown variable ${variable}"
    (datasource,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())[
        "datasources"]
    assert variables["datasource"]["current"]["value"] == datasource["uid"]
    assert variables["datasource"]["query"] == datasource["type"]


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (Debian: apt-get install prometheus)")
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every panel query is valid PromQL (Grafana variables replaced), checked by promtool as recording rules."""
    rules = []
    for n, expr in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            continue
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{n}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_live_server_exports_every_family_the_registry_declares(live_server, exported) -> None:
    """The names above come from ``Metrics``; a real server scraped over HTTP must declare the same families
    (labelled families it has not used yet still carry HELP/TYPE lines)."""
    import httpx

    assert httpx.post(live_server.url + "/predict", json={"text": "a fine film"}).status_code == 200
    scraped = text_string_to_metric_families(httpx.get(live_server.url + "/metrics").text)
    live = {f.name for f in scraped if f.name.startswith("sentiment_")}
    assert exported["families"] <= live, sorted(exported["families"] - live)
