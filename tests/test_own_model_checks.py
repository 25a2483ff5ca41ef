"""Bringing your own model: labels matched by name, the checkpoint's defaults, and the usual mistakes refused
with a sentence that says what to do. Tiny local checkpoints only (``tests/own_model_fixtures.py``)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import orjson
import pytest

from models.build import build, default_name
from models.evaluate import evaluate_checkpoint
from models.evaluate import main as evaluate_main
from models.export import ExportError, load_checkpoint
from models.finetune import load_examples
from models.labels import LabelMismatch, label_positions, parse_label_map, resolve_labels
from scripts.benchlib.loadgen import score
from scripts.benchlib.runners import same_outputs
from server.artifact import ArtifactError, label_problem, load_artifact
from server.cache import PredictionCache
from server.metrics import Metrics
from server.predictor import Predictor, low_confidence_threshold
from server.primitives import Prediction
from server.runtime import ModelRuntime
from server.tokenizer import TextEncoder
from tests.broken_artifacts import copy_artifact, edit_manifest
from tests.labeled_files import write_labeled
from tests.own_model_fixtures import one_torch_thread, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
THREE = ("negative", "neutral", "positive")
TEXTS = ["a triumph", "a dull mess", "warm and funny", "I want my money back", "one of the best", "lifeless"]
_one_torch_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def sst2(tmp_path_factory) -> Path:
    return write_labeled(tmp_path_factory.mktemp("data") / "sst2.tsv", [(t, i % 2) for i, t in enumerate(TEXTS)])


# -- labels --------------------------------------------------------------------------------------------------

def test_file_labels_match_the_models_by_name_never_by_position_alone() -> None:
    assert resolve_labels(["0", "1"], THREE) == {"0": "negative", "1": "positive"}  # not 1 = "neutral"
    assert resolve_labels(["Neutral", "POSITIVE"], THREE) == {"Neutral": "neutral", "POSITIVE": "positive"}
    assert resolve_labels(["0", "1", "2"], ["LABEL_0", "LABEL_1", "LABEL_2"]) == {"0": "LABEL_0", "1": "LABEL_1",
                                                                                  "2": "LABEL_2"}
    assert resolve_labels(["1", "0"], ["neg", "pos"]) == {"0": "neg", "1": "pos"}
    assert label_positions(["1", "0", "1"], ["NEGATIVE", "POSITIVE"]) == [1, 0, 1]


def test_a_mismatch_names_both_sides_and_suggests_a_label_map() -> None:
    with pytest.raises(LabelMismatch) as refused:
        resolve_labels(["0", "1"], ["bad", "good"])
    assert "['0', '1']" in str(refused.value) and "['bad', 'good']" in str(refused.value)
    assert "--label-map 0=bad,1=good" in str(refused.value)
    with pytest.raises(LabelMismatch, match=r"\['2'\]"):  # a 3-class file: 2 has no name to match
        resolve_labels(["0", "1", "2"], THREE)


def test_an_explicit_label_map_is_the_only_rule() -> None:
    mapping = parse_label_map("0=bad, 1=good")
    assert resolve_labels(["0", "1"], ["bad", "good"], mapping) == {"0": "bad", "1": "good"}
    with pytest.raises(LabelMismatch, match=r"\['bad'\]"):  # a name the map does not list is not guessed
        resolve_labels(["0", "bad"], ["bad", "good"], mapping)
    with pytest.raises(LabelMismatch, match="does not have"):
        resolve_labels(["0"], ["bad", "good"], {"0": "BAD"})
    for text in ("0", "0=", "0=a,0=b"):
        with pytest.raises(ValueError):
            parse_label_map(text)


def test_a_three_label_model_on_sst2_is_scored_against_the_right_labels(tmp_path, sst2) -> None:
    checkpoint = save_checkpoint(tmp_path / "three", "distilbert", THREE, positions=64)

    result, logits = evaluate_checkpoint(str(checkpoint), sst2)

    targets = np.array([0 if i % 2 == 0 else 2 for i in range(len(TEXTS))])  # 0 -> negative, 1 -> positive
    assert result["accuracy"] == pytest.approx(float(np.mean(logits.argmax(-1) == targets)))
    assert result["label_mapping"] == {"0": "negative", "1": "positive"} and result["unused_labels"] == ["neutral"]
    matrix = np.array(result["confusion_matrix"])
    assert matrix.shape == (3, 3) and matrix[1].sum() == 0 and matrix.sum() == len(TEXTS)


def test_evaluation_and_build_refuse_labels_that_cannot_match_and_record_nothing(tmp_path, sst2, capsys) -> None:
    checkpoint = save_checkpoint(tmp_path / "bad-good", "bert", ("bad", "good"), positions=64)
    with pytest.raises(SystemExit, match="--label-map 0=bad,1=good"):
        evaluate_main(["--checkpoint", str(checkpoint), "--data", str(sst2)])
    with pytest.raises(ExportError, match="step 'evaluate'.*--label-map 0=bad,1=good") as refused:
        build(checkpoint, tmp_path / "artifact", ("int8",), eval_file=sst2)
    assert refused.value.step == "evaluate" and not (tmp_path / "artifact").exists()

    capsys.readouterr()
    evaluate_main(["--checkpoint", str(checkpoint), "--data", str(sst2), "--label-map", "0=bad,1=good"])
    assert '"label_mapping": {"0": "bad", "1": "good"}' in capsys.readouterr().out


def test_finetune_reads_a_feedback_export_by_name(tmp_path) -> None:
    export = write_labeled(tmp_path / "corrections.tsv", [("fine", "neutral"), ("awful", "negative")])
    assert load_examples(str(export), list(THREE)).targets == [1, 0]
    with pytest.raises(LabelMismatch, match="neutral"):
        load_examples(str(export), ["NEGATIVE", "POSITIVE"])


# -- defaults from the checkpoint ------------------------------------------------------------------------------

def test_the_default_name_comes_from_the_checkpoint(tmp_path) -> None:
    for path in (tmp_path / "finetune" / "best", tmp_path / "run-7" / "checkpoint-500", tmp_path / "reviews-bert"):
        path.mkdir(parents=True)
    assert default_name(tmp_path / "finetune" / "best") == "finetune-best"
    assert default_name(tmp_path / "run-7" / "checkpoint-500") == "run-7-checkpoint-500"
    assert default_name(tmp_path / "reviews-bert") == "reviews-bert"
    assert default_name("distilbert/distilbert-base-uncased-finetuned-sst-2-english") == (
        "distilbert-base-uncased-finetuned-sst-2-english")


@pytest.mark.parametrize("label, refused", [
    ("POSITIVE", False), ("très bien", False), ("😀", False), ("\U0001FAE8", False),  # Unicode 15: not refused
    ("", True), ("   ", True), ("x" * 33, True), ("a,b", True), ("a\tb", True), ("a\nb", True), ("a\x00b", True),
    ("a\u202eb", True), ("a\u2028b", True), ("a\u2029b", True), ("NEGATIVE ", True), (" NEGATIVE", True),
    ("very good", False),
])
def test_one_rule_decides_which_label_names_the_server_and_the_build_take(label, refused) -> None:
    assert (label_problem(label) is not None) is refused


@pytest.mark.parametrize("field, value, refused", [
    ("labels", ["\u00e9", "e\u0301"], "differ in more than case or Unicode form"),  # é twice, to a reader
    ("labels", ["good", "GOOD"], "differ in more than case"),
    ("labels", ["NEGATIVE ", "POSITIVE"], "no space at its start or end"),
    ("version", "v\u202e1", "right-to-left override"),
    ("version", '../"x', "no slash"),
    ("name", "reviews/bert", "no slash"),
    ("name", " reviews", "space at the start or end"),
])
def test_look_alike_labels_and_names_no_url_or_log_line_can_carry_are_refused(tiny_artifact, tmp_path, field, value,
                                                                                refused) -> None:
    """A red team's reloads of such manifests were accepted: answers and metrics then showed labels that look the
    same, and a version no OIP v2 URL could name, or that reads otherwise in a log line."""
    artifact = copy_artifact(tiny_artifact, tmp_path / "model")
    edit_manifest(artifact, lambda manifest: manifest.update({field: value}))
    with pytest.raises(ArtifactError, match=refused):
        load_artifact(artifact)


def test_labels_can_be_named_at_build_and_are_checked(tmp_path) -> None:
    checkpoint = save_checkpoint(tmp_path / "unnamed", "distilbert", 3, positions=32)

    manifest = build(checkpoint, tmp_path / "artifact", ("fp32",), labels=THREE, max_length=16)

    assert manifest["labels"] == list(THREE) and manifest["max_sequence_length"] == 16
    assert load_artifact(tmp_path / "artifact").labels == list(THREE)
    with pytest.raises(ExportError, match="names 2 labels but the model has 3 outputs"):
        build(checkpoint, tmp_path / "other", ("fp32",), labels=("a", "b"))
    with pytest.raises(ExportError, match="1-32 characters"):
        build(checkpoint, tmp_path / "other", ("fp32",), labels=("a", "b", "c" * 33))
    with pytest.raises(ExportError, match="other control characters"):  # U+202E: right-to-left override
        build(checkpoint, tmp_path / "other", ("fp32",), labels=("a", "b", "c\u202ed"))
    with pytest.raises(ExportError, match=r"must be in 2\.\.32"):
        build(checkpoint, tmp_path / "other", ("fp32",), max_length=64)
    # the server's own rules, before minutes of export (a red team's build passed them, and the server then refused
    # the artifact)
    with pytest.raises(ExportError, match="differ in more than case"):
        build(checkpoint, tmp_path / "other", ("fp32",), labels=("a", "positive", "Positive"))
    with pytest.raises(ExportError, match="--name 'acme/sentiment': no slash"):
        build(checkpoint, tmp_path / "other", ("fp32",), name="acme/sentiment")
    with pytest.raises(ExportError, match="--version ' v2': .*space at the start or end"):
        build(checkpoint, tmp_path / "other", ("fp32",), version=" v2")
    assert not (tmp_path / "other").exists()


# -- the usual mistakes ------------------------------------------------------------------------------------

def test_a_checkpoint_without_tokenizer_files_says_so(tmp_path) -> None:
    checkpoint = save_checkpoint(tmp_path / "weights-only", with_tokenizer=False)
    with pytest.raises(ExportError, match="has no tokenizer files") as refused:
        load_checkpoint(checkpoint)
    assert "tokenizer.save_pretrained" in str(refused.value)


def test_a_path_that_does_not_exist_is_said_so_without_trying_the_hub(tmp_path) -> None:
    with pytest.raises(ExportError, match=f"no such directory: {tmp_path / 'build' / 'bestt'}"):
        load_checkpoint(tmp_path / "build" / "bestt")
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ExportError, match="is a file"):
        load_checkpoint(tmp_path / "model.bin")


def test_a_bare_name_is_said_not_to_be_a_directory_before_the_hub_is_tried(tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "models.build", "--checkpoint", "my-sentiment-model", "--out",
                           str(tmp_path / "artifact")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert "my-sentiment-model: no such local directory" in done.stderr
    assert "trying it as a Hugging Face Hub id" in done.stderr
    assert "step 'load' failed: cannot load checkpoint my-sentiment-model" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_artifact_or_a_model_without_a_classifier_head_is_refused(tmp_path) -> None:
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    artifact = build(save_checkpoint(tmp_path / "ckpt", positions=16), tmp_path / "artifact", ("fp32",))
    assert artifact["labels"] == ["NEGATIVE", "POSITIVE"]
    with pytest.raises(ExportError, match="is a built model artifact"):
        load_checkpoint(tmp_path / "artifact")

    base = save_checkpoint(tmp_path / "base", positions=16)
    DistilBertForMaskedLM(DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=32,
                                           max_position_embeddings=16)).save_pretrained(base)
    with pytest.raises(ExportError, match="DistilBertForMaskedLM, not a sequence classifier"):
        load_checkpoint(base)

    multi = save_checkpoint(tmp_path / "multi", positions=16)
    config = (multi / "config.json").read_text().replace('"model_type"', '"problem_type": '
                                                         '"multi_label_classification", "model_type"')
    (multi / "config.json").write_text(config)
    with pytest.raises(ExportError, match="multi_label_classification"):
        load_checkpoint(multi)


def test_serving_a_checkpoint_instead_of_an_artifact_says_the_build_command(tmp_path) -> None:
    checkpoint = save_checkpoint(tmp_path / "ckpt", positions=16)
    with pytest.raises(ArtifactError, match="is a Hugging Face checkpoint, not a model artifact") as refused:
        load_artifact(checkpoint)
    assert f"python -m models.build --checkpoint {checkpoint} --out ARTIFACT" in str(refused.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="python -m models.build"):
        load_artifact(tmp_path / "empty")


# -- serving: truncation, threshold, load test, benchmark --------------------------------------------------

@pytest.fixture
async def predictor(make_settings):
    metrics = Metrics()
    runtime = ModelRuntime.load(make_settings(), metrics)
    runtime.batcher.start()
    yield Predictor(runtime, PredictionCache(1_000_000, metrics), metrics, low_confidence_threshold=0.6), metrics
    await runtime.batcher.drain()


async def test_a_text_cut_at_the_maximum_length_is_flagged_and_counted_once(predictor) -> None:
    predictor, metrics = predictor
    long = "word " * 300  # the tiny model takes 128 tokens

    first = await asyncio.wait_for(predictor.predict([long, "short"]), timeout=30)
    again = await asyncio.wait_for(predictor.predict([long]), timeout=30)

    assert [p.truncated for p in first] == [True, False]
    assert again[0].cached and again[0].truncated  # the cache keeps the flag
    identity = predictor.runtime.identity
    assert metrics.registry.get_sample_value("sentiment_truncated_texts_total",
                                             {"model": identity.name, "version": identity.version}) == 1


def test_truncation_is_flagged_exactly_at_the_maximum_length(tiny_artifact) -> None:
    """[CLS] + 6 words + [SEP] fill 8 tokens exactly: not cut; one more word, or punctuation, is; an unread
    zero-width space makes no token, so a text ending in one is not cut either."""
    encoder = TextEncoder(tiny_artifact / "tokenizer.json", 8)
    _, truncated = encoder.encode_marking_truncation(["a b c d e f", "a b c d e f g", "a b c d e f !!",
                                                      "a b c d e f\u200b", "short"])
    assert truncated == [False, True, True, False, False]


async def test_low_confidence_is_relative_to_the_number_of_labels(predictor) -> None:
    predictor, metrics = predictor
    assert low_confidence_threshold(0.6, 2) == pytest.approx(0.6)
    assert low_confidence_threshold(0.6, 3) == pytest.approx(1 / 3 + 0.2 * 2 / 3)
    three = SimpleNamespace(labels=lambda: list(THREE), identity=SimpleNamespace(name="three", version="v1"))
    serving = predictor.swap(three)
    try:
        unsure, fair = (Prediction("neutral", score, dict.fromkeys(THREE, 0.0)) for score in (0.45, 0.5))
        predictor._observe(three, [unsure, fair])  # below 0.467, above it (both below the 2-label 0.6)
        assert metrics.registry.get_sample_value("sentiment_low_confidence_predictions_total",
                                                 {"model": "three", "version": "v1"}) == 1
        # The model just swapped out: counted in its own series (kept until the next swap), at its own threshold.
        first, second = serving.labels()
        predictor._observe(serving, [Prediction(first, 0.55, {first: 0.55, second: 0.45})])
        assert metrics.registry.get_sample_value("sentiment_low_confidence_predictions_total", {
            "model": serving.identity.name, "version": serving.identity.version}) == 1  # below 0.6 for 2 labels
        assert metrics.registry.get_sample_value("sentiment_predictions_total",
                                                 {"model": "three", "version": "v1", "label": "neutral"}) == 2
    finally:
        predictor.runtime = serving  # the fixture drains the real runtime


def test_the_load_generator_scores_any_labels_and_stops_on_a_file_that_does_not_fit() -> None:
    answer = [{"label": label, "probabilities": dict.fromkeys(THREE, 1 / 3), "cached": False}
              for label in ("neutral", "positive", "negative")]
    payload = orjson.dumps({"predictions": answer})
    assert score(payload, ["neutral", 1, 0]) == (3, 0)
    assert score(payload, ["positive", "1", "0"]) == (2, 0)
    with pytest.raises(LabelMismatch, match="--label-map"):
        score(payload, ["2", "1", "0"])


def test_the_benchmark_runs_pytorch_only_on_the_artifacts_own_checkpoint() -> None:
    assert same_outputs(["bad", "good"], ["bad", "good"])
    assert same_outputs(["LABEL_0", "LABEL_1"], ["bad", "good"])  # named at build with --labels
    assert not same_outputs(["good", "bad"], ["bad", "good"])
    assert not same_outputs(["NEGATIVE", "POSITIVE"], list(THREE))
