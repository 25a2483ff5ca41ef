"""Load test outputs: the JSON report and one PNG (latency percentiles and throughput vs offered load)."""

from __future__ import annotations

from pathlib import Path

from scripts.benchlib.report import plt, save_figure, write_json

X_LABELS = {"closed": "concurrency (closed loop)", "open": "offered rate, requests/s (open loop)"}


def plot_loadtest(report: dict, path: Path) -> Path:
    phases = report["phases"]
    mode = report["config"]["mode"]
    levels = [p["level"] for p in phases]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for q in ("p50", "p90", "p99"):
        left.plot(levels, [p["latency"][f"{q}_ms"] for p in phases], marker="o", label=q)
    left.set(xlabel=X_LABELS[mode], ylabel="latency of 200s (ms)", title="latency")
    right.plot(levels, [p["throughput_rps"] for p in phases], marker="o", label="all responses")
    right.plot(levels, [p["goodput_rps"] for p in phases], marker="s", label="200 OK")
    right.plot(levels, [p["shed_rps"] for p in phases], marker="x", label="shed (429/503)")
    if mode == "open":
        right.plot(levels, levels, linestyle="--", color="grey", label="offered")
    right.set(xlabel=X_LABELS[mode], ylabel="requests / s", title="throughput")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return save_figure(fig, path)


def write_loadtest(report: dict, out_dir: Path) -> list[Path]:
    """loadtest-<mode>.json and loadtest-<mode>.png in ``out_dir``."""
    stem = f"loadtest-{report['config']['mode']}"
    return [write_json(report, out_dir / f"{stem}.json"), plot_loadtest(report, out_dir / f"{stem}.png")]
