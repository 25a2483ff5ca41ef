"""int8 with calibrated activation scales: a text's answer no longer depends on the texts batched with it.

ONNX Runtime's dynamic quantization (``models.quantize``) quantizes each matrix product's input with a scale
computed at run time over the whole engine call, so a text's probabilities moved with its batch-mates: on the first
300 SST-2 dev sentences, each alone against beside one random other, 6-7 labels changed (2.0-2.3 %) and the
probability moved by up to 0.45 (``scripts/bench_batch_effect.py``). The cache then kept whichever answer came
first.

Calibration fixes each of those scales: every ``DynamicQuantizeLinear`` becomes a ``QuantizeLinear`` whose scale
and zero point are constants, the widest range that input took over the calibration texts, each run alone (so no
text is clipped that looked like them, and the range is the texts', not their padding's). The int8 weights stay as
they are. Each ``MatMulInteger -> Cast -> Mul`` (and the bias ``Add`` after it) becomes one ``MatMulIntegerToFloat``:
ONNX Runtime fuses that chain itself only while the scales' product is a node, which constant folding removes once
the activation's scale is a constant (unfused, the graph ran ~13 % slower).

Measured on the shipped model (2026-12-06, 1,000 SST-2 train sentences): batched and alone answers identical
(``bench_batch_effect``: 0 of 300 labels changed, largest move 0.0000); agreement with fp16, each text alone,
on SST-2 dev 98.97 % (dynamic: 99.20 %), on 150 texts of 8-25 dev sentences joined (378 tokens on average, longer
than any calibration text) 98.0 % (dynamic: 96.0 %); speed within the VM's noise of the dynamic model's.

    python -m models.calibrate --artifact models/default --data ../shared/data/sst2/train.tsv \\
        --eval-file ../shared/data/sst2/dev.tsv
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from models.data import load_labeled
from models.evaluate import evaluate_onnx
from models.export import compare_logits, ort_session, parity_batches, session_logits
from models.manifest import content_version, record_evaluation
from server.artifact import MANIFEST, TOKENIZER, load_artifact, sha256_file
from server.tokenizer import TextEncoder, pad_batch

CALIBRATION_TEXTS = 1000  # sentences drawn from the calibration file (about 25 s on this VM's two cores)
CONTRIB = "com.microsoft"


def calibration_rows(data_file: Path, tokenizer: Path, max_length: int, limit: int = CALIBRATION_TEXTS,
                     seed: int = 0) -> list[np.ndarray]:
    """Token ids of ``limit`` texts drawn at random from a labeled file (its labels are not read)."""
    texts = list(load_labeled(data_file).texts)
    random.Random(seed).shuffle(texts)
    return TextEncoder(tokenizer, max_length).encode(texts[:limit])


def calibrate_int8(model: Path, out: Path, rows: Sequence[np.ndarray]) -> int:
    """Write ``model`` (dynamically quantized) to ``out`` with its activation scales fixed from ``rows``, each run
    alone; returns how many quantized inputs were fixed (0: nothing dynamic in it, written unchanged)."""
    graph_model = onnx.load(str(model))
    ranges = _observed_ranges(graph_model, rows)
    if ranges:
        scale_of = _with_fixed_scales(graph_model, ranges)
        _fuse(graph_model, scale_of)
    onnx.save(graph_model, str(out))
    return len(ranges)


def _observed_ranges(model: onnx.ModelProto, rows: Sequence[np.ndarray]) -> dict[str, tuple[float, float]]:
    """Each DynamicQuantizeLinear's widest range over ``rows``, read back from the scale and zero point it
    computed for each text alone (``range = [-zp * scale, (255 - zp) * scale]``)."""
    sites = [node for node in model.graph.node if node.op_type == "DynamicQuantizeLinear"]
    if not sites:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for node in sites:
        probe.graph.output.extend([helper.make_tensor_value_info(node.output[1], TensorProto.FLOAT, []),
                                   helper.make_tensor_value_info(node.output[2], TensorProto.UINT8, [])])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the sites must stay nodes
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    low = {node.name: 0.0 for node in sites}
    high = {node.name: 0.0 for node in sites}
    for row in rows:
        input_ids, attention_mask = pad_batch([row])
        found = session.run(None, {inputs[0]: input_ids, inputs[1]: attention_mask})[1:]
        for node, scale, zero_point in zip(sites, found[0::2], found[1::2], strict=True):
            low[node.name] = min(low[node.name], -float(zero_point) * float(scale))
            high[node.name] = max(high[node.name], (255 - float(zero_point)) * float(scale))
    return {name: (low[name], high[name]) for name in low}


def _with_fixed_scales(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]]) -> dict[str, str]:
    """Replace each DynamicQuantizeLinear by a QuantizeLinear of its range (uint8, as the dynamic one); returns
    each zero point's name -> its scale's name (constants now, under the names the dynamic node gave them)."""
    nodes, constants, scale_of = [], [], {}
    for node in model.graph.node:
        if node.op_type != "DynamicQuantizeLinear" or node.name not in ranges:
            nodes.append(node)
            continue
        low, high = ranges[node.name]
        scale = max(high - low, 1e-12) / 255
        zero_point = int(np.clip(round(-low / scale), 0, 255))
        quantized, scale_name, zero_point_name = node.output
        constants += [numpy_helper.from_array(np.array(scale, np.float32), scale_name),
                      numpy_helper.from_array(np.array(zero_point, np.uint8), zero_point_name)]
        nodes.append(helper.make_node("QuantizeLinear", [node.input[0], scale_name, zero_point_name], [quantized],
                                      name=node.name))
        scale_of[zero_point_name] = scale_name
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(constants)
    return scale_of


def _fuse(model: onnx.ModelProto, scale_of: dict[str, str]) -> None:
    """Each ``MatMulInteger -> Cast -> Mul(a_scale * b_scale) [-> Add(bias)]`` whose input was fixed becomes one
    ``MatMulIntegerToFloat``, in place of the chain's last node."""
    graph = model.graph
    constants = {tensor.name for tensor in graph.initializer}
    users, maker = collections.defaultdict(list), {}
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
        for name in node.output:
            maker[name] = node
    fused, dropped = {}, set()
    for node in graph.node:
        if node.op_type != "MatMulInteger" or len(node.input) != 4 or node.input[2] not in scale_of:
            continue
        chain = _dequantizing_chain(node, users, maker)
        a_scale = scale_of[node.input[2]]
        if chain is None or a_scale not in chain[2].input:
            continue
        cast, mul, scales = chain
        b_scale = next(name for name in scales.input if name != a_scale)
        inputs, last = [node.input[0], node.input[1], a_scale, b_scale, node.input[2], node.input[3]], mul
        following = users[mul.output[0]]
        if len(following) == 1 and following[0].op_type == "Add":
            bias = next((name for name in following[0].input if name != mul.output[0]), None)
            if bias in constants:
                inputs.append(bias)
                dropped.add(id(mul))
                last = following[0]
        fused[id(last)] = helper.make_node("MatMulIntegerToFloat", inputs, [last.output[0]], domain=CONTRIB,
                                           name=f"{node.name}_to_float")
        dropped |= {id(node), id(cast), id(scales)}
    nodes = [fused.get(id(node), node) for node in graph.node if id(node) not in dropped]
    graph.ClearField("node")
    graph.node.extend(nodes)
    if fused and not any(opset.domain == CONTRIB for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB, 1))


