"""Reduced-precision variants of the fp32 ONNX model: int8 for CPU, fp16 for CUDA.

int8 is ONNX Runtime dynamic quantization (int8 weights, activations
quantized per batch at run time). The default recipe was chosen with
``--compare`` on SST-2 dev (872 sentences) on an AVX2 CPU without VNNI, for
two intermediate checkpoints (fp32 85.89% at step 400, 88.99% at step 1600)
and the shipped one (fp32 89.91%); agreement = argmax agreement with fp32:

- plain per-tensor QInt8: 85.21% / 88.19% / 89.33%, agreement 97.2% / 97.6% / 97.1%
- per-channel (default): 86.24% / 88.65% / 90.25%, agreement 99.0% / 98.3% / 99.0%,
  23 MB, ~1.9x fp32 throughput
- per-channel + reduce_range (7-bit weights, against the int16 saturation of
  u8 x s8 products on CPUs without VNNI): 86.12% / 89.45% / 89.91%, agreement
  98.9% / 98.9% / 98.4%; the default until the shipped checkpoint, where
  saturation cost less than the lost bit
- reduce_range alone (per-tensor): 84.75%
- keeping the FFN output projections or the first layer in fp32: agreement
  99.2-99.3% but no accuracy gain, 5-10 MB more and ~20% slower; keeping the
  embeddings in fp32: 58 MB (int8 + fp16 would pass the 100 MB budget); uint8
  weights: ~30% slower; keeping the classifier head: no change
- ORT quantization pre-processing or BERT fusion before quantizing: no gain in
  accuracy or speed (the session applies the same graph optimizations at load),
  so neither is used by default, and onnxruntime's "Please consider to run
  pre-processing before quantization" warning is filtered out of the build's
  output (it would suggest a step that was measured and found useless).

fp16 keeps int64 inputs and fp32 ``logits`` (``keep_io_types``) so the server
feeds every variant the same arrays and reads the same output.

    python -m models.quantize --fp32 build/artifact/model.onnx --out-dir build/artifact --variants int8,fp16
    python -m models.quantize --fp32 build/artifact/model.onnx --out-dir build/q --compare \\
        --eval-file ../shared/data/sst2/dev.tsv
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.float16 import convert_float_to_float16

from models.data import load_labeled
from models.evaluate import (
    agreement,
    artifact_encoder,
    evaluate_onnx,
    length_sorted_batches,
    manifest_labels,
    texts_per_second,
)
from models.export import ExportError, ort_session
from server.artifact import TOKENIZER

INT8_FILE = "model.int8.onnx"
FP16_FILE = "model.fp16.onnx"

# Node-name prefixes of the legacy exporter's DistilBERT graph, by the part of the model they cover.
NODE_GROUPS = {
    "classifier": ("/pre_classifier/", "/classifier/"),
    "embeddings": ("/distilbert/embeddings/",),
    "first_layer": ("/distilbert/transformer/layer.0/",),
    "ffn_out": ("/ffn/lin2/",),
}
WEIGHT_TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}


@dataclass(frozen=True)
class Int8Recipe:
    """How to quantize: weight type and scale granularity, 7-bit range, node groups kept fp32, graph pass first."""

    weights: str = "int8"
    per_channel: bool = False
    reduce_range: bool = False
    exclude: tuple[str, ...] = ()
    graph: str = "none"  # "ort": ORT's quantization pre-processing; "bert": ORT's transformer fusions


INT8_RECIPES = {
    "plain": Int8Recipe(),
    "per_channel": Int8Recipe(per_channel=True),
    "reduce_range": Int8Recipe(reduce_range=True),
    "per_channel_reduce_range": Int8Recipe(per_channel=True, reduce_range=True),
    "uint8_per_channel": Int8Recipe(weights="uint8", per_channel=True),
    "keep_classifier": Int8Recipe(per_channel=True, exclude=("classifier",)),
    "keep_embeddings": Int8Recipe(per_channel=True, exclude=("embeddings",)),
    "keep_first_layer": Int8Recipe(per_channel=True, exclude=("first_layer",)),
    "keep_ffn_out": Int8Recipe(per_channel=True, exclude=("ffn_out",)),
    "ort_preprocess": Int8Recipe(per_channel=True, graph="ort"),
    "bert_fusion": Int8Recipe(per_channel=True, graph="bert"),
}
DEFAULT_INT8_RECIPE = "per_channel"


def excluded_nodes(model: onnx.ModelProto, groups: tuple[str, ...]) -> list[str]:
    unknown = sorted(set(groups) - set(NODE_GROUPS))
    if unknown:
        raise ExportError("quantize-int8", f"unknown node group(s) {unknown}; known: {sorted(NODE_GROUPS)}")
    prefixes = tuple(p for group in groups for p in NODE_GROUPS[group])
    names = [n.name for n in model.graph.node if any(p in n.name for p in prefixes)]
    # The quantizer first rewrites each Gemm (the classifier head) as "<name>_MatMul" + "<name>_Add".
    return names + [f"{n.name}_MatMul" for n in model.graph.node if n.name in names and n.op_type == "Gemm"]


def ort_preprocess(fp32: Path, out: Path) -> Path:
    """Shape inference plus ORT's basic graph optimizations (constant folding, redundant node removal)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32), str(out), skip_symbolic_shape=True)  # symbolic inference fails on this graph
    return out


