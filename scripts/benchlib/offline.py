"""The offline benchmark: every variant over a batch-size x sequence-length grid, plus accuracy.

All variants see the same inputs: real sentences from the labeled file, tokenized with the
artifact's tokenizer and padded or truncated to each grid length. Each cell is warmed up, then
timed ``repeats`` times; throughput is ``batch_size / median latency`` (the median resists the
outliers a shared machine produces). Accuracy runs each variant over the file at natural lengths
(length-sorted batches padded to their longest text, as the server's batcher does), the file's
labels matched to the artifact's by name (``models.labels``, or ``label_map``; a mismatch stops the
benchmark before it starts), and compares its logits to the first variant that ran (the reference).
Variants run one after another, so only one model is in memory at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from models.data import load_labeled
from models.evaluate import agreement, evaluate
from models.labels import resolve_labels
from scripts.benchlib.envinfo import environment, header, usable_cpus
from scripts.benchlib.inputs import fixed_length_batch
from scripts.benchlib.runners import SPECS, VARIANTS, Unavailable, build_runner
from scripts.benchlib.stats import latency_summary
from server.artifact import load_artifact
from server.tokenizer import TextEncoder


@dataclass
class BenchConfig:
    artifact: Path
    data: Path
    checkpoint: Path | None = None
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    seq_lens: list[int] = field(default_factory=lambda: [16, 64, 128])
    repeats: int = 10
    warmup: int = 2
    threads: int = field(default_factory=usable_cpus)
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    eval_limit: int | None = None
    eval_batch_size: int = 32
    label_map: dict[str, str] | None = None  # the file's labels as the artifact's (default: matched by name)


def time_runner(run: Callable, input_ids: np.ndarray, attention_mask: np.ndarray, warmup: int, repeats: int):
    """Latencies in seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run(input_ids, attention_mask)
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        run(input_ids, attention_mask)
        seconds.append(time.perf_counter() - began)
    return seconds


def cell_result(variant: str, batch_size: int, seq_len: int, seconds: list[float]) -> dict:
    """One grid cell's row: latency statistics (ms), throughput, and the raw latencies."""
    summary = latency_summary(seconds)
    median_s = summary["p50_ms"] / 1000.0
    return {
        "variant": variant, "batch_size": batch_size, "seq_len": seq_len, "repeats": len(seconds),
        "median_ms": summary["p50_ms"], "p95_ms": summary["p95_ms"], "mean_ms": summary["mean_ms"],
        "min_ms": summary["min_ms"], "max_ms": summary["max_ms"],
        "seqs_per_s": batch_size / median_s, "tokens_per_s": batch_size * seq_len / median_s,
        "latencies_ms": [s * 1000.0 for s in seconds],
    }


def run_benchmark(config: BenchConfig, log: Callable[[str], None] = tqdm.write) -> dict:
    """Run the grid and the accuracy pass for each variant; returns the report dict."""
    unknown = sorted(set(config.variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    artifact = load_artifact(config.artifact)
    if max(config.seq_lens) > artifact.max_length:
        raise ValueError(f"sequence length {max(config.seq_lens)} exceeds the model's maximum {artifact.max_length}")
    data = load_labeled(config.data, limit=config.eval_limit)
    label_mapping = resolve_labels(data.labels, artifact.labels, config.label_map)
    cells = [(b, s) for b in config.batch_sizes for s in config.seq_lens]
    inputs = {(b, s): fixed_length_batch(artifact.tokenizer_path, data.texts, b, s) for b, s in cells}
    encode = TextEncoder(artifact.tokenizer_path, artifact.max_length).encode
    env = {**environment(config.threads), "onnxruntime_providers": ort.get_available_providers()}
    log(header(env))
    specs = [spec for spec in SPECS if spec.name in config.variants]
    variants, results, reference = [], [], None
    with tqdm(total=len(specs) * (len(cells) + 1), unit="step", desc="bench") as bar:
        for spec in specs:
            bar.set_description(spec.name)
            try:
                runner = build_runner(spec, artifact, config.checkpoint, config.threads)
            except Unavailable as exc:
                log(f"skipped {spec.name}: {exc}")
                variants.append({"name": spec.name, "status": "skipped", "reason": str(exc)})
                bar.update(len(cells) + 1)
                continue
            log(f"running {spec.name}: " + ", ".join(f"{k}={v}" for k, v in runner.details.items()))
            for b, s in cells:
                seconds = time_runner(runner.run, *inputs[b, s], config.warmup, config.repeats)
                results.append(cell_result(spec.name, b, s, seconds))
                bar.update()
            scores, logits = evaluate(runner.run, encode, data, artifact.labels, config.eval_batch_size,
                                      config.label_map)
            reference = reference or (spec.name, logits)
            variants.append({
                "name": spec.name, "status": "ok", **runner.details, "accuracy": scores["accuracy"], "f1": scores["f1"],
                "eval_examples": scores["examples"], "eval_examples_per_s": scores["examples_per_s"],
                "agreement": {"reference": reference[0], **agreement(logits, reference[1])},
            })
            bar.update()
            del runner  # free this model before the next one is built
    config_out = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items()}
    artifact_out = {"name": artifact.name, "version": artifact.version, "labels": artifact.labels,
                    "label_mapping": label_mapping}
    return {"environment": env, "config": config_out, "artifact": artifact_out, "variants": variants,
            "results": results}