def _dequantizing_chain(node, users, maker):
    """The Cast, the Mul and the scales' Mul that turn ``node``'s int32 output into floats, or None when its
    output (or theirs) goes anywhere else."""
    cast = _only_user(node, users, "Cast")
    mul = cast and _only_user(cast, users, "Mul")
    if mul is None:
        return None
    scales = maker.get(next((name for name in mul.input if name != cast.output[0]), ""))
    if scales is None or scales.op_type != "Mul" or len(users[scales.output[0]]) != 1:
        return None
    return cast, mul, scales


def _only_user(node, users, op_type: str):
    found = users[node.output[0]]
    return found[0] if len(found) == 1 and found[0].op_type == op_type else None


def calibrate_artifact(directory: Path, data_file: Path, limit: int = CALIBRATION_TEXTS,
                       eval_file: Path | None = None) -> dict:
    """Calibrate an artifact's int8 variant in place: the file, its manifest entry (recipe, parity, accuracy) and
    the artifact's version (a different model must not share cached predictions or records with the one before).
    Everything is measured on the new file before it replaces the old one, then the manifest is written at once."""
    artifact = load_artifact(directory)
    entry = artifact.manifest["variants"].get("int8")
    if entry is None:
        raise SystemExit(f"{directory} has no int8 variant to calibrate")
    if entry.get("external_data"):
        raise SystemExit(f"{directory}'s int8 variant is stored as external data; calibrate it when it is built "
                         "(python -m models.build --calibration-file FILE)")
    target = directory / entry["file"]
    if not any(node.op_type == "DynamicQuantizeLinear" for node in onnx.load(str(target)).graph.node):
        raise SystemExit(f"{target} has no activation scale computed per call: nothing to calibrate (calibrated "
                         "already?)")
    rows = calibration_rows(data_file, directory / TOKENIZER, artifact.max_length, limit)
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".onnx.tmp", delete=False) as handle:
        written = Path(handle.name)
    try:
        inputs = calibrate_int8(target, written, rows)
        written.chmod(target.stat().st_mode)  # not the temporary file's 0600: a server may run as another user
        parity = parity_against_variant(artifact, written)
        result = None if eval_file is None else evaluate_onnx(
            written, eval_file, labels=artifact.labels,
            label_map=(artifact.manifest.get("evaluation") or {}).get("label_map"))[0]
        manifest = json.loads((directory / MANIFEST).read_text())
        # the int8 file's entry only: another file in the directory (a profile, an editor's backup) is no part of it
        manifest["files"][entry["file"]] = {"sha256": sha256_file(written), "bytes": written.stat().st_size}
        manifest["version"] = content_version(manifest["files"])
        manifest["variants"]["int8"].setdefault("recipe", {})["activations"] = calibration_entry(
            data_file, len(rows), inputs)
        manifest["variants"]["int8"]["parity"] = parity
        os.replace(written, target)
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    finally:
        written.unlink(missing_ok=True)
    if result is not None:  # on another file than the manifest's evaluation, that one's results are dropped
        record_evaluation(directory, "int8", result, eval_file, (manifest.get("evaluation") or {}).get("label_map"))
    return load_artifact(directory).manifest  # every hash checked again


