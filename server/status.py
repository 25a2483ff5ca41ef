"""`sentiment-analyzer status --url URL`: the incident snapshot for the runbook's first five minutes.

It reads ``/health`` and ``/ready`` once and ``/metrics`` twice, ``--interval`` seconds
apart, so rates and latency percentiles describe the last few seconds rather than
the process's whole life. The figures are over the series the alert rules select
(docker/prometheus/alerts.yml): prediction traffic on every protocol's inference endpoint, the
error rate of every request but the probes and the scrape, 503 included. From them it proposes
a severity on the runbook's P0-P3 scale, at the rules' thresholds (a proposal: the incident
commander decides), and can fill the runbook's communication templates. It needs only the standard library and
prometheus-client, so the command works from inside the slim server image.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from server.metrics import PREDICTION_ENDPOINTS

Samples = dict[tuple[str, frozenset], float]

# The series the alert rules (docker/prometheus/alerts.yml) select, as their regexes (PromQL's are fully anchored:
# ``re.fullmatch``). Inference: every protocol's prediction route and RPC (server/http.py ``endpoint_label``), as
# SentimentAnalyzerHighLatencyP99 and SentimentAnalyzerLoadShedding select them; the error rate counts every request
# but the liveness and readiness probes of each protocol and the scrape, as SentimentAnalyzerHighErrorRate does.
INFERENCE_RE = (r"/predict|/|/v1/models/\{name\}:predict|/v2/models/\{name\}(/versions/\{version\})?/infer"
                r"|/inference\.GRPCInferenceService/ModelInfer")
NOT_AN_ERROR_RATE_RE = (r"GET /|/health|/ready|/metrics|/v2/health/(live|ready)"
                        r"|/v2/models/\{name\}(/versions/\{version\})?/ready|/v1/models/\{name\}"
                        r"|/inference\.GRPCInferenceService/(ServerLive|ServerReady|ModelReady)")
SHED_REASONS = ("queue_full", "deadline", "body_memory_full")  # SentimentAnalyzerLoadShedding's reason=~
CLIENT_LEFT = "499"  # SentimentAnalyzerClientsGivingUp's status: a client gone before its answer (server.http)
RECORDS_LOST_WINDOW_S = 900  # SentimentAnalyzerRecordsLost: increase over 15m, or any in a process younger than that


MAX_ANSWER_BYTES = 16 * 2**20  # per fetch: a real /metrics of this server is well under 1 MiB
CHUNK_BYTES = 2**16


class StatusError(RuntimeError):
    """The snapshot could not be taken; the message says why in one line (exit 2)."""


class Unreachable(StatusError):
    """No answer at all from ``url``: perhaps every replica is down."""

    def __init__(self, url: str, reason: object) -> None:
        super().__init__(f"cannot reach {url}: {reason}")
        self.url, self.reason = url, reason


class NotThisServer(StatusError):
    """Something answered at --url, but not as this server does: a wrong URL, not an outage."""


def fetch(url: str, timeout: float) -> tuple[int, bytes]:
    """(status, body) of a GET; any HTTP status is an answer. ``timeout`` bounds the whole fetch, hence the thread:
    urlopen's bounds each socket read, and a server trickling a byte a second held status forever. No whole answer
    in time raises ``Unreachable``."""
    outcome: list[Any] = []

    def get() -> None:
        try:
            outcome.append(read_answer(url, timeout))
        except Exception as error:  # raised again below, in the caller's thread
            outcome.append(error)

    worker = threading.Thread(target=get, name="status-fetch", daemon=True)  # left behind on a timeout: status exits
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise Unreachable(url, f"timed out: no whole answer within --timeout {timeout:g} s")
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def read_answer(url: str, timeout: float) -> tuple[int, bytes]:
    """A GET read in chunks up to ``MAX_ANSWER_BYTES``: an endless body was read whole, into the memory of the
    server's container when status runs there (as the runbook does)."""
    try:
        try:
            response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (the operator's own URL)
        except urllib.error.HTTPError as error:
            response = error
        with response:
            body = bytearray()
            while chunk := response.read(CHUNK_BYTES):
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise NotThisServer(f"{url} answered more than {MAX_ANSWER_BYTES // 2**20} MiB, too large to "
                                        "be this server's (its /metrics is well under 1 MiB): give --url the "
                                        "server's base URL, e.g. http://127.0.0.1:8000")
            return response.status, bytes(body)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as error:
        raise Unreachable(url, getattr(error, "reason", None) or error) from None


def scrape(base: str, timeout: float) -> Samples:
    """``/metrics`` parsed; a 5xx raises ``StatusError`` (the server or a proxy failed), anything else but a 200
    in Prometheus' format ``NotThisServer``."""
    status, body = fetch(base + "/metrics", timeout)
    if 500 <= status <= 599:  # a load balancer with no healthy backend answers 503: no wrong URL
        raise StatusError(f"{base}/metrics answered {status}: the server or something in front of it (a proxy, a "
                          "load balancer with no healthy backend) failed")
    try:
        if status != 200:
            raise ValueError(f"answered {status}")
        samples = parse_metrics(body.decode())
        if not any(name.startswith("sentiment_") for name, _ in samples):
            raise ValueError("no sentiment_* metrics")
        return samples
    except ValueError as error:  # UnicodeDecodeError too
        why = (str(error).strip().splitlines() or ["unreadable"])[0][:200]
        raise NotThisServer(f"{base}/metrics is not this server's metrics ({why}): give --url the "
                            "server's base URL, e.g. http://127.0.0.1:8000") from None


def read_health(base: str, status: int, body: bytes) -> dict[str, Any]:
    """/health's JSON object. One not JSON is said and the snapshot goes on; JSON that is no such object (``null``,
    a list, ``reasons`` not a list of strings) is not this server's: it was a traceback further on."""
    try:
        health = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deeply
        return {"status": f"unreadable ({status})", "reasons": ["/health did not answer JSON"]}
    reasons = (health.get("reasons") or []) if isinstance(health, dict) else None
    if not (isinstance(reasons, list) and all(isinstance(reason, str) for reason in reasons)):
        what = "reasons not a list of strings" if isinstance(health, dict) else (
            f"{json.dumps(health)[:40]}, not an object")
        raise NotThisServer(f"{base}/health is not this server's health ({what}): give --url the server's base "
                            "URL, e.g. http://127.0.0.1:8000")
    return health


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed by (name, labels)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def by_label(samples: Samples, name: str, label: str, **labels: str) -> dict[str, float]:
    """Samples of ``name`` whose labels include ``labels``, summed per value of ``label``."""
    wanted = set(labels.items())
    values: dict[str, float] = defaultdict(float)
    for (n, ls), v in samples.items():
        if n == name and wanted <= ls:
            values[dict(ls).get(label, "")] += v
    return dict(values)


def quantile(q: float, before: Samples, after: Samples, name: str, *, endpoints: str | None = None,
             **labels: str) -> float | None:
    """``histogram_quantile`` over the increase between two scrapes (linear within a bucket), in seconds; with
    ``endpoints``, over the series whose ``endpoint`` label fully matches that regex, summed by bucket."""
    wanted = set(labels.items())
    buckets: dict[float, float] = {}
    for (n, ls), v in after.items():
        if n == f"{name}_bucket" and wanted <= ls and (
                endpoints is None or re.fullmatch(endpoints, dict(ls).get("endpoint", ""))):
            le = float(dict(ls)["le"])
            buckets[le] = buckets.get(le, 0.0) + max(0.0, v - before.get((n, ls), 0.0))
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bucket: its bound is all that is known
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


@dataclass
class Snapshot:
    url: str
    interval_s: float
    ready: bool
    health: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)
    severity: str = "P3"
    findings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.url, "interval_s": self.interval_s, "ready": self.ready,
                "status": self.health.get("status"), "reasons": self.health.get("reasons", []),
                "severity": self.severity, "findings": self.findings, **self.figures}


