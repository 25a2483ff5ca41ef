"""Export a Hugging Face sequence-classification checkpoint to ONNX and prove parity.

The checkpoint may be a local directory or a Hub id; both go through
``from_pretrained``, so they share one code path. A local path is checked
first, so the usual mistakes get a sentence rather than a traceback: a path
that does not exist (said before anything is tried on the Hub; a bare
``name`` or ``org/name`` that is not a local directory is then tried as a Hub
id), a file, a built artifact, a directory without ``config.json`` or without
tokenizer files (``model.save_pretrained`` alone writes none), a model type
outside ``SUPPORTED_MODEL_TYPES``, a model without a trained
sequence-classification head, and a multi-label or regression head (the
server reports softmax probabilities over exclusive labels).

The artifact gets ``model.onnx`` (inputs ``input_ids``/``attention_mask`` int64
with dynamic batch and sequence axes, output ``logits``) and ``tokenizer.json``
configured the way the server uses it (no padding: the batcher pads per batch;
truncation at the maximum length). The maximum length defaults to what the
model can take (``usable_positions``: its position table, less the offset
RoBERTa-style embeddings reserve, within the tokenizer's ``model_max_length``);
a smaller ``max_length`` caps it (faster on long texts, which the server then
truncates and says so). Parity is measured on real sentences of varied length
in batches of varied size, plus one text of exactly the maximum length,
tokenized with that very ``tokenizer.json`` and padded the way the server pads,
so a tokenizer mismatch or a length the model cannot take shows up here too.

    python -m models.export --checkpoint build/finetune/best --out build/artifact
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from server.artifact import MANIFEST, MAX_SEQUENCE_LENGTH_CAP, TOKENIZER
from server.tokenizer import TextEncoder, pad_batch

FP32_FILE = "model.onnx"
OPSET = 17
PARITY_TOLERANCE = 1e-4
PARITY_BATCH_SIZES = (1, 2, 7, 16)
# Model types whose export, parity and serving tests/test_own_model_architectures.py verifies on tiny models.
# Tried and not supported: funnel, longformer and nystromformer (their traced graphs fail in ONNX Runtime or in
# the exporter), xlnet (no position table), gpt2 and bart (decoders: the legacy exporter cannot trace them).
SUPPORTED_MODEL_TYPES = (
    "albert", "bert", "camembert", "convbert", "deberta", "deberta-v2", "distilbert", "electra", "ernie",
    "megatron-bert", "mobilebert", "modernbert", "mpnet", "roberta", "roformer", "squeezebert", "xlm-roberta",
    "xlm-roberta-xl",
)
# What a checkpoint directory needs for AutoTokenizer: a fast tokenizer file, or a vocabulary it can convert.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "spm.model", "tokenizer.model")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")

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


def checkpoint_source(checkpoint: str | Path) -> str:
    """The local checkpoint directory or the Hub id to load; ``ExportError`` for a local path that cannot be one.

    A path that does not exist is refused at once unless it could be a Hub id (``name`` or ``org/name``): then a
    line on stderr says it is not a local directory before the Hub is tried (which takes ~30 s to fail offline).
    """
    text = str(checkpoint)
    path = Path(text).expanduser()
    if path.exists():
        check_checkpoint_directory(path)
        return str(path)
    if not HUB_ID.fullmatch(text) or ".." in text:
        raise ExportError("load", f"no such directory: {path} (give the directory your checkpoint was saved to "
                                  "with save_pretrained, or a Hugging Face Hub id such as org/name)")
    print(f"{text}: no such local directory (in {Path.cwd()}); trying it as a Hugging Face Hub id", file=sys.stderr)
    return text


def check_checkpoint_directory(path: Path) -> None:
    """Refuse, with what to do, a local path that is not a complete, supported classifier checkpoint."""
    if not path.is_dir():
        raise ExportError("load", f"{path} is a file; --checkpoint takes the directory save_pretrained wrote")
    if not (path / "config.json").is_file():
        if (path / MANIFEST).is_file():
            raise ExportError("load", f"{path} is a built model artifact (it has {MANIFEST}), not a checkpoint: serve "
                                      f"it as it is (MODEL_PATH={path}) or build from the checkpoint it came from")
        raise ExportError("load", f"{path} has no config.json, so it is not a Hugging Face checkpoint: write one with "
                                  "model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR)")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ExportError("load", f"{path / 'config.json'} is not a JSON object: {exc}") from None
    check_supported(model_type, path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ExportError("load", f"{path} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}): "
                                  "model.save_pretrained writes only the weights and config; save the tokenizer the "
                                  f"model was trained with beside them: tokenizer.save_pretrained('{path}')")


def check_supported(model_type: str | None, where: object) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ExportError("load", f"{where}: model type {model_type!r} is not supported; the export is verified "
                                  f"for {', '.join(SUPPORTED_MODEL_TYPES)}")


def check_classifier(config, where: object) -> None:
    """A single-label classification head with at least two labels, as the server serves it."""
    heads = [a for a in config.architectures or [] if a.endswith("ForSequenceClassification")]
    if config.architectures and not heads:
        raise ExportError("load", f"{where} is a {', '.join(config.architectures)}, not a sequence classifier: "
                                  "fine-tune a classification head first (python -m models.finetune --base DIR ...)")
    if config.problem_type in ("multi_label_classification", "regression") or config.num_labels < 2:
        raise ExportError("load", f"{where} is a {config.problem_type or 'regression'} model with "
                                  f"{config.num_labels} output(s): the server serves single-label classifiers "
                                  "(softmax over two or more exclusive labels)")


def load_checkpoint(checkpoint: str | Path) -> tuple[PreTrainedModel, object]:
    """(model in eval mode, fast tokenizer) from a checkpoint directory or a Hub id; ``ExportError`` says why not."""
    source = checkpoint_source(checkpoint)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ExportError("load", f"cannot load checkpoint {source}: {_first_line(exc)}") from exc
    check_supported(config.model_type, source)
    check_classifier(config, source)
    try:
        model, loading = AutoModelForSequenceClassification.from_pretrained(source, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ExportError("load", f"cannot load the weights of {source}: {_first_line(exc)}") from exc
    if loading["missing_keys"]:
        raise ExportError("load", f"{source} lacks weights {sorted(loading['missing_keys'])[:5]}: they would be "
                                  "random; is it a fine-tuned classifier saved with save_pretrained?")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True)
    except Exception as exc:  # tokenizer loading raises TypeError, OSError, ValueError... for a missing or bad file
        raise ExportError("load", f"cannot load the tokenizer of {source}: {type(exc).__name__}: "
                                  f"{_first_line(exc)} (save it with tokenizer.save_pretrained)") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError("load", f"{source} has no fast tokenizer (tokenizer.json); the server needs one")
    return model.eval(), tokenizer


def usable_positions(model: PreTrainedModel, tokenizer) -> int:
    """The longest input the model takes: its position table, less the offset RoBERTa-style embeddings reserve
    for padding (positions start at ``padding_idx + 1``), within the tokenizer's ``model_max_length`` when that is
    set (a huge sentinel when not) and the server's ``MAX_SEQUENCE_LENGTH_CAP``."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions <= 0:
        raise ExportError("arguments", f"{model.config.model_type} declares no max_position_embeddings; "
                                       "pass --max-length")
    padding_idx = getattr(getattr(model.base_model, "embeddings", None), "padding_idx", None)
    if isinstance(padding_idx, int):
        positions -= padding_idx + 1
    declared = getattr(tokenizer, "model_max_length", None)
    if isinstance(declared, int) and 0 < declared < positions:
        positions = declared
    return min(positions, MAX_SEQUENCE_LENGTH_CAP)


