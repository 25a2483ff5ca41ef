"""``server.tokenizer.TextEncoder``: each text tokenized once, offsets only where truncation must be judged."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scripts.benchlib.serverproc import ROOT
from server import tokenizer
from server.artifact import load_artifact
from server.primitives import InputTooLong
from server.tokenizer import TextEncoder, char_groups


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


def test_char_groups_keep_the_order_and_bound_each_group():
    texts = ["a" * 5, "b" * 3, "c" * 4, "d" * 20, "e"]
    groups = char_groups(texts, 8)
    assert groups == [["a" * 5, "b" * 3], ["c" * 4], ["d" * 20], ["e"]]  # a text over the bound goes alone
    assert [text for group in groups for text in group] == texts
    assert char_groups([], 8) == [[]]


@pytest.mark.parametrize("strict", [False, True])
def test_texts_tokenized_in_groups_give_what_one_call_gives(tiny_artifact, monkeypatch, strict):
    artifact = load_artifact(tiny_artifact)
    encoder = TextEncoder(artifact.directory / "tokenizer.json", artifact.max_length, strict=strict)
    texts = ["dull", "a fine film", "!!", "word word", "a"] * 3
    if not strict:  # texts the model's max length cuts too (strict mode refuses them)
        texts += ["a fine film " * 40, "!" * 300, "word " * 200]
    monkeypatch.setattr(tokenizer, "ENCODE_CHARS_AT_ONCE", 10 ** 9)
    expected, cut = encoder.encode_marking_truncation(texts)
    monkeypatch.setattr(tokenizer, "ENCODE_CHARS_AT_ONCE", 12)  # a group per text or two
    ids, truncated = encoder.encode_marking_truncation(texts)
    assert [row.tolist() for row in ids] == [row.tolist() for row in expected] and truncated == cut
    assert strict or any(cut)


PEAK = """
import resource, sys
from server.artifact import load_artifact
from server.config import Settings
from server.tokenizer import TextEncoder
artifact = load_artifact(Settings().model_path)
encoder = TextEncoder(artifact.directory / "tokenizer.json", artifact.max_length)
encoder.encode(["!"])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ids = encoder.encode(["!" * 20_000] * 256)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, len(ids), len(ids[0]))
"""


def test_the_tokenizers_peak_does_not_grow_with_the_request():
    """256 texts of 20,000 "!" (a token per character) took 790 MiB at once: the server was OOM-killed at 480 MiB
    by requests of the default sizes, and at 1 GiB by one with MAX_REQUEST_BYTES raised (red team helper-87).
    In groups of ENCODE_CHARS_AT_ONCE characters: ~45-70 MiB here, the allocator's slack included."""
    done = subprocess.run([sys.executable, "-c", PEAK], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    peak_mib, rows, width = map(int, done.stdout.split())
    assert rows == 256 and width > 100  # cut at the model's max length
    assert peak_mib < 150, peak_mib
