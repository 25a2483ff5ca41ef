"""The alert rules and their promtool unit tests use the series a real server exports, label for label.

A real server (``sentiment-analyzer serve`` over HTTP, the tiny artifact, CPU) answers one prediction
and is scraped. Then:

- every series fed to a promtool case (``input_series`` of docker/prometheus/alerts_test.yml) is a
  child of that scrape with the same name and labels, less ``job`` and ``instance`` (Prometheus adds
  them). So a case cannot feed a 0 the server never exports, or a label value it never records.
  Three kinds of series are not in a fresh CPU server's scrape, each for its reason:
  ``up`` (Prometheus makes it); the GPU gauges (``gpu`` label: exported where NVML sees a GPU), whose
  label names are still checked against the family's; and the children a request creates (its
  ``endpoint`` and ``status``), which must differ from a scraped child only in those labels, and,
  since a ``status`` child is created by its first request, must not start at 0 in a case;
- every series an alert selects is a family the scrape declares, and each ``label="value"`` of the
  selector (each alternative of ``label=~"a|b"``) is a value the scrape holds: a rule waiting for a
  reason, device or result the server never records (``result="error"`` when the server says
  ``"failed"``) fails here.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from scripts.benchlib.serverproc import start_server, stop_server
from server.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "docker" / "prometheus"
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
REQUEST_LABELS = {"endpoint", "status"}  # a child per endpoint and status code, created by the first request
GPU_LABEL = "gpu"  # NVML gauges: a child per GPU, none without one
MODEL_LABELS = {"model", "version"}  # the serving model's identity: any value, but the label must be there
SYNTHETIC = {"up"}
SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
LITERAL_ALTERNATIVES = re.compile(r"[\w/.+-]+(?:\|[\w/.+-]+)*")
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")

Labels = frozenset[tuple[str, str]]


class Scrape:
    """The samples of one /metrics answer, by sample name, and the families it declares."""

    def __init__(self, text: str) -> None:
        self.children: dict[str, set[Labels]] = defaultdict(set)
        self.families: set[str] = set()
        for family in text_string_to_metric_families(text):
            self.families.add(family.name)
            for sample in family.samples:
                self.children[sample.name].add(any_model(sample.labels))

    def family_of(self, sample_name: str) -> str | None:
        if sample_name in self.families:
            return sample_name
        for suffix in SUFFIXES:
            if sample_name.endswith(suffix) and sample_name[: -len(suffix)] in self.families:
                return sample_name[: -len(suffix)]
        return None

    def values(self, sample_name: str, label: str) -> set[str]:
        return {value for labels in self.children.get(sample_name, ()) for name, value in labels if name == label}


@pytest.fixture(scope="module")
def scrape(tiny_artifact, tmp_path_factory) -> Scrape:
    server = start_server({"MODEL_PATH": str(tiny_artifact)}, tmp_path_factory.mktemp("alert-series"))
    try:
        assert httpx.post(server.url + "/predict", json={"text": "a fine film"}, timeout=30).status_code == 200
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        return Scrape(httpx.get(server.url + "/metrics", timeout=30).text)
    finally:
        stop_server(server)


def any_model(labels: dict[str, str]) -> Labels:
    """The labels with the model's name and version made wildcards (a case names a model of its own)."""
    return frozenset((k, "*" if k in MODEL_LABELS else v) for k, v in labels.items())


def declared_label_names() -> dict[str, tuple[str, ...]]:
    """Label names of every family of ``Metrics``, by family name (counters without ``_total``)."""
    metrics = Metrics()
    return {c._name: tuple(c._labelnames) for c in vars(metrics).values() if isinstance(c, MetricWrapperBase)}


def parse_series(text: str) -> tuple[str, dict[str, str]]:
    match = re.fullmatch(r"\s*([a-zA-Z_:][\w:]*)\s*(?:\{(.*)\})?\s*", text)
    assert match, f"unreadable series {text!r}"
    labels = {name: value for name, op, value in MATCHER.findall(match.group(2) or "") if op == "="}
    return match.group(1), labels