def labels_of(model: PreTrainedModel) -> list[str]:
    """Label names in logit order."""
    return [str(model.config.id2label[i]) for i in range(model.config.num_labels)]


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


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
    """(input_ids, attention_mask) batches: every text once per batch size, padded like the server pads; then one
    text of exactly ``max_length`` tokens alone (the longest input the server will give the model)."""
    encoder = TextEncoder(tokenizer_file, max_length)
    rows = encoder.encode(list(texts))
    for size in batch_sizes:
        for start in range(0, len(rows), size):
            yield pad_batch(rows[start : start + size])
    yield pad_batch(encoder.encode([" ".join(["word"] * max_length)]))


@torch.no_grad()
def torch_logits(model: PreTrainedModel, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    out = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask))
    return out.logits.float().numpy()


Logits = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (input_ids, attention_mask) -> float32 logits


def compare_logits(reference: Logits, candidate: Logits, batches: list) -> Parity:
    """``candidate``'s logits against ``reference``'s on ``batches`` of (input_ids, attention_mask): the largest
    |difference| and how often both pick the same label."""
    worst, agree, count = 0.0, 0, 0
    for ids, mask in batches:
        want, got = reference(ids, mask), candidate(ids, mask)
        worst = max(worst, float(np.abs(want - got).max()))
        agree += int((want.argmax(-1) == got.argmax(-1)).sum())
        count += len(ids)
    sizes = tuple(sorted({len(ids) for ids, _ in batches}))
    return Parity(max_abs_diff=worst, texts=count, batch_sizes=sizes, argmax_agreement=agree / max(count, 1))


