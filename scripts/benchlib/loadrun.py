"""A load test run: the generator's own ceiling, then one phase per offered load; a results dict.

``run_loadtest(LoadTestConfig(...))`` is the callable core (the CLI and a later side-by-side of
other servers use it). Each phase runs ``warmup + duration`` seconds; only requests due after the
warm-up count. Latency percentiles are over successful (200) responses; sheds (429/503) and
errors are counted by status and by kind. Throughput divides completed requests by the time from
the window's start to the last completion. The client's CPU use (``os.times``) is measured per
phase, and a closed-loop run against a trivial endpoint (``GET /health``) first shows how many
requests per second the generator can drive, to compare with the server's. One ``Workload`` runs
through all phases, so fresh texts continue where the previous phase stopped.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from models.data import load_labeled
from scripts.benchlib.envinfo import environment, header
from scripts.benchlib.loadgen import Client, PredictProtocol, Sample, closed_loop, open_loop, run
from scripts.benchlib.stats import accuracy, latency_summary, throughput
from scripts.benchlib.workload import Workload

SHED = (429, 503)


@dataclass
class LoadTestConfig:
    url: str
    data: Path
    mode: str = "closed"  # "closed": levels are concurrencies; "open": arrival rates (requests/s)
    levels: list[float] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    duration: float = 10.0
    warmup: float = 1.0
    duplicate_ratio: float = 0.0
    texts_per_request: int = 1
    length_mix: tuple[float, float, float] | None = None
    arrival: str = "poisson"
    predict_path: str = "/predict"
    baseline_path: str | None = "/health"
    baseline_duration: float = 3.0
    baseline_concurrency: int = 16
    max_connections: int = 256
    timeout: float = 30.0
    headers: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    protocol: PredictProtocol | None = None  # how bodies are written and responses scored (None: /predict's)


def summarize(samples: list[Sample], window_start: float, cpu_seconds: float, wall_seconds: float) -> dict:
    """Counts, throughput, latency, accuracy and client CPU of the samples due at/after ``window_start``."""
    counted = [s for s in samples if s.due >= window_start]
    ok = [s for s in counted if s.ok]
    elapsed = max((s.done for s in counted), default=window_start) - window_start
    texts, scored = sum(s.texts for s in counted), sum(s.scored for s in ok)
    shed = sum(s.status in SHED for s in counted)
    return {
        "requests": len(counted),
        "ok": len(ok),
        "by_status": {str(k): v for k, v in sorted(Counter(s.status for s in counted if s.status).items())},
        "errors": dict(Counter(s.error for s in counted if s.error)),
        "shed": shed,
        "shed_rps": throughput(shed, elapsed),
        "shed_without_retry_after": sum(s.status in SHED and not s.retry_after for s in counted),
        "throughput_rps": throughput(len(counted), elapsed),
        "goodput_rps": throughput(len(ok), elapsed),
        "texts_per_s": throughput(scored, elapsed),
        "latency": latency_summary([s.latency for s in ok]),
        "accuracy": accuracy(sum(s.correct for s in ok), scored),
        "scored_texts": scored,
        "duplicate_fraction": sum(s.duplicates for s in counted) / texts if texts else None,
        "cached_fraction": sum(s.cached for s in ok) / scored if scored else None,
        "send_lag": latency_summary([s.lag for s in counted], percentiles=(50, 99)),
        "client_cpu_percent": 100.0 * cpu_seconds / wall_seconds if wall_seconds > 0 else None,
        "client_cpu_ms_per_request": 1000.0 * cpu_seconds / len(samples) if samples else None,
    }


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


async def _measure(client: Client, run, window: float) -> dict:
    """Await ``run`` (a phase coroutine) and summarize the requests due ``window`` s or more after its start."""
    cpu, began = _cpu_seconds(), time.perf_counter()
    client.max_in_flight = 0
    samples = await run
    summary = summarize(samples, began + window, _cpu_seconds() - cpu, time.perf_counter() - began)
    return {**summary, "max_in_flight": client.max_in_flight}


async def _baseline(client: Client, config: LoadTestConfig) -> dict:
    """Closed loop on the trivial endpoint: what the generator (and the HTTP stack) can drive."""
    run = closed_loop(client, config.baseline_path, None, config.baseline_concurrency, config.baseline_duration)
    return {"mode": "baseline", "path": config.baseline_path, "level": config.baseline_concurrency,
            **await _measure(client, run, 0.0)}


async def _phase(client: Client, config: LoadTestConfig, workload: Workload, level: float) -> dict:
    """One offered load (a concurrency or an arrival rate) on the predict endpoint."""
    seconds = config.warmup + config.duration
    if config.mode == "closed":
        run = closed_loop(client, config.predict_path, workload, int(level), seconds)
    else:
        run = open_loop(client, config.predict_path, workload, level, seconds, config.arrival, config.seed)
    result = {"mode": config.mode, "level": level, **await _measure(client, run, config.warmup)}
    if config.mode == "open":
        result["achieved_send_rps"] = result["requests"] / config.duration
    return result


def _line(result: dict) -> str:
    """One printed line per phase."""
    name = f"baseline GET {result['path']}" if result["mode"] == "baseline" else result["mode"]
    lat = result["latency"]
    ms = " ".join(f"{q} {lat[q + '_ms']:.1f}" for q in ("p50", "p90", "p99")) if lat["count"] else "-"
    counts = " ".join(f"{k}x{v}" for k, v in (*result["by_status"].items(), *result["errors"].items()))
    acc = f"{result['accuracy']:.3f}" if result["accuracy"] is not None else "-"
    rps, ok = result["throughput_rps"] or 0.0, result["goodput_rps"] or 0.0
    return (f"{name} {result['level']:g}: {rps:.1f} req/s (ok {ok:.1f}), latency ms {ms}, "
            f"responses {counts or '-'}, accuracy {acc}, "
            f"client CPU {result['client_cpu_percent']:.0f}% ({result['client_cpu_ms_per_request']:.2f} ms/req)")


async def run_loadtest_async(config: LoadTestConfig, log: Callable[[str], None] = print) -> dict:
    """The baseline, then every level of ``config``; returns the report (environment, config, phases)."""
    if config.mode not in ("closed", "open"):
        raise ValueError(f"mode {config.mode!r} is neither 'closed' nor 'open'")
    data = load_labeled(config.data)
    workload = Workload(data, config.duplicate_ratio, config.texts_per_request, config.length_mix, config.seed)
    env = environment()
    log(header(env))
    client = Client(config.url, config.max_connections, config.timeout, config.headers, config.protocol)
    baseline, phases = None, []
    try:
        if config.baseline_path and config.baseline_duration > 0:
            baseline = await _baseline(client, config)
            log(_line(baseline))
        for level in config.levels:
            phases.append(await _phase(client, config, workload, level))
            log(_line(phases[-1]))
    finally:
        await client.close()
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(replace(config, protocol=None)).items()}
    settings["protocol"] = (config.protocol or PredictProtocol()).name
    report = {"environment": env, "config": settings,
              "baseline": baseline, "phases": phases}
    report["headroom"] = headroom(report)
    if report["headroom"]:
        log(report["headroom"]["note"])
    return report


def headroom(report: dict) -> dict | None:
    """How far the generator's ceiling is above the busiest phase's throughput.

    The baseline's req/s is a floor of the ceiling (the server's HTTP stack answers it too); its
    client CPU per request gives the generator's own limit per core.
    """
    baseline, phases = report["baseline"], report["phases"]
    peak = max((p["throughput_rps"] or 0.0 for p in phases), default=0.0)
    if not baseline or not baseline["throughput_rps"] or not peak:
        return None
    per_core = 1000.0 / baseline["client_cpu_ms_per_request"] if baseline["client_cpu_ms_per_request"] else None
    ratio = baseline["throughput_rps"] / peak
    note = (f"generator: {baseline['throughput_rps']:.0f} req/s on GET {baseline['path']}"
            + (f", ~{per_core:.0f} req/s per client core" if per_core else "")
            + f"; server peak {peak:.1f} req/s -> {ratio:.1f}x headroom"
            + ("" if ratio >= 3 else " (LOW: the generator may be limiting these results)"))
    return {"ceiling_rps": baseline["throughput_rps"], "client_rps_per_core": per_core, "peak_rps": peak,
            "ratio": ratio, "note": note}


def run_loadtest(config: LoadTestConfig, log: Callable[[str], None] = print) -> dict:
    """Run the whole load test in a fresh event loop; returns the report dict."""
    return run(run_loadtest_async(config, log))
