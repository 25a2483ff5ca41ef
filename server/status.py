"""`sentiment-analyzer status --url URL`: the incident snapshot for the runbook's first five minutes.

It reads ``/health`` and ``/ready`` once and ``/metrics`` twice, ``--interval`` seconds
apart, so rates and latency percentiles describe the last few seconds rather than
the process's whole life. From those figures it proposes a severity on the runbook's
P0-P3 scale (a proposal: the incident commander decides) and can fill the runbook's
communication templates. Only the standard library and prometheus-client's text
parser are used, so the command works from inside the slim server image.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

PREDICT = "/predict"
Samples = dict[tuple[str, frozenset], float]


class Unreachable(RuntimeError):
    """The server did not answer; the message says where and why."""


class NotThisServer(Unreachable):
    """Something answered at --url, but not this server's /metrics: a wrong URL, not an outage."""


def fetch(url: str, timeout: float) -> tuple[int, bytes]:
    """(status, body) of a GET; any HTTP status is an answer, no answer at all raises ``Unreachable``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (the operator's own URL)
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise Unreachable(f"cannot reach {url}: {reason}") from None


def scrape(base: str, timeout: float) -> Samples:
    """``/metrics`` parsed; anything but a 200 in Prometheus' format raises ``Unreachable`` (not this server)."""
    status, body = fetch(base + "/metrics", timeout)
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


def quantile(q: float, before: Samples, after: Samples, name: str, **labels: str) -> float | None:
    """``histogram_quantile`` over the increase between two scrapes (linear within a bucket), in seconds."""
    wanted = set(labels.items())
    buckets: dict[float, float] = {}
    for (n, ls), v in after.items():
        if n == f"{name}_bucket" and wanted <= ls:
            le = float(dict(ls)["le"])
            buckets[le] = buckets.get(le, 0.0) + v - before.get((n, ls), 0.0)
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


def figures(before: Samples, after: Samples, seconds: float) -> dict[str, Any]:
    """Rates, percentiles and gauges an on-call engineer asks for first."""
    def increase_by(name: str, label: str, **labels: str) -> dict[str, float]:
        earlier = by_label(before, name, label, **labels)
        return {value: max(0.0, v - earlier.get(value, 0.0))
                for value, v in by_label(after, name, label, **labels).items()}

    status_counts = increase_by("sentiment_requests_total", "status", endpoint=PREDICT)
    requests = sum(status_counts.values())
    errors = sum(v for code, v in status_counts.items() if code.startswith("5") and code != "503")
    rejected = {reason: round(v) for reason, v in increase_by("sentiment_rejected_requests_total", "reason").items()}
    hits = increase(before, after, "sentiment_cache_hits_total")
    misses = increase(before, after, "sentiment_cache_misses_total")
    p50 = quantile(0.5, before, after, "sentiment_request_latency_seconds", endpoint=PREDICT)
    p99 = quantile(0.99, before, after, "sentiment_request_latency_seconds", endpoint=PREDICT)
    limit = total(after, "sentiment_memory_limit_bytes")
    rss = total(after, "sentiment_process_resident_memory_bytes")
    gpu_used = total(after, "sentiment_gpu_memory_used_bytes")
    gpu_total = total(after, "sentiment_gpu_memory_total_bytes")
    return {
        "predict_rate_per_s": round(requests / seconds, 2),
        "error_rate": round(errors / requests, 4) if requests else 0.0,
        "shed_rate": round(status_counts.get("503", 0.0) / requests, 4) if requests else 0.0,
        "rejected": {reason: count for reason, count in rejected.items() if count},
        "predict_p50_ms": None if p50 is None else round(p50 * 1000, 1),
        "predict_p99_ms": None if p99 is None else round(p99 * 1000, 1),
        "queue_depth": total(after, "sentiment_queue_depth"),
        "rss_bytes": rss, "memory_limit_bytes": limit,
        "memory_ratio": round(rss / limit, 3) if limit else None,
        "oom_events": increase(before, after, "sentiment_oom_events_total"),
        "batch_splits": increase(before, after, "sentiment_batch_splits_total"),
        "cpu_fallbacks": increase(before, after, "sentiment_cpu_fallbacks_total"),
        "inference_errors": increase(before, after, "sentiment_inference_errors_total"),
        "gpu_memory_ratio": round(gpu_used / gpu_total, 3) if gpu_total else None,
        "gpu_utilization": total(after, "sentiment_gpu_utilization_ratio") if gpu_total else None,
        "cache_hit_rate": round(hits / (hits + misses), 3) if hits + misses else None,
        "store_up": bool(total(after, "sentiment_store_up")),
        "store_queue_depth": total(after, "sentiment_store_queue_depth"),
        "store_spool_rows": total(after, "sentiment_store_spool_rows"),
    }