def session_logits(session: ort.InferenceSession) -> Logits:
    """An ONNX Runtime session as a ``Logits`` function."""
    return lambda ids, mask: session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0].astype(np.float32)


def measure_parity(model: PreTrainedModel, session: ort.InferenceSession, batches: list) -> Parity:
    """Compare ``session`` to the PyTorch model on ``batches`` of (input_ids, attention_mask)."""
    run_session = session_logits(session)

    def pytorch(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        try:
            return torch_logits(model, ids, mask)
        except Exception as exc:  # e.g. IndexError: a position beyond the model's table
            raise ExportError("parity", f"PyTorch cannot run the checkpoint on a batch of shape {ids.shape}: "
                                        f"{type(exc).__name__}: {_first_line(exc)} (a shorter --max-length?)") from exc

    def exported(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        try:
            return run_session(ids, mask)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExportError("parity", f"ONNX Runtime cannot run the exported model on a batch of shape "
                                        f"{ids.shape}: {_first_line(exc)[:300]}; this architecture does not export "
                                        "faithfully") from exc

    return compare_logits(pytorch, exported, batches)


@dataclass(frozen=True)
class Exported:
    """What ``export`` produced: the PyTorch reference, the fp32 parity and the maximum length it was built for."""

    model: PreTrainedModel
    parity: Parity
    max_length: int


def export(
    checkpoint: str | Path,
    out_dir: Path,
    max_length: int | None = None,
    opset: int = OPSET,
    tolerance: float = PARITY_TOLERANCE,
) -> Exported:
    """Write ``model.onnx`` and ``tokenizer.json`` into ``out_dir``; fail unless fp32 parity <= ``tolerance``.

    ``max_length`` None: the model's ``usable_positions``; a number caps it (it must not exceed them).
    """
    if opset < OPSET:
        raise ExportError("arguments", f"opset {opset} is too old; the artifact format needs {OPSET} or newer")
    model, tokenizer = load_checkpoint(checkpoint)
    positions = usable_positions(model, tokenizer)
    max_length = positions if max_length is None else max_length
    if not 2 <= max_length <= positions:
        raise ExportError("arguments", f"max length {max_length} must be in 2..{positions} (what the model takes)")
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
    return Exported(model, parity, max_length)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or Hub id")
    parser.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    parser.add_argument("--max-length", type=int, help="cap on tokens per text (default: what the model takes)")
    parser.add_argument("--opset", type=int, default=OPSET)
    parser.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE)
    args = parser.parse_args(argv)
    try:
        exported = export(args.checkpoint, args.out, args.max_length, args.opset, args.tolerance)
    except ExportError as exc:
        raise SystemExit(str(exc)) from None
    print(json.dumps({"onnx": str(args.out / FP32_FILE), "max_length": exported.max_length,
                      "parity": exported.parity.as_dict()}))


if __name__ == "__main__":
    main()
