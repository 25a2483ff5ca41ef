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
  since a ``status`` child is created by its first request, must not start at 0 in a case (except the
  prediction endpoints' 200, 499, 500 and 503, which a server exports at 0: ``metrics.PREDICTION_STATUSES``);
- every series an alert selects is a family the scrape declares, and each ``label="value"`` of the
  selector (each alternative of ``label=~"a|b"``) is a value the scrape holds: a rule waiting for a
  reason, device or result the server never records (``result="error"`` when the server says
  ``"failed"``) fails here;
- the ``endpoint`` label, which a request creates: every route and RPC of the server is classified
  (inference, probe or scrape, other), the latency and shedding alerts select exactly the inference
  endpoints of every protocol and the error-rate alerts leave out exactly the probes and the scrape,
  and the live server, asked once on each protocol (gRPC included), counts its inference under
  those labels (the Grafana dashboard's panels select the same). The per-protocol promtool cases of
  tests/test_alerts.py are checked like alerts_test.yml's.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from scripts.benchlib.serverproc import free_port, start_server, stop_server
from server.http import api_routes, endpoint_label
from server.metrics import PREDICTION_ENDPOINTS, PREDICTION_STATUSES, Metrics
from tests.test_alerts import INFERENCE_ENDPOINTS, PROBE_ENDPOINTS, protocol_case_file

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "docker" / "prometheus"
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
REQUEST_LABELS = {"endpoint", "status"}  # a child per endpoint and status code, created by the first request
GPU_LABEL = "gpu"  # NVML gauges: a child per GPU, none without one
MODEL_LABELS = {"model", "version"}  # the serving model's identity: any value, but the label must be there
SYNTHETIC = {"up"}
SELECTOR = re.compile(r'([a-zA-Z_:][\w:]*)\{((?:[^}"]|"(?:[^"\\]|\\.)*")*)\}')  # a "}" may be in a value
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
    """A live server's scrape after one prediction on every protocol, and a probe."""
    grpc_port = free_port()
    server = start_server({"MODEL_PATH": str(tiny_artifact), "GRPC_PORT": str(grpc_port)},
                          tmp_path_factory.mktemp("alert-series"))
    try:
        for path, body in INFERENCE_REQUESTS.items():
            if "{version}" in path:
                version = httpx.get(server.url + "/v2/models/sentiment", timeout=30).json()["versions"][0]
                path = path.replace("{version}", version)
            answer = httpx.post(server.url + path, json=body, timeout=30)
            assert answer.status_code == 200, (path, answer.text)
        grpc_model_infer(f"127.0.0.1:{grpc_port}")
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        assert httpx.get(server.url + "/", timeout=30).status_code == 200  # KServe's liveness, on TEI's path
        return Scrape(httpx.get(server.url + "/metrics", timeout=30).text)
    finally:
        stop_server(server)


OIP_BODY = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a fine film"]}]}
INFERENCE_REQUESTS = {  # one prediction on each HTTP protocol's inference route
    "/predict": {"text": "a fine film"},
    "/": {"inputs": "a fine film"},
    "/v1/models/sentiment:predict": {"instances": ["a fine film"]},
    "/v2/models/sentiment/infer": OIP_BODY,
    "/v2/models/sentiment/versions/{version}/infer": OIP_BODY,
}


def grpc_model_infer(address: str) -> None:
    """One OIP v2 ModelInfer over gRPC, through tritonclient's stub (tests/test_protocol_oip_grpc.py says why not
    the server's generated module)."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="sentiment")
    request.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"a fine film")
    with grpc.insecure_channel(address) as channel:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)


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
    """The input series of alerts_test.yml's cases and of the per-protocol cases tests/test_alerts.py makes."""
    cases = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    cases += [case for protocol in INFERENCE_ENDPOINTS for case in protocol_case_file(protocol)["tests"]]
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
        if "status" in own and first_value(values) == 0 and (own.get("endpoint") not in PREDICTION_ENDPOINTS
                                                             or own["status"] not in PREDICTION_STATUSES):
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


# ------------------------------------------------------------ the endpoint label

GRPC_SERVICE = "/inference.GRPCInferenceService/"
# every endpoint the server counts requests under that is neither inference nor a probe or the scrape
OTHER_ENDPOINTS = {
    "/admin/reload", "/admin/keys", "/admin/keys/{key_id}", "/predictions", "/predictions/{prediction_id}",
    "/feedback", "/feedback/export", "/info", "/v1/models", "/v2", "/v2/models/{name}",
    "/v2/models/{name}/versions/{version}", "/v2/models/{name}/config", "/v2/models/{name}/versions/{version}/config",
    "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "unmatched",
    GRPC_SERVICE + "ServerMetadata", GRPC_SERVICE + "ModelMetadata", GRPC_SERVICE + "ModelConfig",
}
INFERENCE = set(INFERENCE_ENDPOINTS.values())
NOT_COUNTED_IN_ERRORS = set(PROBE_ENDPOINTS) | {"/metrics"}
# the alerts on inference traffic, and the error-rate alerts (every API request but the probes and the scrape)
INFERENCE_ALERTS = {"SentimentAnalyzerHighLatencyP99", "SentimentAnalyzerSlowP99", "SentimentAnalyzerLoadShedding",
                    "SentimentAnalyzerClientsGivingUp"}
ERROR_RATE_ALERTS = {"SentimentAnalyzerHighErrorRate", "SentimentAnalyzerElevatedErrorRate"}


def server_endpoints(make_settings) -> set[str]:
    """Every ``endpoint`` label the server can record (server/http.py ``endpoint_label``: a route's path without
    convertors, or ``unmatched``; server/protocols/oip_grpc.py: ``/inference.GRPCInferenceService/<RPC>`` of each
    ``@observed`` or ``@keyed(role)`` RPC, read from its source: importing it beside tritonclient's copy of the
    protocol clashes)."""
    from server.app import create_app

    app = create_app(make_settings())
    routes = {endpoint_label({"route": route}) for route in api_routes(app.routes)}
    routes |= {endpoint_label({"route": route}) for route in app.routes if hasattr(route, "path_format")}
    source = (ROOT / "server" / "protocols" / "oip_grpc.py").read_text()
    rpcs = {GRPC_SERVICE + name for name in re.findall(r"@(?:observed|keyed\([^)]*\))\s+async def (\w+)", source)}
    assert GRPC_SERVICE + "ModelInfer" in rpcs and len(rpcs) >= 7, rpcs  # the parse found the RPCs
    return routes | rpcs | {"unmatched"}


def promql_string(text: str) -> str:
    """The value of a PromQL double-quoted string's body."""
    return re.sub(r"\\(.)", r"\1", text)


def endpoint_matchers() -> dict[str, set[tuple[str, str]]]:
    """The (operator, regex) of every ``endpoint`` matcher, by alert."""
    found = defaultdict(set)
    for alert, _, matchers in alert_selectors():
        for label, op, value in matchers:
            if label == "endpoint":
                found[alert].add((op, promql_string(value)))
    return found


def matched(regex: str, labels: set[str]) -> set[str]:
    return {label for label in labels if re.fullmatch(regex, label)}


def test_every_endpoint_of_the_server_is_classified(make_settings) -> None:
    """A new route or RPC is inference (the latency and shedding alerts must watch it), a probe or the scrape (the
    error rate leaves it out), or other: adding it here is that decision."""
    endpoints = server_endpoints(make_settings)
    classified = INFERENCE | NOT_COUNTED_IN_ERRORS | OTHER_ENDPOINTS
    assert endpoints == classified, (f"not classified: {sorted(endpoints - classified)}; "
                                     f"not the server's: {sorted(classified - endpoints)}")
    assert not (INFERENCE & NOT_COUNTED_IN_ERRORS or INFERENCE & OTHER_ENDPOINTS
                or NOT_COUNTED_IN_ERRORS & OTHER_ENDPOINTS)


def test_inference_alerts_select_every_protocols_inference_and_nothing_else(make_settings) -> None:
    endpoints = server_endpoints(make_settings)
    matchers = endpoint_matchers()
    assert INFERENCE_ALERTS | ERROR_RATE_ALERTS == set(matchers), (
        f"alerts selecting by endpoint: {sorted(matchers)}; classify each above")
    for alert in sorted(INFERENCE_ALERTS):
        for op, regex in matchers[alert]:
            assert op == "=~", (alert, op, regex)
            selected = matched(regex, endpoints)
            assert selected == INFERENCE, (f"{alert} misses {sorted(INFERENCE - selected)} and selects "
                                           f"{sorted(selected - INFERENCE)}")
    for alert in sorted(ERROR_RATE_ALERTS):
        for op, regex in matchers[alert]:
            assert op == "!~", (alert, op, regex)
            left_out = matched(regex, endpoints)
            assert left_out == NOT_COUNTED_IN_ERRORS, (
                f"{alert} counts {sorted(NOT_COUNTED_IN_ERRORS - left_out)} and leaves out "
                f"{sorted(left_out - NOT_COUNTED_IN_ERRORS)}")


def test_kserves_liveness_probe_on_teis_path_is_counted_apart_from_teis_predictions(scrape) -> None:
    """``GET /`` (KServe's liveness) and ``POST /`` (TEI's inference) share a path: counted under one label, probes
    diluted the inference alerts' ratios (a probe at 2/s hid 10 % of clients giving up, red team helper-96)."""
    counted = scrape.values("sentiment_requests_total", "endpoint")
    assert {"/", "GET /"} <= counted and "GET /" in NOT_COUNTED_IN_ERRORS and "GET /" not in INFERENCE


def test_the_live_server_counts_each_protocols_inference_where_the_alerts_look(scrape) -> None:
    """One prediction on every protocol: each is counted, in requests and latency, under an endpoint the inference
    alerts select; every endpoint the scrape holds is one classified above."""
    (regex,) = {regex for alert in INFERENCE_ALERTS for _, regex in endpoint_matchers()[alert]}
    for sample in ("sentiment_requests_total", "sentiment_request_latency_seconds_count"):
        counted = scrape.values(sample, "endpoint")
        assert INFERENCE <= counted, f"{sample}: no request counted under {sorted(INFERENCE - counted)}"
        assert counted <= INFERENCE | NOT_COUNTED_IN_ERRORS | OTHER_ENDPOINTS, counted
        assert matched(regex, counted) == INFERENCE, sorted(matched(regex, counted))


def test_every_endpoint_an_alert_case_feeds_is_the_servers(make_settings) -> None:
    """A case cannot exercise a rule with an endpoint label the server never records."""
    endpoints = server_endpoints(make_settings)
    fed = {labels["endpoint"] for _, text, _ in input_series()
           for labels in [parse_series(text)[1]] if "endpoint" in labels}
    assert fed - endpoints == set(), sorted(fed - endpoints)
    assert INFERENCE <= fed


def test_the_dashboard_selects_the_endpoints_the_alerts_do(make_settings) -> None:
    """The dashboard's inference panels and 5xx ratio show what the alerts watch."""
    board = json.loads((ROOT / "docker" / "grafana" / "dashboards" / "sentiment-analyzer.json").read_text())
    panels = [p for row in board["panels"] for p in [row, *row.get("panels", [])]]
    exprs = [t["expr"] for p in panels for t in p.get("targets", []) if t.get("expr")]
    endpoints = server_endpoints(make_settings)
    seen = defaultdict(set)
    for expr in exprs:
        for _, body in SELECTOR.findall(expr):
            for label, op, value in MATCHER.findall(body):
                if label == "endpoint":
                    seen[op].add(frozenset(matched(promql_string(value), endpoints)))
    assert seen == {"=~": {frozenset(INFERENCE)}, "!~": {frozenset(NOT_COUNTED_IN_ERRORS)}}, seen
