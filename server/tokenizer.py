"""Tokenization with the artifact's Hugging Face fast tokenizer (``tokenizers``).

Texts are encoded without padding (the batcher pads each batch to its own
longest text) and truncated to the model's maximum length, or refused in
strict mode.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from server.primitives import TEXTS, InputTooLong, TextName

ENCODE_CHARS_AT_ONCE = 65_536  # characters tokenized at once (encode_marking_truncation)
TOKENIZER_PEAK_PER_CHAR = 180  # the tokenizer's memory per character at its worst: a token per character of
# punctuation, its ids, offsets and strings, truncated tokens included (measured 162-180, tokenizers 0.22)


class TextEncoder:
    def __init__(self, tokenizer: Path | bytes, max_length: int, strict: bool = False) -> None:
        """``tokenizer``: a ``tokenizer.json`` file, or its bytes (verified, from the server: ``read_verified``)."""
        self._tokenizer = Tokenizer.from_buffer(tokenizer) if isinstance(tokenizer, bytes) else \
            Tokenizer.from_file(str(tokenizer))
        # Without offsets (tokenizers >= 0.21; ``_encodings`` says when they are needed).
        self._encode_fast = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        self._tokenizer.no_padding()
        self.max_length = max_length
        self.strict = strict
        self._empty_ids = self._tokenizer.encode("").ids  # the template's own tokens ([CLS] [SEP]): no text at all
        self.frame_tokens = len(self._empty_ids)  # what the tokenizer adds to every text
        if strict:
            self._tokenizer.no_truncation()
        else:
            self._tokenizer.enable_truncation(max_length=max_length)

    def highest_id(self) -> int:
        """The largest token id the tokenizer can give, its added tokens' included: read from the vocabulary, whose
        ids need not run from 0 to its size (a red team's mapped one word to 40,000 in a vocabulary of 30,522)."""
        return max(self._tokenizer.get_vocab(with_added_tokens=True).values())

    def reads_nothing(self, text: str) -> bool:
        """Whether the model would see ``text`` as an empty one: its tokenizer drops every character of it (a NUL,
        a zero-width space, a byte-order mark, a lone combining mark or U+FFFD for BERT's). Only a text without a
        letter, digit, punctuation mark or symbol (U+FFFD aside) is tokenized to find out, so the usual text costs
        one character's look."""
        if any(char != "\ufffd" and unicodedata.category(char)[0] in "LNPS" for char in text):
            return False
        return self._tokenizer.encode(text).ids == self._empty_ids

    def encode(self, texts: list[str], name: TextName = TEXTS) -> list[np.ndarray]:
        """Token ids per text (int64, unpadded, special tokens included).

        Strict mode: ``InputTooLong`` names a text by ``name`` of its index in the list given, so pass one
        request's own texts (``Predictor.predict`` does, before any computation shared with other requests).
        """
        return self.encode_marking_truncation(texts, name)[0]

    def encode_marking_truncation(self, texts: list[str], name: TextName = TEXTS) -> tuple[list[np.ndarray],
                                                                                            list[bool]]:
        """``encode`` and, per text, whether it was cut at ``max_length`` (never in strict mode: it refuses).

        The texts are tokenized ``ENCODE_CHARS_AT_ONCE`` characters at a time, each group's encodings let go once
        their ids are read: the tokenizer reads a whole text before cutting it and keeps every token of it, up to
        ``TOKENIZER_PEAK_PER_CHAR`` at its peak. One request of 256 texts
        of 20,000 "!" took 790 MiB at once, past what the memory plan had left, and the server was OOM-killed by
        requests of the size it admits (red team helper-87)."""
        ids: list[np.ndarray] = []
        truncated: list[bool] = []
        for group in char_groups(texts, ENCODE_CHARS_AT_ONCE):
            encodings = self._encodings(group)
            ids += [np.asarray(e.ids, dtype=np.int64) for e in encodings]
            truncated += [False] * len(group) if self.strict else \
                [self._was_cut(text, e) for text, e in zip(group, encodings, strict=True)]
        if self.strict:
            for index, row in enumerate(ids):
                if len(row) > self.max_length:
                    raise InputTooLong(
                        f"{name(index)} has {len(row)} tokens; the model accepts at most {self.max_length} "
                        "(shorten it, or run the server with STRICT_TRUNCATION=false to truncate)"
                    )
        return ids, truncated

    def _encodings(self, texts: list[str]) -> list:
        """One encoding per text, each tokenized once; offsets (``_was_cut`` reads them) only where a text may fill
        ``max_length``. A text of fewer characters than that is encoded without offsets (the same ids, 46 against
        59 us for a short text on this VM, on the event loop); the rare one that still fills it (a few characters
        that make many tokens) is encoded again with them. A longer text is encoded with them at once: the
        tokenizer reads all of it before cutting, so a second pass would cost as much as the first (~6 ms for
        20,000 characters)."""
        if self.strict:  # nothing is cut, so no offsets are read
            return self._encode_fast(texts)
        encodings = [None] * len(texts)
        short = [index for index, text in enumerate(texts) if len(text) < self.max_length]
        for index, encoding in zip(short, self._encode_fast([texts[index] for index in short]), strict=True):
            encodings[index] = encoding
        with_offsets = [index for index, encoding in enumerate(encodings)
                        if encoding is None or len(encoding.ids) >= self.max_length]
        if with_offsets:
            exact = self._tokenizer.encode_batch([texts[index] for index in with_offsets])
            for index, encoding in zip(with_offsets, exact, strict=True):
                encodings[index] = encoding
        return encodings

    def _was_cut(self, text: str, encoding) -> bool:
        """Whether truncation dropped tokens, without materializing them all (``overflowing`` builds an encoding per
        ``max_length`` tokens dropped: ~30% more tokenizer time on a 20,000-character text). A text left at fewer
        tokens was not cut; one whose unread rest holds a letter or digit was (each makes a token, if only [UNK]);
        otherwise ``overflowing`` decides."""
        if len(encoding.ids) < self.max_length:
            return False
        read = max((end for start, end in encoding.offsets if end > start), default=0)
        return any(char.isalnum() for char in text[read:]) or bool(encoding.overflowing)


def char_groups(texts: list[str], chars: int) -> list[list[str]]:
    """``texts`` in order, in groups of at most ``chars`` characters (a longer text alone)."""
    groups: list[list[str]] = [[]]
    held = 0
    for text in texts:
        if groups[-1] and held + len(text) > chars:
            groups.append([])
            held = 0
        groups[-1].append(text)
        held += len(text)
    return groups


def pad_batch(rows: list[np.ndarray], pad_id: int = 0, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) padded on the right to ``width`` (default: the longest row's)."""
    width = width or max(len(r) for r in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = row
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask
