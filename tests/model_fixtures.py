"""A tiny but real model artifact for tests, built by the production pipeline.

The model is a randomly initialised two-layer, 32-wide DistilBERT classifier
with the real MiniLM uncased vocabulary and tokenizer, so texts tokenize as
they do in production while export, quantization and the manifest are the
code that builds the shipped artifact. Its predictions are arbitrary but
deterministic (seeded).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

TINY_MAX_LENGTH = 128


def save_tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    """Write a tiny random-init DistilBertForSequenceClassification checkpoint (model + tokenizer)."""
    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    from models.minilm import LABELS, minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    config = DistilBertConfig(
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=TINY_MAX_LENGTH,
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=64,
        pad_token_id=tokenizer.pad_token_id,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    torch.manual_seed(seed)
    model = DistilBertForSequenceClassification(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_tiny_artifact(out_dir: Path, variants: Sequence[str] = ("fp32", "int8")) -> Path:
    """Build the tiny artifact into ``out_dir`` (replaced) with ``variants`` shipped; returns ``out_dir``."""
    from models.build import build

    with tempfile.TemporaryDirectory() as tmp:
        build(save_tiny_checkpoint(Path(tmp)), Path(out_dir), variants, max_length=TINY_MAX_LENGTH, name="tiny-test")
    return Path(out_dir)
