"""The model pipeline end to end on a tiny model: fine-tune, export, parity, quantize, evaluate, manifest."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import models.export
from models.build import build
from models.calibrate import main as calibrate_main
from models.evaluate import evaluate_checkpoint, evaluate_onnx
from models.evaluate import main as evaluate_main
from models.export import ExportError, export
from models.finetune import TrainConfig, fine_tune
from models.manifest import summary
from models.quantize import INT8_RECIPES, NODE_GROUPS, Int8Recipe, excluded_nodes, quantize_int8
from server.artifact import MANIFEST, TOKENIZER, VARIANT_FILES, ArtifactError, load_artifact, sha256_file
from server.tokenizer import TextEncoder, pad_batch
from tests.broken_artifacts import flip_a_byte
from tests.labeled_files import write_labeled
from tests.model_fixtures import TINY_MAX_LENGTH, build_tiny_artifact, save_tiny_checkpoint
from tests.own_model_fixtures import one_torch_thread, save_checkpoint

ROWS = [
    ("a gorgeous , witty , seductive movie .", 1),
    ("the movie fails to live up to the sum of its parts .", 0),
    ("it 's a charming and often affecting journey .", 1),
    ("an absolute waste of two hours .", 0),
    ("one of the year 's best films", 1),
    ("unflinchingly bleak and desperate", 0),
    ("warm , funny and beautifully acted", 1),
    ("the plot is nothing but boilerplate clichés", 0),
    ("great", 1),
    ("dull , lifeless and far too long", 0),
    ("a triumph", 1),
    ("I want my money back", 0),
]
SAMPLE = ["fine", "a very long and winding review " * 30, "not good , not bad ."]
_one_torch_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> Path:
    return write_labeled(tmp_path_factory.mktemp("data") / "labeled.tsv", ROWS)


@pytest.fixture(scope="module")
def initial(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("initial"))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, initial, labeled) -> Path:
    out = tmp_path_factory.mktemp("finetune")
    cfg = TrainConfig(base=str(initial), train=str(labeled), dev=str(labeled), out=str(out), epochs=1.0,
                      batch_size=4, eval_every=2, train_limit=8, lr=1e-3, max_length=TINY_MAX_LENGTH)
    fine_tune(cfg)
    return out / "best"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tuned, labeled) -> Path:
    out = tmp_path_factory.mktemp("artifact") / "model"
    build(tuned, out, ("fp32", "int8", "fp16"), eval_file=labeled, max_length=TINY_MAX_LENGTH)
    return out


@pytest.fixture
def artifact_copy(artifact, tmp_path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / "copy"))


def test_fine_tune_keeps_a_classifier_bases_labels_and_trains_on_named_labels(tmp_path):
    """Retraining a served 3-label model on its feedback export: its labels and head stay, names are targets."""
    base = save_checkpoint(tmp_path / "three", labels=("negative", "neutral", "positive"), positions=32)
    rows = [("awful", "negative"), ("fine i guess", "neutral"), ("wonderful", "positive"), ("meh", "Neutral")]
    data = write_labeled(tmp_path / "corrections.tsv", rows)
    cfg = TrainConfig(base=str(base), train=str(data), dev=str(data), out=str(tmp_path / "out"), epochs=1.0,
                      batch_size=2, eval_every=2, lr=1e-3, max_length=32)
    fine_tune(cfg)
    tuned = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "best")
    assert [tuned.config.id2label[i] for i in range(3)] == ["negative", "neutral", "positive"]


def test_fine_tune_trains_and_keeps_best(initial, tuned):
    result = json.loads((tuned / "dev_result.json").read_text())
    assert 0.0 <= result["accuracy"] <= 1.0 and result["step"] in (2,)
    before = AutoModelForSequenceClassification.from_pretrained(initial).classifier.weight
    after = AutoModelForSequenceClassification.from_pretrained(tuned).classifier.weight
    assert not torch.equal(before, after)


def test_ema_weights_are_evaluated_and_survive_a_resume(initial, labeled, tmp_path):
    def run(epochs: float) -> dict:
        cfg = TrainConfig(base=str(initial), train=str(labeled), dev=str(labeled), out=str(tmp_path), epochs=epochs,
                          batch_size=4, eval_every=1, train_limit=8, lr=1e-3, max_length=TINY_MAX_LENGTH,
                          ema_decay=0.5)
        fine_tune(cfg)
        return torch.load(tmp_path / "state.pt", weights_only=False)

    first = run(1.0)
    assert int(first["ema"]["n_averaged"]) == 2
    resumed = run(2.0)
    assert int(resumed["ema"]["n_averaged"]) == 4  # continued from the saved average, not restarted
    weight = "classifier.weight"
    trained, averaged = resumed["model"][weight], resumed["ema"][f"module.{weight}"]
    assert not torch.equal(trained, averaged)
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all("ema_dev_accuracy" in r for r in records)
    assert json.loads((tmp_path / "best" / "dev_result.json").read_text())["weights"] in ("trained", "ema")


def test_every_variant_has_the_server_io_contract(artifact):
    for variant, name in VARIANT_FILES.items():
        model = onnx.load(str(artifact / name))
        assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
        inputs = {i.name: i.type.tensor_type for i in model.graph.input}
        assert set(inputs) == {"input_ids", "attention_mask"}, variant
        for tensor in inputs.values():
            assert tensor.elem_type == onnx.TensorProto.INT64
            assert [d.dim_param for d in tensor.shape.dim] and all(d.dim_param for d in tensor.shape.dim)
        (output,) = model.graph.output
        assert output.name == "logits" and output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, variant


def test_onnx_matches_pytorch_on_server_style_batches(artifact, tuned):
    """Independent of the build's own check: the server's encoder and padding, PyTorch with HF's tokenizer."""
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    ids, mask = pad_batch(TextEncoder(artifact / TOKENIZER, TINY_MAX_LENGTH).encode(SAMPLE))
    hf = AutoTokenizer.from_pretrained(tuned)(SAMPLE, padding=True, truncation=True, max_length=TINY_MAX_LENGTH,
                                              return_tensors="pt")
    model = AutoModelForSequenceClassification.from_pretrained(tuned).eval()
    with torch.no_grad():
        expected = model(input_ids=hf["input_ids"], attention_mask=hf["attention_mask"]).logits.numpy()
    got = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    assert np.array_equal(ids, hf["input_ids"].numpy())
    assert np.abs(got - expected).max() <= 1e-4