def parity_against_variant(artifact, int8: Path) -> dict:
    """``int8``'s logits against the artifact's most precise other variant (fp32 when shipped, else fp16) on the
    build's parity batches: an artifact calibrated after its build has no PyTorch checkpoint beside it."""
    reference = "fp32" if "fp32" in artifact.variants() else "fp16"
    expected = ort_session(artifact.variant_path(reference), 0)
    got = ort_session(int8, 0)
    batches = list(parity_batches(artifact.tokenizer_path, artifact.max_length))
    measured = compare_logits(session_logits(expected), session_logits(got), batches)
    return {"reference": f"the {reference} variant", **measured.as_dict()}


def calibration_entry(data_file: Path, texts: int, sites: int) -> dict:
    """What the manifest says of an int8 variant's activation scales."""
    return {"scales": "calibrated", "data": str(data_file), "texts": texts, "inputs": sites}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, required=True, help="artifact directory with an int8 variant")
    parser.add_argument("--data", type=Path, required=True, help="labeled TSV/CSV whose texts calibrate the scales "
                                                                 "(training data, not the evaluation file)")
    parser.add_argument("--limit", type=int, default=CALIBRATION_TEXTS, help="texts drawn from --data")
    parser.add_argument("--eval-file", type=Path, help="evaluate the calibrated variant on this labeled file")
    args = parser.parse_args(argv)
    manifest = calibrate_artifact(args.artifact, args.data, args.limit, args.eval_file)
    int8 = manifest["variants"]["int8"]
    print(json.dumps({"version": manifest["version"], "activations": int8["recipe"]["activations"],
                      "accuracy": int8.get("accuracy")}))


if __name__ == "__main__":
    main()