def assess(snapshot: Snapshot, slo_p99_ms: float) -> None:
    """Propose a severity with the runbook's definitions, and say which figures led there."""
    f, findings = snapshot.figures, snapshot.findings
    p0, p1, p2 = [], [], []
    if not snapshot.ready:
        p0.append("not ready: this replica takes no traffic (draining, or the model is not loaded)")
    if f["error_rate"] >= 0.5:
        p0.append(f"{f['error_rate']:.0%} of requests fail with 5xx: the service is effectively down")
    elif f["error_rate"] >= 0.01:
        p1.append(f"{f['error_rate']:.1%} of requests fail with 5xx")
    if f["shed_rate"] >= 0.1:
        p1.append(f"{f['shed_rate']:.0%} of requests shed with 503 (overload, deadlines or draining)")
    elif f["shed_rate"] > 0:
        p2.append(f"{f['shed_rate']:.1%} of requests shed with 503")
    p99 = f["predict_p99_ms"]
    if p99 is not None and p99 > 1.5 * slo_p99_ms:
        p1.append(f"/predict p99 {p99:.0f} ms is over 1.5x the {slo_p99_ms:.0f} ms SLO (degradation > 50%)")
    elif p99 is not None and p99 > slo_p99_ms:
        p2.append(f"/predict p99 {p99:.0f} ms is over the {slo_p99_ms:.0f} ms SLO (degradation < 50%)")
    if not f["store_up"]:
        p1.append(f"prediction database down: {f['store_spool_rows']:.0f} records spooled to local disk")
    if f["memory_ratio"] is not None and f["memory_ratio"] >= 0.9:
        p1.append(f"memory at {f['memory_ratio']:.0%} of the limit: OOMKilled is next")
    if f["oom_events"] or f["inference_errors"]:
        p2.append(f"{f['oom_events']:.0f} OOM events, {f['inference_errors']:.0f} inference errors in the window")
    reasons = snapshot.health.get("reasons") or []
    if reasons and not (p0 or p1 or p2):
        p2.append("health degraded: " + "; ".join(reasons))
    for level, items in (("P0", p0), ("P1", p1), ("P2", p2)):
        if items:
            snapshot.severity = level
            break
    else:
        snapshot.severity = "P3"
        findings.append("no impact seen in the window: P3 at most (cosmetic, documentation, enhancement)")
    findings.extend(p0 + p1 + p2)


def take_snapshot(url: str, interval_s: float, timeout: float, slo_p99_ms: float) -> Snapshot:
    base = url.rstrip("/")
    ready_status, _ = fetch(base + "/ready", timeout)
    health_status, health_body = fetch(base + "/health", timeout)
    try:
        health = json.loads(health_body)
    except ValueError:
        health = {"status": f"unreadable ({health_status})", "reasons": ["/health did not answer JSON"]}
    started = time.monotonic()
    before = scrape(base, timeout)
    time.sleep(interval_s)
    after = scrape(base, timeout)
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
        f"  /predict over {snapshot.interval_s:g} s: {f['predict_rate_per_s']} req/s, 5xx {f['error_rate']:.1%}, "
        f"shed (503) {f['shed_rate']:.1%}, rejected {f['rejected'] or 'none'}",
        f"  /predict p50 / p99: {ms}; queue depth {f['queue_depth']:.0f}",
        f"  memory: {memory}; OOM events {f['oom_events']:.0f}, batch splits {f['batch_splits']:.0f}, "
        f"CPU fallbacks {f['cpu_fallbacks']:.0f}, inference errors {f['inference_errors']:.0f}",
    ]
    if f["gpu_memory_ratio"] is not None:
        lines.append(f"  GPU: memory {f['gpu_memory_ratio']:.0%}, utilisation {f['gpu_utilization']:.0%}")
    hit_rate = "n/a" if f["cache_hit_rate"] is None else f"{f['cache_hit_rate']:.0%}"
    lines.append(f"  cache hit rate {hit_rate}; store {'up' if f['store_up'] else 'DOWN'}, "
                 f"{f['store_queue_depth']:.0f} queued, {f['store_spool_rows']:.0f} spooled")
    lines.append("  why: " + "; ".join(snapshot.findings))
    return "\n".join(lines)


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
    impact = (f"/predict {f['predict_rate_per_s']} req/s, {f['error_rate']:.1%} failing (5xx), "
              f"{f['shed_rate']:.1%} shed (503), /predict p99 {f['predict_p99_ms'] or 'n/a'} ms, "
              f"store {'up' if f['store_up'] else 'down'} ({f['store_spool_rows']:.0f} records spooled)")
    return TEMPLATES[kind].format(severity=snapshot.severity, summary=summary, impact=impact)


def run_status(url: str, interval_s: float = 5.0, timeout: float = 5.0, slo_p99_ms: float = 250.0,
               template: str | None = None, as_json: bool = False) -> int:
    """Print the snapshot; 0 when it was taken, 2 when the server could not be reached (one line)."""
    try:
        snapshot = take_snapshot(url, interval_s, timeout, slo_p99_ms)
    except NotThisServer as error:
        print(f"ERROR {error}")
        return 2
    except Unreachable as error:
        print(f"ERROR {error}: is the server running (`docker ps | grep sentiment-analyzer`)? "
              "Outage of every replica: P0")
        return 2
    if as_json:
        print(json.dumps(snapshot.as_dict(), indent=2))
    elif template:
        print(render_template(snapshot, template))
    else:
        print(render_text(snapshot))
    return 0