def increase(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How much a counter (or a histogram's ``_sum``/``_count``) grew between two scrapes; 0 across a restart."""
    return max(0.0, total(after, name, **labels) - total(before, name, **labels))


def increases(before: Samples, after: Samples, name: str) -> dict[frozenset, float]:
    """How much each series of a counter grew between two scrapes (a series new in the window grew from 0)."""
    return {ls: max(0.0, v - before.get((n, ls), 0.0)) for (n, ls), v in after.items() if n == name}


def figures(before: Samples, after: Samples, seconds: float) -> dict[str, Any]:
    """Rates, percentiles and gauges an on-call engineer asks for first, over the series the alert rules select."""
    def increase_by(name: str, label: str, **labels: str) -> dict[str, float]:
        earlier = by_label(before, name, label, **labels)
        return {value: max(0.0, v - earlier.get(value, 0.0))
                for value, v in by_label(after, name, label, **labels).items()}

    inference: dict[str, float] = defaultdict(float)  # requests by endpoint, every protocol's prediction route
    inference_status: dict[str, float] = defaultdict(float)  # their status codes
    api = api_errors = 0.0  # every request but the probes and the scrape, and those answered 5xx
    for labels, grew in increases(before, after, "sentiment_requests_total").items():
        endpoint, status = dict(labels).get("endpoint", ""), dict(labels).get("status", "")
        if re.fullmatch(INFERENCE_RE, endpoint):
            inference[endpoint] += grew
            inference_status[status] += grew
        if not re.fullmatch(NOT_AN_ERROR_RATE_RE, endpoint):
            api += grew
            api_errors += grew if re.fullmatch(r"5..", status) else 0.0
    requests = sum(inference.values())
    answered = sum(v for code, v in inference_status.items() if code.startswith("2"))
    failed = sum(v for code, v in inference_status.items() if re.fullmatch(r"5..", code))
    gave_up = inference_status.get(CLIENT_LEFT, 0.0)
    rejected = {reason: round(v) for reason, v in increase_by("sentiment_rejected_requests_total", "reason").items()}
    shed = sum(rejected.get(reason, 0) for reason in SHED_REASONS)
    hits = increase(before, after, "sentiment_cache_hits_total")
    misses = increase(before, after, "sentiment_cache_misses_total")
    p50 = quantile(0.5, before, after, "sentiment_request_latency_seconds", endpoints=INFERENCE_RE)
    p99 = quantile(0.99, before, after, "sentiment_request_latency_seconds", endpoints=INFERENCE_RE)
    limit = total(after, "sentiment_memory_limit_bytes")
    rss = total(after, "sentiment_process_resident_memory_bytes")
    gpu_used = total(after, "sentiment_gpu_memory_used_bytes")
    gpu_total = total(after, "sentiment_gpu_memory_total_bytes")
    spool_limit = total(after, "sentiment_store_spool_limit_bytes")
    return {
        "predict_rate_per_s": round(requests / seconds, 2),  # every inference endpoint, not /predict alone
        "predict_endpoints": {endpoint: round(v / seconds, 2) for endpoint, v in sorted(inference.items()) if v},
        "predict_requests": round(requests), "predict_answered": round(answered), "predict_5xx": round(failed),
        "api_rate_per_s": round(api / seconds, 2),
        "error_rate": round(api_errors / api, 4) if api else 0.0,
        "shed": shed,
        "shed_rate": round(shed / requests, 4) if requests else 0.0,
        "gave_up": round(gave_up),
        "gave_up_rate": round(gave_up / requests, 4) if requests else 0.0,
        "rejected": {reason: count for reason, count in rejected.items() if count},
        "predict_p50_ms": None if p50 is None else round(p50 * 1000, 1),
        "predict_p99_ms": None if p99 is None else round(p99 * 1000, 1),
        "queue_depth": total(after, "sentiment_queue_depth"),
        "rss_bytes": rss, "memory_limit_bytes": limit,
        "memory_ratio": round(rss / limit, 3) if limit else None,
        "oom_events": increase(before, after, "sentiment_oom_events_total"),
        "host_oom_events": increase(before, after, "sentiment_oom_events_total", device="cpu"),
        "batch_splits": increase(before, after, "sentiment_batch_splits_total"),
        "cpu_fallbacks": increase(before, after, "sentiment_cpu_fallbacks_total"),
        "inference_errors": increase(before, after, "sentiment_inference_errors_total"),
        "gpu_memory_ratio": round(gpu_used / gpu_total, 3) if gpu_total else None,
        "gpu_utilization": total(after, "sentiment_gpu_utilization_ratio") if gpu_total else None,
        "cache_hit_rate": round(hits / (hits + misses), 3) if hits + misses else None,
        "store_up": bool(total(after, "sentiment_store_up")),
        "store_queue_depth": total(after, "sentiment_store_queue_depth"),
        "store_spool_rows": total(after, "sentiment_store_spool_rows"),
        "store_spool_ratio": round(total(after, "sentiment_store_spool_bytes") / spool_limit, 3) if spool_limit
        else None,
        "store_lost_records": increase(before, after, "sentiment_store_lost_records_total"),
        "store_lost_records_total": total(after, "sentiment_store_lost_records_total"),
        "store_spool_lost_bytes": total(after, "sentiment_store_spool_lost_bytes"),
    }


def assess(snapshot: Snapshot, slo_p99_ms: float) -> None:
    """Propose a severity with the runbook's Incident classes and the alert rules' thresholds (the rules' ``>``, over
    the series they select), and say which figures led there. Notes below P2 are listed without raising it."""
    f, findings = snapshot.figures, snapshot.findings
    p0, p1, p2, notes = [], [], [], []
    if not snapshot.ready:
        p0.append("not ready: this replica takes no traffic (draining, or the model is not loaded); P0 when no "
                  "other instance is ready")
    if f["predict_requests"] and not f["predict_answered"] and f["predict_5xx"]:
        p0.append(f"no prediction answered: {f['predict_requests']} inference requests, 0 answered 2xx, "
                  f"{f['predict_5xx']} answered 5xx ({f['shed']} shed): the service answers no predictions")
    elif f["error_rate"] >= 1:
        p0.append("every API request fails with 5xx: the service is down")
    elif f["error_rate"] > 0.05:
        p1.append(f"{f['error_rate']:.1%} of API requests fail with 5xx (above 5 %)")
    elif f["error_rate"] > 0.01:
        p2.append(f"{f['error_rate']:.1%} of API requests fail with 5xx (above 1 %)")
    if f["shed_rate"] > 0.05:
        p1.append(f"{f['shed_rate']:.1%} of inference requests shed with 503 (queue full, deadline or request bodies "
                  "at their memory budget; above 5 %)")
    elif f["shed"]:
        p2.append(f"{f['shed']} inference requests shed with 503 ({f['shed_rate']:.1%})")
    if f["gave_up_rate"] > 0.05:
        p1.append(f"{f['gave_up_rate']:.1%} of inference requests' clients left before their answer (499; above "
                  "5 %): answers come later than clients wait")
    elif f["gave_up"]:
        notes.append(f"{f['gave_up']} inference requests' clients left before their answer (499, "
                     f"{f['gave_up_rate']:.1%}; P1 above 5 %)")
    p99 = f["predict_p99_ms"]
    if p99 is not None and p99 > 5000:
        p1.append(f"inference p99 {p99:.0f} ms is above 5 s")
    elif p99 is not None and p99 > 1000:
        p2.append(f"inference p99 {p99:.0f} ms is above 1 s")
    elif p99 is not None and p99 > slo_p99_ms:
        notes.append(f"inference p99 {p99:.0f} ms is over the {slo_p99_ms:.0f} ms objective (P2 above 1 s)")
    if f["memory_ratio"] is not None and f["memory_ratio"] > 0.9:
        p1.append(f"memory at {f['memory_ratio']:.0%} of the limit: OOMKilled is next")
    if f["host_oom_events"]:
        p1.append(f"{f['host_oom_events']:.0f} host (CPU) OOM events in the window")
    if f["oom_events"] - f["host_oom_events"] or f["inference_errors"] or f["cpu_fallbacks"]:
        p2.append(f"{f['oom_events'] - f['host_oom_events']:.0f} GPU OOM events, {f['cpu_fallbacks']:.0f} CPU "
                  f"fallbacks, {f['inference_errors']:.0f} inference errors in the window")
    assess_store(snapshot, p1, p2, notes)
    reasons = snapshot.health.get("reasons") or []
    if reasons and not (p0 or p1 or p2):
        p2.append("health degraded: " + "; ".join(reasons))
    if len(p2) >= 2 and not (p0 or p1):
        p1.append(f"{len(p2)} P2 conditions at once on this instance: one class up")
    for level, items in (("P0", p0), ("P1", p1), ("P2", p2)):
        if items:
            snapshot.severity = level
            break
    else:
        snapshot.severity = "P3"
        findings.append("no impact seen in the window: P3 at most (cosmetic, documentation, enhancement)")
    findings.extend(p0 + p1 + p2 + notes)


def assess_store(snapshot: Snapshot, p1: list[str], p2: list[str], notes: list[str]) -> None:
    """The prediction store's findings: records lost or at risk are P1, a database down P2 (predictions continue)."""
    f = snapshot.figures
    database = snapshot.health.get("database")
    database = database if isinstance(database, dict) else {}
    lost = max(f["store_lost_records_total"], number(database.get("lost_rows")))
    uptime = number(snapshot.health.get("uptime_s"), default=math.inf)
    said = "records lost" in str(database.get("reason") or "")  # /health says so for 10 minutes after the last
    if f["store_lost_records"] or lost and (said or uptime < RECORDS_LOST_WINDOW_S):
        p1.append(f"{lost:.0f} answered predictions' records lost since start ({f['store_lost_records']:.0f} in the "
                  "window): in no database and no spool")
    elif lost:
        notes.append(f"{lost:.0f} answered predictions' records lost since start, none in the last 10 minutes")
    if f["store_spool_lost_bytes"]:
        p1.append(f"{f['store_spool_lost_bytes']:.0f} bytes of acknowledged records missing from the spool at start "
                  "(damage on disk): lost")
    refused = f["rejected"].get("spool_full", 0)
    if refused:
        p1.append(f"{refused} requests refused with 503: the spool cannot take their records")
    if f["store_spool_ratio"] is not None and f["store_spool_ratio"] > 0.8:
        p1.append(f"spool {f['store_spool_ratio']:.0%} full: predictions are refused when it is full")
    if f["store_spool_rows"] > 1e6:
        p1.append(f"{f['store_spool_rows']:.0f} records spooled: above a million")
    if not f["store_up"]:
        p2.append(f"prediction database down: {f['store_spool_rows']:.0f} records spooled to local disk "
                  "(predictions continue)")


def number(value: Any, default: float = 0.0) -> float:
    """A figure from /health's JSON, or ``default`` when it is missing or not a number."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def take_snapshot(url: str, interval_s: float, timeout: float, slo_p99_ms: float) -> Snapshot:
    """Once /ready answered, a fetch that gets no answer is no outage of every replica: the server is up, and said
    so (a /metrics that timed out was reported "cannot reach ... P0")."""
    base = url.rstrip("/")
    ready_status, _ = fetch(base + "/ready", timeout)
    answered = ["/ready"]
    try:
        health_status, health_body = fetch(base + "/health", timeout)
        answered.append("/health")
        health = read_health(base, health_status, health_body)
        started = time.monotonic()
        before = scrape(base, timeout)
        time.sleep(interval_s)
        after = scrape(base, timeout)
    except Unreachable as error:
        raise StatusError(f"the server answered {' and '.join(answered)} but not {error.url} ({error.reason}): it "
                          "is up, this is no outage of every replica; try a larger --timeout, else it is stuck or "
                          "overloaded") from None
    snapshot = Snapshot(url=base, interval_s=interval_s, ready=ready_status == 200, health=health,
                        figures=figures(before, after, max(time.monotonic() - started, 1e-3)))
    assess(snapshot, slo_p99_ms)
    return snapshot


def render_text(snapshot: Snapshot) -> str:
    f = snapshot.figures
    ms = "n/a" if f["predict_p50_ms"] is None else f"{f['predict_p50_ms']} / {f['predict_p99_ms']} ms"
    memory = (f"{f['rss_bytes'] / 2**20:.0f} MiB of {f['memory_limit_bytes'] / 2**20:.0f} MiB "
              f"({f['memory_ratio']:.0%})" if f["memory_ratio"] is not None else "n/a")
    lines = [
        f"{snapshot.url}: proposed severity {snapshot.severity}",
        f"  ready {'yes' if snapshot.ready else 'NO'}; health {snapshot.health.get('status')}"
        + "".join(f"\n    - {r}" for r in snapshot.health.get("reasons") or []),
        f"  predictions on every inference endpoint over {snapshot.interval_s:g} s: {f['predict_rate_per_s']} req/s "
        f"({by_endpoint(f)}), {f['predict_answered']} of {f['predict_requests']} answered 2xx, "
        f"shed (503) {f['shed_rate']:.1%}, client left (499) {f['gave_up_rate']:.1%}",
        f"  API requests (all but probes and /metrics): {f['api_rate_per_s']} req/s, 5xx {f['error_rate']:.1%}; "
        f"rejected {f['rejected'] or 'none'}",
        f"  predictions p50 / p99: {ms}; queue depth {f['queue_depth']:.0f}",
        f"  memory: {memory}; OOM events {f['oom_events']:.0f}, batch splits {f['batch_splits']:.0f}, "
        f"CPU fallbacks {f['cpu_fallbacks']:.0f}, inference errors {f['inference_errors']:.0f}",
    ]
    if f["gpu_memory_ratio"] is not None:
        lines.append(f"  GPU: memory {f['gpu_memory_ratio']:.0%}, utilisation {f['gpu_utilization']:.0%}")
    hit_rate = "n/a" if f["cache_hit_rate"] is None else f"{f['cache_hit_rate']:.0%}"
    lines.append(f"  cache hit rate {hit_rate}; store {'up' if f['store_up'] else 'DOWN'}, "
                 f"{f['store_queue_depth']:.0f} queued, {f['store_spool_rows']:.0f} spooled"
                 + (f", {f['store_lost_records_total']:.0f} records lost" if f["store_lost_records_total"] else ""))
    lines.append("  why: " + "; ".join(snapshot.findings))
    return "\n".join(lines)


def by_endpoint(f: dict[str, Any]) -> str:
    """Which inference endpoints had traffic, with their rates; all of them named when none had."""
    if not f["predict_endpoints"]:
        return "none on " + ", ".join(PREDICTION_ENDPOINTS)
    return ", ".join(f"{endpoint} {rate}" for endpoint, rate in f["predict_endpoints"].items())


TEMPLATES = {
    "alert": ("**INCIDENT ALERT - {severity}**\n\n**Summary:** {summary}\n**Impact:** {impact}\n"
              "**Status:** Under investigation\n**ETA:** to be estimated\n**Updates:** Will provide updates every "
              "30 minutes\n\n**Current Actions:**\n- [ ] Investigating root cause\n- [ ] Implementing immediate "
              "mitigation\n- [ ] Monitoring system health"),
    "update": ("**INCIDENT UPDATE - {severity}**\n\n**Summary:** {summary}\n**Status:** Mitigating\n"
               "**Progress:** {impact}\n**Next Steps:** to be filled in\n**ETA:** to be estimated"),
    "resolved": ("**INCIDENT RESOLVED - {severity}**\n\n**Summary:** {summary}\n**Root Cause:** to be filled in\n"
                 "**Resolution:** to be filled in\n**Duration:** to be filled in\n**Follow-up:** {impact}"),
}


def render_template(snapshot: Snapshot, kind: str) -> str:
    """The runbook's communication template ``kind``, filled with this snapshot's figures."""
    f = snapshot.figures
    summary = (f"{snapshot.url} health {snapshot.health.get('status')}, ready {'yes' if snapshot.ready else 'no'}: "
               + "; ".join(snapshot.findings))
    impact = (f"predictions {f['predict_rate_per_s']} req/s ({by_endpoint(f)}), {f['error_rate']:.1%} of API "
              f"requests failing (5xx), {f['shed_rate']:.1%} of predictions shed (503), "
              f"{f['gave_up_rate']:.1%} left by their clients (499), prediction p99 "
              f"{f['predict_p99_ms'] or 'n/a'} ms, store {'up' if f['store_up'] else 'down'} "
              f"({f['store_spool_rows']:.0f} records spooled, {f['store_lost_records_total']:.0f} lost)")
    return TEMPLATES[kind].format(severity=snapshot.severity, summary=summary, impact=impact)


def run_status(url: str, interval_s: float = 5.0, timeout: float = 5.0, slo_p99_ms: float = 250.0,
               template: str | None = None, as_json: bool = False) -> int:
    """Print the snapshot; 0 when it was taken, 2 when it could not be (one line on standard error, as every
    command's errors: ``--json | jq`` reads standard output)."""
    try:
        snapshot = take_snapshot(url, interval_s, timeout, slo_p99_ms)
    except Unreachable as error:
        print(f"ERROR {error}: is the server running (`docker ps | grep sentiment-analyzer`)? "
              "Outage of every replica: P0", file=sys.stderr)
        return 2
    except StatusError as error:  # an answer, but none to take a snapshot from
        print(f"ERROR {error}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(snapshot.as_dict(), indent=2))
    elif template:
        print(render_template(snapshot, template))
    else:
        print(render_text(snapshot))
    return 0
