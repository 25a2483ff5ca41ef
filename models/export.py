"""Export a Hugging Face sequence-classification checkpoint to ONNX and prove parity.

The checkpoint may be a local directory or a Hub id; both go through
``from_pretrained``, so they share one code path. The artifact gets
``model.onnx`` (inputs ``input_ids``/``attention_mask`` int64 with dynamic
batch and sequence axes, output ``logits``) and ``tokenizer.json`` configured
the way the server uses it (no padding: the batcher pads per batch; truncation
at the model's maximum length). Parity is measured on real sentences of
varied length in batches of varied size, tokenized with that very
``tokenizer.json`` and padded the way the server pads, so a tokenizer mismatch
shows up here too.

    python -m models.export --checkpoint build/finetune/best --out build/artifact
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from server.artifact import TOKENIZER
from server.tokenizer import TextEncoder, pad_batch

FP32_FILE = "model.onnx"
OPSET = 17
# The length models.finetune trains at; longer texts are truncated by the server's tokenizer.
DEFAULT_MAX_LENGTH = 128
PARITY_TOLERANCE = 1e-4
PARITY_BATCH_SIZES = (1, 2, 7, 16)

# Varied length on purpose: one word, clauses, and one text longer than the maximum length (truncation path).
PARITY_SENTENCES = (
    "great",
    "a gorgeous , witty , seductive movie .",
    "the plot is nothing but boilerplate clichés from start to finish , and the script assumes that "
    "not only would subtlety be lost on the target audience , but that it 's also too stupid to realize "
    "that they 've already seen this exact same movie a hundred times",
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "not bad at all .",
    "I expected to hate it, and I didn't: the acting is strong even if the ending drags.",
    "the movie fails to live up to the sum of its parts .",
    "an absolute waste of two hours .",
    "this is one of polanski 's best films .",
    "it 's slow -- very , very slow .",
    "Terrible service!!! Never again 😡",
    " ".join(["a long review that keeps going"] * 40),
)


class ExportError(RuntimeError):
    """A build step failed; ``step`` names it and the message says why."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"model build step '{step}' failed: {reason}")
        self.step = step


@dataclass(frozen=True)
class Parity:
    """Largest |logit difference| to the PyTorch reference over every checked text."""

    max_abs_diff: float
    texts: int
    batch_sizes: tuple[int, ...]
    argmax_agreement: float

    def as_dict(self) -> dict:
        return asdict(self)


def load_checkpoint(checkpoint: str | Path) -> tuple[PreTrainedModel, object]:
    """(model in eval mode, fast tokenizer) from a checkpoint directory or a Hub id."""
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint))
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), use_fast=True)
    except (OSError, ValueError) as exc:
        raise ExportError("load", f"cannot load checkpoint {checkpoint}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError("load", f"{checkpoint} has no fast tokenizer (tokenizer.json); the server needs one")
    return model.eval(), tokenizer


def labels_of(model: PreTrainedModel) -> list[str]:
    """Label names in logit order."""
    return [model.config.id2label[i] for i in range(model.config.num_labels)]


def write_tokenizer(tokenizer, out_dir: Path, max_length: int) -> Path:
    """Save the fast tokenizer as the server configures it: no padding, truncation at ``max_length``."""
    backend = tokenizer.backend_tokenizer
    backend.no_padding()
    backend.enable_truncation(max_length=max_length)
    path = out_dir / TOKENIZER
    backend.save(str(path))
    return path


def export_onnx(model: PreTrainedModel, path: Path, opset: int = OPSET) -> Path:
    """Trace ``model`` to ONNX with the legacy (TorchScript) exporter (max |Δlogit| ~1e-6 on DistilBERT)."""
    # Any in-vocabulary ids will do for tracing; the second row is padded so the mask path is traced too.
    ids = torch.randint(1, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = 0, 0
    axes = {0: "batch", 1: "sequence"}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (ids, mask),
                str(path),
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:  # the exporter raises many types; all mean the same to the caller
        raise ExportError("export", f"torch.onnx.export to {path}: {type(exc).__name__}: {exc}") from exc
    return path


def ort_session(path: Path, threads: int = 0, cuda: bool = False) -> ort.InferenceSession:
    """An ONNX Runtime session on the CPU, or on CUDA first when ``cuda`` and onnxruntime has it."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), options, providers=providers)


def parity_batches(tokenizer_file: Path, max_length: int, texts=PARITY_SENTENCES, batch_sizes=PARITY_BATCH_SIZES):
    """(input_ids, attention_mask) batches: every text once per batch size, padded like the server pads."""
    rows = TextEncoder(tokenizer_file, max_length).encode(list(texts))
    for size in batch_sizes:
        for start in range(0, len(rows), size):
            yield pad_batch(rows[start : start + size])


@torch.no_grad()
def torch_logits(model: PreTrainedModel, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    out = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask))
    return out.logits.float().numpy()


def measure_parity(model: PreTrainedModel, session: ort.InferenceSession, batches: list) -> Parity:
    """Compare ``session`` to the PyTorch model on ``batches`` of (input_ids, attention_mask)."""
    worst, agree, count = 0.0, 0, 0
    for ids, mask in batches:
        ref = torch_logits(model, ids, mask)
        got = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0].astype(np.float32)
        worst = max(worst, float(np.abs(ref - got).max()))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        count += len(ids)
    sizes = tuple(sorted({len(ids) for ids, _ in batches}))
    return Parity(max_abs_diff=worst, texts=count, batch_sizes=sizes, argmax_agreement=agree / max(count, 1))


def export(
    checkpoint: str | Path,
    out_dir: Path,
    max_length: int = DEFAULT_MAX_LENGTH,
    opset: int = OPSET,
    tolerance: float = PARITY_TOLERANCE,
) -> tuple[PreTrainedModel, Parity]:
    """Write ``model.onnx`` and ``tokenizer.json`` into ``out_dir``; fail unless fp32 parity <= ``tolerance``.

    Returns the PyTorch model (the parity reference for the variants) and the fp32 parity.
    """
    if opset < OPSET:
        raise ExportError("arguments", f"opset {opset} is too old; the artifact format needs {OPSET} or newer")
    model, tokenizer = load_checkpoint(checkpoint)
    positions = getattr(model.config, "max_position_embeddings", max_length)
    if not 0 < max_length <= positions:
        raise ExportError("arguments", f"max length {max_length} must be in 1..{positions} (the model's positions)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_file = write_tokenizer(tokenizer, out_dir, max_length)
    onnx_path = export_onnx(model, out_dir / FP32_FILE, opset)
    try:
        session = ort_session(onnx_path)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError("load-onnx", f"onnxruntime cannot load {onnx_path}: {exc}") from exc
    parity = measure_parity(model, session, list(parity_batches(tokenizer_file, max_length)))
    if not parity.max_abs_diff <= tolerance:
        raise ExportError(
            "parity",
            f"{onnx_path} differs from PyTorch by max |Δlogit| {parity.max_abs_diff:.3g} > {tolerance:g} "
            f"over {parity.texts} texts",
        )
    return model, parity


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or Hub id")
    parser.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    parser.add_argument("--opset", type=int, default=OPSET)
    parser.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE)
    args = parser.parse_args(argv)
    try:
        _, parity = export(args.checkpoint, args.out, args.max_length, args.opset, args.tolerance)
    except ExportError as exc:
        raise SystemExit(str(exc)) from None
    print(json.dumps({"onnx": str(args.out / FP32_FILE), "parity": parity.as_dict()}))


if __name__ == "__main__":
    main()