def test_tokenizer_json_is_configured_for_the_server(artifact):
    tokenizer = Tokenizer.from_file(str(artifact / TOKENIZER))
    assert tokenizer.padding is None
    assert tokenizer.truncation["max_length"] == TINY_MAX_LENGTH
    assert len(tokenizer.encode(SAMPLE[1]).ids) == TINY_MAX_LENGTH


def test_manifest_lists_every_file_with_its_hash(artifact):
    manifest = json.loads((artifact / MANIFEST).read_text())
    on_disk = {p.name for p in artifact.iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk == {TOKENIZER, *VARIANT_FILES.values()}
    for name, info in manifest["files"].items():
        assert info == {"sha256": sha256_file(artifact / name), "bytes": (artifact / name).stat().st_size}
    assert manifest["labels"] == ["NEGATIVE", "POSITIVE"]
    assert manifest["max_sequence_length"] == TINY_MAX_LENGTH
    assert manifest["architecture"] == "DistilBertForSequenceClassification"
    assert manifest["parity"]["fp32"]["max_abs_diff"] <= 1e-4
    loaded = load_artifact(artifact)
    assert loaded.variants() == ["fp16", "int8", "fp32"]
    assert loaded.choose_variant("auto", "cpu") == "int8"


def test_manifest_records_how_the_weights_were_trained(artifact, tuned):
    source = json.loads((artifact / MANIFEST).read_text())["source"]
    assert source["checkpoint"] == str(tuned)
    assert source["fine_tune"]["lr"] == 1e-3 and source["fine_tune"]["train_limit"] == 8
    assert source["selected"] == json.loads((tuned / "dev_result.json").read_text())


def test_manifest_records_evaluation_of_every_variant(artifact):
    manifest = json.loads((artifact / MANIFEST).read_text())
    results = manifest["evaluation"]["results"]
    assert set(results) == {"fp32", "int8", "fp16"}
    for variant, result in results.items():
        assert np.sum(result["confusion_matrix"]) == len(ROWS)
        assert manifest["variants"][variant]["accuracy"] == result["accuracy"]
        assert manifest["variants"][variant]["parity"]["texts"] > 0
    assert results["int8"]["vs_fp32"]["argmax_agreement"] > 0.5


def test_onnx_evaluation_agrees_with_pytorch(artifact, tuned, labeled):
    onnx_result, onnx_logits = evaluate_onnx(artifact / "model.onnx", labeled)
    torch_result, torch_logits = evaluate_checkpoint(str(tuned), labeled, TINY_MAX_LENGTH)
    assert np.abs(onnx_logits - torch_logits).max() <= 1e-4
    expected = float(np.mean(torch_logits.argmax(-1) == np.array([label for _, label in ROWS])))
    assert onnx_result["accuracy"] == torch_result["accuracy"] == pytest.approx(expected)
    assert onnx_result["confusion_matrix"] == torch_result["confusion_matrix"]


def test_evaluate_cli_records_results_in_the_manifest(artifact_copy, labeled):
    manifest = json.loads((artifact_copy / MANIFEST).read_text())
    manifest["variants"]["int8"]["accuracy"] = None
    manifest["evaluation"] = {}
    (artifact_copy / MANIFEST).write_text(json.dumps(manifest))
    evaluate_main(["--artifact", str(artifact_copy), "--variant", "int8", "--data", str(labeled)])
    updated = load_artifact(artifact_copy).manifest
    assert updated["variants"]["int8"]["accuracy"] == updated["evaluation"]["results"]["int8"]["accuracy"]


def test_corrupted_file_is_refused_naming_it(artifact_copy):
    flip_a_byte(artifact_copy / "model.int8.onnx")
    with pytest.raises(ArtifactError, match=r"model\.int8\.onnx.*sha256"):
        load_artifact(artifact_copy)


def test_missing_file_is_refused_naming_it(artifact_copy):
    (artifact_copy / TOKENIZER).unlink()
    with pytest.raises(ArtifactError, match=r"missing: .*tokenizer\.json"):
        load_artifact(artifact_copy)


def test_shipped_artifact_drops_fp32_but_records_it(tmp_path):
    out = build_tiny_artifact(tmp_path / "shipped", variants=("int8",))
    assert {p.name for p in out.iterdir()} == {"model.int8.onnx", TOKENIZER, MANIFEST}
    manifest = load_artifact(out).manifest
    assert list(manifest["variants"]) == ["int8"]
    assert manifest["parity"]["fp32"]["max_abs_diff"] <= 1e-4
    assert manifest["variants"]["int8"]["recipe"]["name"] in INT8_RECIPES
    printed = summary(manifest)  # what the build prints: the fp32 parity too, and how to ship fp32
    assert printed["checked_not_shipped"]["fp32"]["parity"] == manifest["parity"]["fp32"]
    assert "--keep-fp32" in printed["note"]


def test_failed_build_names_the_step_and_keeps_the_previous_artifact(artifact_copy, tuned, monkeypatch):
    version = load_artifact(artifact_copy).version
    real_export = models.export.export_onnx

    def export_a_different_model(model, path, opset=17):
        other = copy.deepcopy(model)
        other.classifier.bias.data += 1.0
        return real_export(other, path, opset)

    monkeypatch.setattr(models.export, "export_onnx", export_a_different_model)
    with pytest.raises(ExportError, match="max |Δlogit|") as failure:
        build(tuned, artifact_copy, ("int8",), max_length=TINY_MAX_LENGTH)
    assert failure.value.step == "parity"
    assert load_artifact(artifact_copy).version == version
    assert [p.name for p in artifact_copy.parent.iterdir()] == ["copy"]


def test_unloadable_checkpoint_fails_at_the_load_step(tmp_path):
    with pytest.raises(ExportError, match="step 'load'") as failure:
        export(tmp_path / "no-such-checkpoint", tmp_path / "out")
    assert failure.value.step == "load"


def test_int8_node_groups_match_the_exported_graph(artifact, tmp_path):
    """Renamed exporter nodes would make exclusions silently do nothing."""
    graph = onnx.load(str(artifact / "model.onnx"))
    for group in NODE_GROUPS:
        assert excluded_nodes(graph, (group,)), group
    recipe = Int8Recipe(per_channel=True, exclude=("classifier", "first_layer"))
    quantized = onnx.load(str(quantize_int8(artifact / "model.onnx", tmp_path / "q.onnx", recipe)))
    integer = {node.name for node in quantized.graph.node if node.op_type == "MatMulInteger"}
    assert not [name for name in integer if "classifier/" in name or "/layer.0/" in name]
    assert [name for name in integer if "/layer.1/ffn/lin2/" in name]


def int8_alone_and_batched(artifact: Path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The int8 variant's logits for ``texts``: each alone, and all in one padded batch."""
    loaded = load_artifact(artifact)
    session = ort.InferenceSession(str(loaded.variant_path("int8")), providers=["CPUExecutionProvider"])
    rows = TextEncoder(loaded.tokenizer_path, loaded.max_length).encode(texts)

    def logits(batch):
        input_ids, attention_mask = pad_batch(batch)
        return session.run(["logits"], {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    return np.concatenate([logits([row]) for row in rows]), logits(rows)


def test_a_calibrated_build_s_int8_answers_a_text_the_same_whatever_its_batch(tuned, labeled, tmp_path):
    """``--calibration-file``: no activation scale is computed per call any more (the graph has no
    DynamicQuantizeLinear), so a text's logits are the same alone as beside others; the manifest says so."""
    texts = [text for text, _ in ROWS] + SAMPLE
    dynamic = build(tuned, tmp_path / "dynamic", ("int8",), max_length=TINY_MAX_LENGTH)
    assert dynamic["variants"]["int8"]["recipe"]["activations"] == "dynamic"
    manifest = build(tuned, tmp_path / "calibrated", ("int8",), max_length=TINY_MAX_LENGTH, calibration_file=labeled)
    assert manifest["variants"]["int8"]["recipe"]["activations"] == {
        "scales": "calibrated", "data": str(labeled), "texts": len(ROWS), "inputs": manifest["variants"]["int8"][
            "recipe"]["activations"]["inputs"]}
    graph = onnx.load(str(tmp_path / "calibrated" / "model.int8.onnx"))
    ops = {node.op_type for node in graph.graph.node}
    assert "DynamicQuantizeLinear" not in ops and {"QuantizeLinear", "MatMulIntegerToFloat"} <= ops
    alone, batched = int8_alone_and_batched(tmp_path / "calibrated", texts)
    dynamic_alone, dynamic_batched = int8_alone_and_batched(tmp_path / "dynamic", texts)
    moved, dynamic_moved = np.abs(alone - batched).max(), np.abs(dynamic_alone - dynamic_batched).max()
    assert moved < 1e-6 < dynamic_moved  # what calibration removes, on the same model
    assert np.abs(alone - dynamic_alone).max() < 0.05 * np.abs(dynamic_alone).max()  # whose answers it keeps


def test_calibrating_a_built_artifact_rewrites_its_int8_and_manifest(artifact_copy, labeled):
    """``python -m models.calibrate``: the int8 file replaced, every hash and the version renewed (a different
    model must not share cached predictions or records), parity measured against the fp32 variant, accuracy on
    the eval file; the artifact loads, and its int8 answers do not depend on the batch."""
    before = json.loads((artifact_copy / MANIFEST).read_text())
    mode = (artifact_copy / "model.int8.onnx").stat().st_mode
    (artifact_copy / "model.int8.onnx.opt.onnx").write_bytes(b"a profile's leftover")  # not the artifact's
    calibrate_main(["--artifact", str(artifact_copy), "--data", str(labeled), "--eval-file", str(labeled)])
    after = load_artifact(artifact_copy).manifest  # every sha256 checked
    assert after["version"] != before["version"]
    assert (artifact_copy / "model.int8.onnx").stat().st_mode == mode  # readable as before, not a temp file's 0600
    assert after["files"]["model.int8.onnx"]["sha256"] != before["files"]["model.int8.onnx"]["sha256"]
    assert set(after["files"]) == set(before["files"])
    int8 = after["variants"]["int8"]
    assert int8["recipe"]["activations"]["scales"] == "calibrated"
    assert int8["parity"]["reference"] == "the fp32 variant" and int8["parity"]["argmax_agreement"] >= 0.9
    assert int8["accuracy"] == after["evaluation"]["results"]["int8"]["accuracy"]
    alone, batched = int8_alone_and_batched(artifact_copy, [text for text, _ in ROWS] + SAMPLE)
    assert np.abs(alone - batched).max() < 1e-5
    with pytest.raises(SystemExit, match="nothing to calibrate"):  # again: it would only rename the same model
        calibrate_main(["--artifact", str(artifact_copy), "--data", str(labeled)])
    assert load_artifact(artifact_copy).manifest["version"] == after["version"]