def first_value(values: str) -> float | None:
    """The first sample of a promtool values string ('_' is a missing sample)."""
    for token in values.split():
        if token.startswith("_"):
            continue
        number = re.match(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?", token)
        assert number, f"unreadable values {values!r}"
        return float(number.group(0))
    return None


def input_series() -> list[tuple[str, str, str]]:
    cases = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    return [(case["name"], s["series"], s["values"]) for case in cases for s in case.get("input_series", [])]


def alert_selectors() -> list[tuple[str, str, list[tuple[str, str, str]]]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [(rule["alert"], name, MATCHER.findall(body))
            for group in groups for rule in group["rules"] if "alert" in rule
            for name, body in SELECTOR.findall(rule["expr"])]


def test_the_files_parse_into_series_and_selectors() -> None:
    """The parsers below find what they check (so the checks cannot pass on nothing)."""
    assert len(input_series()) > 50
    selectors = alert_selectors()
    assert {name for _, name, _ in selectors} >= {"sentiment_oom_events_total", "sentiment_rejected_requests_total",
                                                   "sentiment_model_reloads_total", "up"}
    assert ("device", "=", "cpu") in {m for _, _, matchers in selectors for m in matchers}


def test_every_input_series_is_a_child_the_server_exports(scrape) -> None:
    label_names = declared_label_names()
    problems = []
    for case, text, values in input_series():
        name, labels = parse_series(text)
        assert TARGET_LABELS <= set(labels), f"{case}: {text} lacks job/instance (every scraped series has them)"
        own = {k: v for k, v in labels.items() if k not in TARGET_LABELS}
        where = f"{case}: {text}"
        if name in SYNTHETIC:
            continue
        family = scrape.family_of(name)
        if family is None:
            problems.append(f"{where}: the server exports no family {name}")
        elif GPU_LABEL in own:
            if set(own) != set(label_names.get(family, ())):
                problems.append(f"{where}: labels {sorted(own)}, the family has {label_names.get(family)}")
        elif any_model(own) not in scrape.children.get(name, set()):
            per_request = set(own) & REQUEST_LABELS
            others = any_model({k: v for k, v in own.items() if k not in REQUEST_LABELS})
            siblings = {frozenset((k, v) for k, v in child if k not in REQUEST_LABELS)
                        for child in scrape.children.get(name, ())}
            if not per_request or others not in siblings:
                problems.append(f"{where}: not a child of the live scrape "
                                f"(has {sorted(scrape.children.get(name, ()))})")
        if "status" in own and first_value(values) == 0:
            problems.append(f"{where}: a status child is created by its first request, so it cannot start at 0")
    assert not problems, "\n".join(problems)


def test_every_alert_selects_exported_children(scrape) -> None:
    problems = []
    for alert, name, matchers in alert_selectors():
        if name in SYNTHETIC:
            continue
        if scrape.family_of(name) is None:
            problems.append(f"{alert}: the server exports no {name}")
            continue
        for label, op, value in matchers:
            if label in TARGET_LABELS | REQUEST_LABELS | {GPU_LABEL} or op in ("!=", "!~"):
                continue
            exported = scrape.values(name, label)
            if op == "=":
                wanted = {value}
            elif LITERAL_ALTERNATIVES.fullmatch(value):
                wanted = set(value.split("|"))
            else:
                wanted = set() if any(re.fullmatch(value, v) for v in exported) else {value}
            missing = wanted - exported
            if missing:
                problems.append(f"{alert}: {name}{{{label}{op}{value!r}}} selects {sorted(missing)}, "
                                f"the server exports {label} in {sorted(exported)}")
    assert not problems, "\n".join(problems)


def test_the_checks_catch_a_series_the_server_never_exports(scrape) -> None:
    """The comparison is live: a failed reload labelled "error" (the server says "failed") is not a child."""
    assert frozenset({("result", "failed")}) in scrape.children["sentiment_model_reloads_total"]
    assert frozenset({("result", "error")}) not in scrape.children["sentiment_model_reloads_total"]
    assert "error" not in scrape.values("sentiment_model_reloads_total", "result")
