"""The MiniLM BERT -> DistilBERT weight mapping reproduces the BERT encoder exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, BertModel

from models.minilm import distilbert_encoder_from_bert, hidden_state_max_diff, map_bert_state_dict, minilm_dir

SENTENCES = [
    "a gorgeous , witty , seductive movie .",
    "bad",
    "the plot is nothing but boilerplate clichés from start to finish , and the script assumes the audience "
    "is too stupid to realize it has seen this movie a hundred times .",
]


@pytest.fixture(scope="module")
def bert() -> BertModel:
    return BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Texts of very different lengths, so padding and the attention mask are exercised."""
    encoded = AutoTokenizer.from_pretrained(str(minilm_dir()))(SENTENCES, padding=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def test_mapped_distilbert_hidden_states_equal_bert(bert, batch):
    diff = hidden_state_max_diff(bert, distilbert_encoder_from_bert(bert), *batch)
    print(f"MiniLM BERT vs mapped DistilBERT: max |hidden state difference| = {diff:.3g}")
    assert diff < 1e-4


def test_difference_exposes_a_wrong_mapping(bert, batch):
    """Without folding the token-type embedding into positions the encoders disagree: the check has teeth."""
    encoder = distilbert_encoder_from_bert(bert)
    state = map_bert_state_dict(bert)
    state["embeddings.position_embeddings.weight"] = bert.state_dict()["embeddings.position_embeddings.weight"]
    encoder.load_state_dict(state, strict=False)
    assert hidden_state_max_diff(bert, encoder, *batch) > 1e-2
