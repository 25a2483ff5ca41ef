"""Offline benchmark outputs: JSON (everything), CSV (one row per variant and grid cell), PNG plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CSV_COLUMNS = ("variant", "batch_size", "seq_len", "repeats", "median_ms", "p95_ms", "mean_ms", "min_ms", "max_ms",
               "seqs_per_s", "tokens_per_s", "accuracy")


def write_json(report: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def write_csv(report: dict, path: Path) -> Path:
    """One row per (variant, batch size, sequence length); the variant's accuracy repeated on each."""
    accuracy = {v["name"]: v.get("accuracy") for v in report["variants"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in report["results"]:
            writer.writerow({**row, "accuracy": accuracy.get(row["variant"])})
    return path


def _by_variant(results: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in results:
        grouped.setdefault(row["variant"], []).append(row)
    return grouped


def plot_throughput(report: dict, path: Path) -> Path:
    """Sequences/s against batch size, one line per variant, one panel per sequence length."""
    seq_lens = report["config"]["seq_lens"]
    fig, axes = plt.subplots(1, len(seq_lens), figsize=(4.5 * len(seq_lens), 4), squeeze=False, sharey=True)
    for ax, seq_len in zip(axes[0], seq_lens, strict=True):
        for variant, rows in _by_variant(report["results"]).items():
            points = sorted((r["batch_size"], r["seqs_per_s"]) for r in rows if r["seq_len"] == seq_len)
            ax.plot(*zip(*points, strict=True), marker="o", label=variant)
        ax.set(title=f"seq len {seq_len}", xlabel="batch size", xscale="log", yscale="log")
        ax.minorticks_off()
        ax.set_xticks(report["config"]["batch_sizes"], [str(b) for b in report["config"]["batch_sizes"]])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("sequences / s (batch / median latency)")
    if report["results"]:
        axes[0][-1].legend(fontsize="small")
    return save_figure(fig, path)


def plot_latency(report: dict, path: Path) -> Path:
    """Per-run latency distribution (box plots by variant) for every batch size x sequence length cell."""
    batch_sizes, seq_lens = report["config"]["batch_sizes"], report["config"]["seq_lens"]
    fig, axes = plt.subplots(len(batch_sizes), len(seq_lens), figsize=(4 * len(seq_lens), 3 * len(batch_sizes)),
                             squeeze=False)
    for i, batch in enumerate(batch_sizes):
        for j, seq_len in enumerate(seq_lens):
            ax = axes[i][j]
            cell = {r["variant"]: r for r in report["results"] if (r["batch_size"], r["seq_len"]) == (batch, seq_len)}
            if cell:
                ax.boxplot([r["latencies_ms"] for r in cell.values()], tick_labels=list(cell), showfliers=True)
            ax.set_title(f"batch {batch}, seq len {seq_len}", fontsize="small")
            ax.set(ylabel="latency (ms)", yscale="log")
            ax.tick_params(axis="x", labelrotation=45, labelsize="x-small")
            ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_all(report: dict, out_dir: Path) -> list[Path]:
    """bench.json, bench.csv, throughput.png, latency.png in ``out_dir``."""
    return [
        write_json(report, out_dir / "bench.json"),
        write_csv(report, out_dir / "bench.csv"),
        plot_throughput(report, out_dir / "throughput.png"),
        plot_latency(report, out_dir / "latency.png"),
    ]
