"""Accuracy, F1, confusion matrix and throughput of a model on a labeled file.

An artifact variant is run the way the server runs it: ONNX Runtime, texts
encoded with the artifact's ``tokenizer.json`` and padded per batch, batches
formed from length-sorted texts (the batcher groups by length too). An HF
checkpoint is run in PyTorch for comparison. ``examples_per_s`` counts model
time only (tokenization excluded), so variants compare like for like.

The file's labels are matched to the model's label names (``models.labels``:
same name, ``LABEL_i``, or SST-2's 0 = negative / 1 = positive), or as
``--label-map`` says; when they cannot be matched nothing is computed and
nothing recorded: the command exits naming the labels on both sides. The
confusion matrix has the model's labels in logit order on both axes (rows:
the file's label, columns: the prediction); ``unused_labels`` lists model
labels the file never uses (predicting one is always an error there).

    python -m models.evaluate --artifact models/default --variant int8 --data ../shared/data/sst2/dev.tsv
    python -m models.evaluate --checkpoint build/finetune/best --data ../shared/data/sst2/dev.tsv
    python -m models.evaluate --artifact my-artifact --data mine.tsv --label-map neg=negative,pos=positive
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from tokenizers import Tokenizer
from tqdm import tqdm

from models.data import LabeledData, load_labeled
from models.export import ExportError, labels_of, load_checkpoint, ort_session, torch_logits, usable_positions
from models.labels import LabelMismatch, parse_label_map, resolve_labels
from models.manifest import record_evaluation
from server.artifact import MANIFEST, TOKENIZER, ArtifactError, load_artifact
from server.tokenizer import TextEncoder, pad_batch

Predict = Callable[[np.ndarray, np.ndarray], np.ndarray]
Encode = Callable[[list[str]], list[np.ndarray]]
BATCH_SIZE = 32


def evaluate(
    predict: Predict, encode: Encode, data: LabeledData, model_labels: list[str], batch_size: int = BATCH_SIZE,
    label_map: dict[str, str] | None = None,
) -> tuple[dict, np.ndarray]:
    """(metrics, logits in input order) of ``predict`` on ``data``; ``LabelMismatch`` before any work if the
    file's labels cannot be matched to ``model_labels``."""
    if not len(data):
        raise ValueError("no labeled examples to evaluate on")
    mapping = resolve_labels(data.labels, model_labels, label_map)
    position = {label: i for i, label in enumerate(model_labels)}
    targets = np.asarray([position[mapping[label]] for label in data.labels])
    rows = encode(data.texts)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    logits: np.ndarray | None = None
    seconds = 0.0
    for start in tqdm(range(0, len(order), batch_size), desc="evaluate", leave=False, mininterval=2):
        index = order[start : start + batch_size]
        ids, mask = pad_batch([rows[i] for i in index])
        began = time.perf_counter()
        batch = np.asarray(predict(ids, mask), dtype=np.float32)
        seconds += time.perf_counter() - began
        if logits is None:
            if batch.shape[1] != len(model_labels):
                raise ValueError(f"the model gives {batch.shape[1]} logits per text but has {len(model_labels)} "
                                 f"labels {model_labels}")
            logits = np.zeros((len(rows), batch.shape[1]), dtype=np.float32)
        logits[index] = batch
    predicted = logits.argmax(-1)
    binary = len(model_labels) == 2
    present = sorted(set(targets.tolist()))
    result = {
        "examples": len(rows),
        "accuracy": float(accuracy_score(targets, predicted)),
        "f1": float(f1_score(targets, predicted, average="binary" if binary else "macro",
                             labels=None if binary else present, zero_division=0)),
        "f1_average": f"binary ({model_labels[1]})" if binary else "macro over the file's labels",
        "labels": list(model_labels),
        "label_mapping": mapping,
        "unused_labels": [label for i, label in enumerate(model_labels) if i not in present],
        "confusion_matrix": confusion_matrix(targets, predicted, labels=list(range(len(model_labels)))).tolist(),
        "examples_per_s": round(len(rows) / seconds, 1),
        "batch_size": batch_size,
    }
    return result, logits


