"""Metrics that tell the truth: every known series exists at 0 from the start, sub-millisecond latency buckets."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.metrics import PREDICTION_ENDPOINTS, PREDICTION_STATUSES, REJECTION_REASONS, Metrics
from server.oom import FaultInjectingEngine

SERVER = Path(__file__).resolve().parent.parent / "server"
# The reasons the alerts, the dashboard and the other helpers' refusals rely on (README "## Metrics").
EXPECTED_REASONS = {"queue_full", "deadline", "draining", "too_large", "invalid", "unauthorized", "forbidden",
                    "spool_full", "slow_client", "too_many_connections", "unsupported_media_type", "not_found"}


def samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, keyed by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def test_a_fresh_metrics_renders_every_known_child_at_zero() -> None:
    exported = samples(Metrics().render().decode())

    assert EXPECTED_REASONS <= set(REJECTION_REASONS)
    for reason in REJECTION_REASONS:
        assert exported[("sentiment_rejected_requests_total", (("reason", reason),))] == 0
    for family in ("sentiment_oom_events_total", "sentiment_batch_splits_total", "sentiment_inference_errors_total"):
        for device in ("cpu", "cuda"):
            assert exported[(family, (("device", device),))] == 0, (family, device)
    for result in ("ok", "failed"):
        assert exported[("sentiment_model_reloads_total", (("result", result),))] == 0
    # the shedding and error-rate alerts divide by these: a 503 series born at the first 503 left that scrape's 503s
    # out of the denominator, and the shedding ratio read 106.8 % (red team helper-89)
    assert {"/predict", "/inference.GRPCInferenceService/ModelInfer"} <= set(PREDICTION_ENDPOINTS)
    assert {"200", "499", "503"} <= set(PREDICTION_STATUSES)
    for endpoint in PREDICTION_ENDPOINTS:
        for status in PREDICTION_STATUSES:
            key = ("sentiment_requests_total", (("endpoint", endpoint), ("status", status)))
            assert exported[key] == 0, key


def test_the_model_families_hold_the_serving_and_the_previous_models_series() -> None:
    """The previous model's series stay one swap longer, so that what it counted since the last scrape is scraped
    (removed at the swap, it was lost); the one before it is removed, so the series stay bounded."""
    metrics = Metrics()
    metrics.serving_model("sst2", "v1", ["NEGATIVE", "POSITIVE"])
    metrics.predictions.labels("sst2", "v1", "POSITIVE").inc()
    metrics.truncated.labels("sst2", "v1").inc()
    metrics.serving_model("sst2", "v1", ["NEGATIVE", "POSITIVE"])  # the same model reloaded: its counts carry on

    positive = {"model": "sst2", "version": "v1", "label": "POSITIVE"}
    assert metrics.registry.get_sample_value("sentiment_predictions_total", positive) == 1
    metrics.serving_model("three", "v2", ["neg", "neu", "pos"])
    assert metrics.registry.get_sample_value("sentiment_predictions_total", positive) == 1  # kept, not reset
    assert model_series(metrics) == {("sst2", "v1"), ("three", "v2")}
    exported = samples(metrics.render().decode())
    for family in ("sentiment_truncated_texts_total", "sentiment_low_confidence_predictions_total",
                   "sentiment_prediction_confidence_count"):
        assert exported[(family, (("model", "three"), ("version", "v2")))] == 0
    assert exported[("sentiment_truncated_texts_total", (("model", "sst2"), ("version", "v1")))] == 1

    metrics.serving_model("four", "v3", ["a", "b"])
    assert model_series(metrics) == {("three", "v2"), ("four", "v3")}
    metrics.serving_model("three", "v2", ["neg", "neu", "pos"])  # back to the previous one: nothing removed
    assert model_series(metrics) == {("three", "v2"), ("four", "v3")}


def model_series(metrics: Metrics) -> set[tuple[str, str]]:
    """(model, version) of every series of the four model families."""
    exported = samples(metrics.render().decode())
    families = ("sentiment_predictions_total", "sentiment_truncated_texts_total",
                "sentiment_low_confidence_predictions_total", "sentiment_prediction_confidence_count")
    return {(dict(labels)["model"], dict(labels)["version"]) for name, labels in exported if name in families}


def test_every_rejection_reason_the_server_records_is_declared() -> None:
    """A reason recorded but not in REJECTION_REASONS would start its series late and miss its first alert.

    Catches literal ``rejected.labels("...")`` calls; a reason computed elsewhere (a table of them) needs its own check.
    """
    recorded = {
        reason
        for path in SERVER.rglob("*.py")
        for reason in re.findall(r"rejected\.labels\(\s*(?:reason\s*=\s*)?[\"'](\w+)[\"']", path.read_text())
    }
    assert recorded, "the scan found no rejected.labels(...) call: the pattern no longer matches the code"
    assert recorded <= set(REJECTION_REASONS), recorded - set(REJECTION_REASONS)


def test_latency_histograms_have_buckets_below_a_millisecond() -> None:
    metrics = Metrics()
    metrics.queue_wait.observe(0.00007)
    metrics.inference_latency.labels("cpu").observe(0.0003)
    metrics.request_latency.labels("/health").observe(0.0004)
    exported = samples(metrics.render().decode())

    def bucket(name: str, le: str, **labels: str) -> float:
        return exported[(f"{name}_bucket", tuple(sorted({**labels, "le": le}.items())))]

    assert bucket("sentiment_queue_wait_seconds", "5e-05") == 0
    assert bucket("sentiment_queue_wait_seconds", "0.0001") == 1
    assert bucket("sentiment_inference_latency_seconds", "0.0001", device="cpu") == 0
    assert bucket("sentiment_inference_latency_seconds", "0.0005", device="cpu") == 1
    assert bucket("sentiment_request_latency_seconds", "0.0005", endpoint="/health") == 1
    assert bucket("sentiment_request_latency_seconds", "0.00025", endpoint="/health") == 0


def test_a_first_oom_is_an_increase_from_a_series_already_at_zero(make_settings) -> None:
    """The scrape before the first OOM already has the series at 0, so increase() sees the first event."""

    armed = False  # not during the start-up smoke test

    def oom_above_one(engine):
        return FaultInjectingEngine(engine, fail_when=lambda batch, length: armed and batch > 1)

    oom = ("sentiment_oom_events_total", (("device", "cpu"),))
    with TestClient(create_app(make_settings(warmup=False), wrap_engine=oom_above_one)) as client:
        before = samples(client.get("/metrics").text)
        armed = True
        assert client.post("/predict", json={"texts": ["one fine text", "another dull one"]}).status_code == 200
        after = samples(client.get("/metrics").text)

    assert before[oom] == 0
    assert after[oom] >= 1
    positive = [v for (name, labels), v in before.items()
                if name == "sentiment_predictions_total" and ("label", "POSITIVE") in labels]
    assert positive == [0]  # the model's labels, from start
    assert before[("sentiment_model_reloads_total", (("result", "failed"),))] == 0


def test_with_the_cache_disabled_no_miss_is_counted(make_settings) -> None:
    with TestClient(create_app(make_settings(enable_model_caching=False, warmup=False))) as client:
        for _ in range(2):
            assert client.post("/predict", json={"texts": ["one", "two"]}).status_code == 200
        exported = samples(client.get("/metrics").text)

    assert exported[("sentiment_cache_misses_total", ())] == 0
    assert exported[("sentiment_cache_hits_total", ())] == 0
    assert sum(v for (name, _), v in exported.items() if name == "sentiment_predictions_total") == 4
