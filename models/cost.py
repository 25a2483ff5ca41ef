"""Per-text inference cost of our model against a distilbert-base-uncased-sized one.

The comparison model has distilbert-base-uncased's shape (dim 768, 6 layers,
12 heads, 3072 FFN, 66M parameters) with random weights: cost does not
depend on the weights, so no download is needed. Both models are exported
and (optionally) quantized by the same code, run by ONNX Runtime on the CPU
with the same thread count, on the same tokenized sentences in the same
length-sorted batches. Batches alternate between the two models so that
noise from other work on the machine hits both alike.

    python -m models.cost --checkpoint build/finetune/best --data ../shared/data/sst2/dev.tsv
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

from models.data import load_labeled
from models.evaluate import length_sorted_batches, texts_per_second
from models.export import export_onnx, load_checkpoint, ort_session
from models.minilm import build_classifier_from_bert_dir, minilm_dir
from models.quantize import quantize_int8

MAX_LENGTH = 128  # the length models.finetune trains at; cost is compared at it


def distilbert_base_sized(vocab_size: int, seed: int = 0) -> DistilBertForSequenceClassification:
    torch.manual_seed(seed)
    return DistilBertForSequenceClassification(DistilBertConfig(vocab_size=vocab_size)).eval()


def compare(checkpoint: str | None, data: Path, batch_size: int, threads: int, precision: str, limit: int | None,
            rounds: int) -> dict:
    if checkpoint:
        ours, tokenizer = load_checkpoint(checkpoint)
    else:
        ours = build_classifier_from_bert_dir(minilm_dir()).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    models = {"ours": ours, "distilbert_base_sized": distilbert_base_sized(ours.config.vocab_size)}
    ids = tokenizer(load_labeled(data, limit=limit).texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    batches = length_sorted_batches([np.asarray(row, dtype=np.int64) for row in ids], batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, model in models.items():
            path = export_onnx(model, Path(tmp) / f"{name}.onnx")
            if precision == "int8":
                path = quantize_int8(path, Path(tmp) / f"{name}.int8.onnx")
            sessions[name] = ort_session(path, threads)
        speed = texts_per_second(sessions, batches, rounds)
    return {
        "precision": precision,
        "batch_size": batch_size,
        "threads": threads or "all cores",
        "texts": sum(len(ids) for ids, _ in batches) * rounds,
        "parameters_m": {name: round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for name, m in models.items()},
        "texts_per_s": speed,
        "speedup": round(speed["ours"] / speed["distilbert_base_sized"], 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="our checkpoint (default: the MiniLM-mapped base; weights don't matter)")
    parser.add_argument("--data", required=True, type=Path, help="labeled TSV/CSV whose texts are run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    parser.add_argument("--limit", type=int, help="use only the first N texts")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the texts")
    args = parser.parse_args(argv)
    result = compare(args.checkpoint, args.data, args.batch_size, args.threads, args.precision, args.limit, args.rounds)
    print(json.dumps(result, indent=2))
    print(f"ours {result['texts_per_s']['ours']} texts/s vs distilbert-base-sized "
          f"{result['texts_per_s']['distilbert_base_sized']} texts/s: {result['speedup']}x")


if __name__ == "__main__":
    main()