def length_sorted_batches(rows: list[np.ndarray], batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rows = sorted(rows, key=len)
    return [pad_batch(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def texts_per_second(sessions: dict[str, ort.InferenceSession], batches: list, rounds: int = 1) -> dict[str, float]:
    """Throughput of each session, batches interleaved between sessions so machine noise hits all alike."""
    seconds = dict.fromkeys(sessions, 0.0)
    feeds = [{"input_ids": ids, "attention_mask": mask} for ids, mask in batches]
    for session in sessions.values():  # warm-up: allocations and kernel choice happen on the first runs
        session.run(["logits"], feeds[-1])
    for _ in range(rounds):
        for feed in tqdm(feeds, desc="speed", leave=False, mininterval=2):
            for name, session in sessions.items():
                began = time.perf_counter()
                session.run(["logits"], feed)
                seconds[name] += time.perf_counter() - began
    texts = rounds * sum(len(feed["input_ids"]) for feed in feeds)
    return {name: round(texts / s, 1) for name, s in seconds.items()}


def agreement(logits: np.ndarray, reference: np.ndarray) -> dict:
    """How far ``logits`` are from ``reference`` logits of the same texts."""
    return {
        "max_abs_diff": float(np.abs(logits - reference).max()),
        "argmax_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
    }


def session_predict(session: ort.InferenceSession) -> Predict:
    return lambda ids, mask: session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]


def artifact_encoder(path: Path) -> Encode:
    """The server's encoder over a ``tokenizer.json``, truncating where that file says."""
    truncation = Tokenizer.from_file(str(path)).truncation
    if not truncation:
        raise ValueError(f"{path} has no truncation length; rebuild it with models.export")
    return TextEncoder(path, truncation["max_length"]).encode


def manifest_labels(onnx_file: Path) -> list[str]:
    """The labels in the ``manifest.json`` beside an ONNX file (an artifact's)."""
    manifest = onnx_file.parent / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"no {MANIFEST} beside {onnx_file}: the model's labels are unknown (pass them)")
    return list(json.loads(manifest.read_text())["labels"])


def evaluate_onnx(
    path: Path,
    data_file: Path,
    batch_size: int = BATCH_SIZE,
    threads: int = 0,
    tokenizer: Path | None = None,
    labels: list[str] | None = None,
    label_map: dict[str, str] | None = None,
) -> tuple[dict, np.ndarray]:
    """Evaluate one ONNX file with ``tokenizer`` (default: the ``tokenizer.json`` beside it) and ``labels``
    (default: the manifest's beside it)."""
    labels = labels if labels is not None else manifest_labels(path)
    data = load_labeled(data_file)
    resolve_labels(data.labels, labels, label_map)  # refuse before a session is built
    session = ort_session(path, threads, cuda=True)  # fp16's home is CUDA
    encode = artifact_encoder(tokenizer or path.parent / TOKENIZER)
    result, logits = evaluate(session_predict(session), encode, data, labels, batch_size, label_map)
    return {**result, "provider": session.get_providers()[0], "threads": threads or os.cpu_count()}, logits


def evaluate_checkpoint(
    checkpoint: str, data_file: Path, max_length: int | None = None, batch_size: int = BATCH_SIZE,
    label_map: dict[str, str] | None = None,
) -> tuple[dict, np.ndarray]:
    """Evaluate an HF checkpoint (dir or Hub id) in PyTorch, truncating at ``max_length`` (default: what the
    model takes)."""
    model, tokenizer = load_checkpoint(checkpoint)
    max_length = max_length or usable_positions(model, tokenizer)

    def encode(texts: list[str]) -> list[np.ndarray]:
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        return [np.asarray(row, dtype=np.int64) for row in ids]

    def predict(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return torch_logits(model, ids, mask)

    return evaluate(predict, encode, load_labeled(data_file), labels_of(model), batch_size, label_map)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifact", type=Path, help="artifact directory (its manifest gets the results)")
    source.add_argument("--checkpoint", help="HF checkpoint directory or Hub id (results printed only)")
    parser.add_argument("--variant", default="int8", help="artifact variant: fp32, int8 or fp16")
    parser.add_argument("--data", required=True, type=Path, help="labeled TSV/CSV (text, label)")
    parser.add_argument("--label-map", help="the file's labels as the model's, e.g. 0=negative,1=positive "
                                            "(default: matched by name)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    parser.add_argument("--max-length", type=int, help="for --checkpoint (default: what the model takes)")
    parser.add_argument("--no-write", action="store_true", help="do not record the results in manifest.json")
    args = parser.parse_args(argv)
    try:
        label_map = parse_label_map(args.label_map)
        if args.checkpoint:
            result, _ = evaluate_checkpoint(args.checkpoint, args.data, args.max_length, args.batch_size, label_map)
        else:
            artifact = load_artifact(args.artifact)
            result, _ = evaluate_onnx(artifact.variant_path(args.variant), args.data, args.batch_size, args.threads,
                                      labels=artifact.labels, label_map=label_map)
            if not args.no_write:
                record_evaluation(args.artifact, args.variant, result, args.data, label_map)
    except (LabelMismatch, ExportError, ArtifactError, FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"{args.data}: {exc}" if isinstance(exc, LabelMismatch) else str(exc)) from None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
