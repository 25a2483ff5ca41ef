"""Every model type ``models.export`` accepts builds, matches PyTorch and is served; the others are refused.

Each type is a tiny random checkpoint (``tests/own_model_fixtures.py``) with 3 labels and a small position
table, built with the default maximum length: the model's own positions (RoBERTa-style embeddings reserve
``padding_idx + 1`` of them), which the build's parity check and the server's smoke test both run a text of.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from models.build import build
from models.export import SUPPORTED_MODEL_TYPES, ExportError
from server.config import load_settings
from server.metrics import Metrics
from server.runtime import load_checked
from tests.own_model_fixtures import TINY_CONFIGS, one_torch_thread, save_checkpoint

POSITIONS = 34
LABELS = ("negative", "neutral", "positive")
RESERVED = {"camembert": 1, "mpnet": 2, "roberta": 1, "xlm-roberta": 1, "xlm-roberta-xl": 1}  # padding_idx + 1
_one_torch_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def test_every_supported_type_has_a_tiny_config() -> None:
    assert set(TINY_CONFIGS) == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_type_builds_with_parity_and_serves_its_full_length(model_type: str, tmp_path: Path) -> None:
    checkpoint = save_checkpoint(tmp_path / f"{model_type}-ckpt", model_type, LABELS, positions=POSITIONS)

    manifest = build(checkpoint, tmp_path / "artifact", ("fp32",))

    assert manifest["max_sequence_length"] == POSITIONS - RESERVED.get(model_type, 0)
    assert manifest["labels"] == list(LABELS)
    assert manifest["name"] == f"{model_type}-ckpt"
    parity = manifest["parity"]["fp32"]
    assert parity["max_abs_diff"] <= 1e-4 and parity["argmax_agreement"] == 1.0
    runtime = load_checked(load_settings(device="cpu", intra_op_threads=1), Metrics(), tmp_path / "artifact",
                           warm=False)  # the smoke test runs a text of max_sequence_length tokens
    assert runtime.labels() == list(LABELS)


@pytest.mark.parametrize("model_type, config", [
    ("gpt2", {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}),
    ("funnel", {"d_model": 32, "n_head": 2, "d_head": 16, "d_inner": 64, "block_sizes": [1, 1]}),
])
def test_an_unsupported_type_is_refused_naming_the_supported_ones(model_type: str, config: dict,
                                                                   tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_config(
        AutoConfig.for_model(model_type, vocab_size=100, num_labels=2, pad_token_id=0, **config)
    ).save_pretrained(tmp_path / "ckpt")

    with pytest.raises(ExportError, match=f"model type '{model_type}' is not supported") as refused:
        build(tmp_path / "ckpt", tmp_path / "artifact", ("fp32",))

    assert "distilbert" in str(refused.value) and "roberta" in str(refused.value)
    assert not (tmp_path / "artifact").exists()
