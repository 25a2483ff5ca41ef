"""``server.tokenizer.TextEncoder``: each text tokenized once, offsets only where truncation must be judged."""

from __future__ import annotations

import json

import pytest

from server.artifact import load_artifact
from server.primitives import InputTooLong
from server.tokenizer import TextEncoder


class Counting:
    """Wraps the tokenizer's batch calls and records which texts each call encoded."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        fast, exact = encoder._encode_fast, encoder._tokenizer.encode_batch
        encoder._encode_fast = lambda texts: self._record("fast", fast, texts)
        self._exact = lambda texts: self._record("offsets", exact, texts)

    def _record(self, kind, call, texts):
        self.calls.append((kind, list(texts)))
        return call(texts)


@pytest.fixture
def encoder(tiny_artifact):
    artifact = load_artifact(tiny_artifact)
    return TextEncoder(artifact.tokenizer_path, artifact.max_length)


def counted(encoder: TextEncoder) -> Counting:
    counting = Counting(encoder)
    real = encoder._tokenizer

    class Proxy:  # the Rust tokenizer's methods cannot be replaced on it: stand in front of it
        def encode_batch(self, texts):
            return counting._exact(texts)

        def __getattr__(self, name):
            return getattr(real, name)

    encoder._tokenizer = Proxy()
    return counting


def test_short_texts_are_encoded_once_without_offsets(encoder):
    counting = counted(encoder)
    ids, cut = encoder.encode_marking_truncation(["a fine film", "dull"])
    assert counting.calls == [("fast", ["a fine film", "dull"])]
    assert [len(row) for row in ids] == [len(e.ids) for e in encoder._tokenizer.encode_batch(["a fine film", "dull"])]
    assert cut == [False, False]


def test_a_long_text_is_encoded_once_with_offsets_and_marked_cut(encoder):
    long_text = "wonderful " * (encoder.max_length * 2)
    counting = counted(encoder)
    ids, cut = encoder.encode_marking_truncation(["short", long_text])
    assert sorted(kind for kind, _ in counting.calls) == ["fast", "offsets"]
    assert ("offsets", [long_text]) in counting.calls and ("fast", ["short"]) in counting.calls
    assert len(ids[1]) == encoder.max_length and cut == [False, True]


def test_a_short_text_that_fills_the_maximum_is_judged_with_offsets(encoder):
    """Fewer characters than the maximum but as many tokens (each "!" is a token, plus the two special ones):
    encoded again with offsets, and cut only when a token was dropped."""
    exactly, over = "!" * (encoder.max_length - 2), "!" * (encoder.max_length - 1)
    counting = counted(encoder)
    ids, cut = encoder.encode_marking_truncation([exactly, over])
    assert [len(row) for row in ids] == [encoder.max_length, encoder.max_length]
    assert counting.calls == [("fast", [exactly, over]), ("offsets", [exactly, over])]
    assert cut == [False, True]


def test_strict_mode_encodes_once_and_refuses_by_index(tiny_artifact):
    artifact = load_artifact(tiny_artifact)
    strict = TextEncoder(artifact.tokenizer_path, artifact.max_length, strict=True)
    counting = counted(strict)
    with pytest.raises(InputTooLong, match=r"texts\[1\]"):
        strict.encode_marking_truncation(["fine", "wonderful " * (artifact.max_length * 2)])
    assert [kind for kind, _ in counting.calls] == ["fast"]


def test_the_highest_id_is_read_from_the_vocabulary_whatever_its_layout(tiny_artifact):
    """With no added tokens it raised a TypeError (a legitimate tokenizer refused at start-up), and a word mapped
    past the vocabulary's size went unseen (a red team's reload was then accepted)."""
    original = json.loads((tiny_artifact / "tokenizer.json").read_text())
    assert TextEncoder((tiny_artifact / "tokenizer.json").read_bytes(), 16).highest_id() == \
        len(original["model"]["vocab"]) - 1
    without_added = {**original, "added_tokens": []}
    assert TextEncoder(json.dumps(without_added).encode(), 16).highest_id() == len(original["model"]["vocab"]) - 1
    past_the_size = {**original, "model": {**original["model"], "vocab": {**original["model"]["vocab"], "zap": 40000}}}
    assert TextEncoder(json.dumps(past_the_size).encode(), 16).highest_id() == 40000