def bert_fusion(fp32: Path, out: Path) -> Path:
    """ORT's offline BERT fusions (Attention, SkipLayerNorm, Gelu), so int8 runs fused QAttention kernels."""
    from onnxruntime.transformers.optimizer import optimize_model

    # num_heads/hidden_size 0: detected from the graph. opt_level 0: the session optimizes again at load.
    optimize_model(str(fp32), model_type="bert", num_heads=0, hidden_size=0, opt_level=0).save_model_to_file(str(out))
    return out


GRAPH_PASSES = {"ort": ort_preprocess, "bert": bert_fusion}


def _not_the_preprocessing_advice(record: logging.LogRecord) -> bool:
    return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _without_preprocessing_advice():
    """onnxruntime logs that advice on the root logger at every quantization (see the module docstring)."""
    root = logging.getLogger()
    root.addFilter(_not_the_preprocessing_advice)
    try:
        yield
    finally:
        root.removeFilter(_not_the_preprocessing_advice)


def quantize_int8(fp32: Path, out: Path, recipe: Int8Recipe = INT8_RECIPES[DEFAULT_INT8_RECIPE]) -> Path:
    """Write the dynamically quantized model to ``out``."""
    try:
        with tempfile.TemporaryDirectory() as tmp, _without_preprocessing_advice():
            source = GRAPH_PASSES[recipe.graph](fp32, Path(tmp) / "graph.onnx") if recipe.graph != "none" else fp32
            quantize_dynamic(
                source,
                out,
                weight_type=WEIGHT_TYPES[recipe.weights],
                per_channel=recipe.per_channel,
                reduce_range=recipe.reduce_range,
                nodes_to_exclude=excluded_nodes(onnx.load(str(source)), recipe.exclude),
                # Fused contrib ops (Attention, SkipLayerNorm) defeat ONNX type inference; their tensors are fp32.
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
    except ExportError:
        raise
    except Exception as exc:  # onnx / onnxruntime raise assorted types
        raise ExportError("quantize-int8", f"{fp32} -> {out}: {type(exc).__name__}: {exc}") from exc
    return out


def convert_fp16(fp32: Path, out: Path) -> Path:
    """Write the fp16 model to ``out``: fp16 weights and compute, int64 inputs, fp32 logits."""
    try:
        model = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
        onnx.save(model, str(out))
    except Exception as exc:  # onnx / onnxruntime raise assorted types
        raise ExportError("convert-fp16", f"{fp32} -> {out}: {type(exc).__name__}: {exc}") from exc
    return out


def make_variant(variant: str, fp32: Path, out_dir: Path, recipe: str = DEFAULT_INT8_RECIPE) -> Path:
    if variant == "int8":
        return quantize_int8(fp32, out_dir / INT8_FILE, INT8_RECIPES[recipe])
    if variant == "fp16":
        return convert_fp16(fp32, out_dir / FP16_FILE)
    raise ExportError("quantize", f"unknown variant {variant!r} (int8 or fp16)")


def compare_recipes(fp32: Path, out_dir: Path, eval_file: Path, names: list[str],
                    labels: list[str] | None = None) -> list[dict]:
    """Quantize with each recipe; size, agreement with fp32 ONNX, accuracy on ``eval_file``, and
    throughput measured interleaved across all of them (fair on a busy machine). ``labels``: the model's, in logit
    order (default: the manifest's beside ``fp32``)."""
    tokenizer = fp32.parent / TOKENIZER
    paths = {"fp32": fp32}
    paths.update({name: quantize_int8(fp32, out_dir / f"model.int8.{name}.onnx", INT8_RECIPES[name]) for name in names})
    rows, reference = {}, None
    for name, path in paths.items():
        result, logits = evaluate_onnx(path, eval_file, tokenizer=tokenizer, labels=labels or manifest_labels(fp32))
        reference = logits if reference is None else reference
        recipe = asdict(INT8_RECIPES[name]) if name in INT8_RECIPES else {}
        rows[name] = {"recipe": name, **recipe, "bytes": path.stat().st_size, **result,
                      "vs_fp32": agreement(logits, reference)}
        print(json.dumps(rows[name]), flush=True)
    batches = length_sorted_batches(artifact_encoder(tokenizer)(load_labeled(eval_file).texts), 32)
    speed = texts_per_second({name: ort_session(path) for name, path in paths.items()}, batches)
    for name, texts_per_s in speed.items():
        rows[name]["interleaved_texts_per_s"] = texts_per_s
    return list(rows.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", required=True, type=Path, help="the fp32 model.onnx")
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--variants", default="int8,fp16", help="comma-separated: int8, fp16")
    parser.add_argument("--int8-recipe", default=DEFAULT_INT8_RECIPE, choices=sorted(INT8_RECIPES))
    parser.add_argument("--compare", action="store_true", help="try every int8 recipe (needs --eval-file)")
    parser.add_argument("--recipes", default=",".join(INT8_RECIPES), help="recipes for --compare")
    parser.add_argument("--eval-file", type=Path)
    parser.add_argument("--labels", help="the model's labels in logit order, for --compare (default: the "
                                         "manifest's beside --fp32)")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if args.compare:
            if args.eval_file is None:
                parser.error("--compare needs --eval-file")
            rows = compare_recipes(args.fp32, args.out_dir, args.eval_file, args.recipes.split(","),
                                   args.labels.split(",") if args.labels else None)
            (args.out_dir / "int8_recipes.json").write_text(json.dumps(rows, indent=2))
            return
        for variant in args.variants.split(","):
            print(make_variant(variant.strip(), args.fp32, args.out_dir, args.int8_recipe))
    except ExportError as exc:
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    main()
