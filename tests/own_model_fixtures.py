"""Tiny random-weight checkpoints of any supported type and labels, as a user's ``save_pretrained`` writes them.

Every checkpoint uses the real MiniLM uncased WordPiece tokenizer (``models.minilm``), whatever its type: the
tokenizer is independent of the architecture as far as export and serving go, and it needs no download. The
models are 2 layers, 32 wide, so building one takes seconds; their predictions are arbitrary but seeded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

_BERTISH = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
# Keyword arguments of each supported type's config; the position table size is added by ``save_checkpoint``.
TINY_CONFIGS: dict[str, dict] = {
    "albert": {**_BERTISH, "embedding_size": 16},
    "bert": _BERTISH,
    "camembert": _BERTISH,
    "convbert": _BERTISH,
    "deberta": _BERTISH,
    "deberta-v2": _BERTISH,
    "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64},
    "electra": {**_BERTISH, "embedding_size": 16},
    "ernie": _BERTISH,
    "megatron-bert": _BERTISH,
    "mobilebert": {**_BERTISH, "embedding_size": 16, "intra_bottleneck_size": 32, "true_hidden_size": 32},
    "modernbert": {**_BERTISH, "global_attn_every_n_layers": 1, "local_attention": 16},
    "mpnet": _BERTISH,
    "roberta": _BERTISH,
    "roformer": {**_BERTISH, "embedding_size": 32},
    "squeezebert": {**_BERTISH, "embedding_size": 32},
    "xlm-roberta": _BERTISH,
    "xlm-roberta-xl": _BERTISH,
}


def save_checkpoint(directory: Path, model_type: str = "distilbert",
                    labels: Sequence[str] | int = ("NEGATIVE", "POSITIVE"), positions: int = 128, seed: int = 0,
                    with_tokenizer: bool = True) -> Path:
    """A tiny ``<Type>ForSequenceClassification`` checkpoint in ``directory``.

    ``labels``: names in logit order, or a count (saved as Hugging Face's unnamed ``LABEL_<i>``).
    ``with_tokenizer`` False writes what ``model.save_pretrained`` alone writes.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from models.minilm import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    named = {} if isinstance(labels, int) else {"id2label": dict(enumerate(labels)),
                                                "label2id": {label: i for i, label in enumerate(labels)}}
    config = AutoConfig.for_model(model_type, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id,
                                  max_position_embeddings=positions,
                                  num_labels=labels if isinstance(labels, int) else len(labels),
                                  **named, **TINY_CONFIGS[model_type])
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    if with_tokenizer:
        tokenizer.save_pretrained(directory)
    return Path(directory)


def one_torch_thread():
    """Run PyTorch on one thread, then restore: on a busy 2-core machine two threads made a tiny model's parity
    check 8x slower (each op waits for a descheduled sibling thread)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
