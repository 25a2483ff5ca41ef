"""The shipped default artifact: hashes match, variants as documented, and it reads sentiment correctly."""

from __future__ import annotations

import numpy as np
import pytest

from models.labels import resolve_labels
from server.artifact import load_artifact
from server.config import DEFAULT_MODEL_PATH, load_settings
from server.engine import OnnxEngine, softmax
from server.predictor import low_confidence_threshold
from server.tokenizer import TextEncoder, pad_batch

CLEAR_CASES = [
    ("This movie was absolutely wonderful, I loved every minute.", "POSITIVE"),
    ("One of the best films of the year, moving and beautifully acted.", "POSITIVE"),
    ("A warm, funny and clever delight.", "POSITIVE"),
    ("A dull, tedious and boring mess.", "NEGATIVE"),
    ("I hated this awful film; the plot is stupid and the acting is terrible.", "NEGATIVE"),
    ("The worst movie I have seen in years.", "NEGATIVE"),
]


@pytest.fixture(scope="module")
def artifact():
    return load_artifact(DEFAULT_MODEL_PATH)  # verifies every file's sha256


def test_sst2s_labels_match_the_shipped_models_by_name(artifact):
    """What `make model` evaluates on: SST-2's 0/1 are NEGATIVE/POSITIVE by name, and the threshold is the setting."""
    assert resolve_labels(["0", "1"], artifact.labels) == {"0": "NEGATIVE", "1": "POSITIVE"}
    threshold = low_confidence_threshold(load_settings().low_confidence_threshold, len(artifact.labels))
    assert threshold == pytest.approx(0.6)
    fp32 = artifact.manifest["evaluation"]["results"]["fp32"]
    assert np.sum(fp32["confusion_matrix"]) == fp32["examples"] == 872


def test_manifest_lists_shipped_variants_and_figures(artifact):
    assert artifact.manifest["architecture"] == "DistilBertForSequenceClassification"
    assert artifact.labels == ["NEGATIVE", "POSITIVE"]
    assert set(artifact.variants()) == {"int8", "fp16"}
    shipped = sum(info["bytes"] for info in artifact.manifest["files"].values())
    assert shipped <= 100 * 10**6
    results = artifact.manifest["evaluation"]["results"]
    assert abs(results["int8"]["accuracy"] - results["fp32"]["accuracy"]) <= 0.005


@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_each_variant_labels_unambiguous_sentences_correctly(artifact, variant):
    engine = OnnxEngine(artifact, variant, "cpu", load_settings(intra_op_threads=1))
    encoder = TextEncoder(artifact.tokenizer_path, artifact.max_length)
    probabilities = softmax(engine.run(*pad_batch(encoder.encode([text for text, _ in CLEAR_CASES]))))
    predicted = [artifact.labels[i] for i in np.argmax(probabilities, axis=1)]
    assert predicted == [label for _, label in CLEAR_CASES]


def test_arena_shrinks_after_an_oversized_batch(artifact):
    """Without shrinkage a 16 x 512 batch pins ~500 MiB of arena; with it, memory goes back (see engine.py)."""
    import psutil

    process = psutil.Process()

    def growth(shrink_tokens: int) -> float:
        engine = OnnxEngine(artifact, "int8", "cpu", load_settings(intra_op_threads=1,
                                                                    arena_shrink_tokens=shrink_tokens))
        ids = np.full((16, 512), 1000, dtype=np.int64)
        engine.run(ids[:1, :8], np.ones_like(ids[:1, :8]))
        before = process.memory_info().rss
        engine.run(ids, np.ones_like(ids))
        grown = (process.memory_info().rss - before) / 2**20
        del engine
        return grown

    assert growth(2048) < 100 < 300 < growth(0)


@pytest.mark.parametrize(("variant", "tolerance"), [("int8", 1e-6), ("fp16", 1e-3)])
def test_each_variant_answers_a_text_the_same_alone_or_batched(artifact, variant, tolerance):
    """A text's answer does not depend on what it is batched with. int8's activation scales are calibrated
    (``models.calibrate``): with scales computed per engine call, 2 % of SST-2 dev labels changed with a
    batch-mate, and these texts beside the long one moved by up to 0.03. fp16 computes each row on its own;
    batching moves it by at most 1e-3 (measured: 0.0004)."""
    assert artifact.manifest["variants"]["int8"]["recipe"]["activations"]["scales"] == "calibrated"
    engine = OnnxEngine(artifact, variant, "cpu", load_settings(intra_op_threads=1))
    encoder = TextEncoder(artifact.tokenizer_path, artifact.max_length)
    texts = [text for text, _ in CLEAR_CASES] + [" ".join(text for text, _ in CLEAR_CASES * 8)]
    batched = softmax(engine.run(*pad_batch(encoder.encode(texts))))
    alone = np.concatenate([softmax(engine.run(*pad_batch(encoder.encode([text])))) for text in texts])
    assert np.abs(batched - alone).max() < tolerance
