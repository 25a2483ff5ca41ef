"""Benchmark inputs: real sentences tokenized with the artifact's tokenizer, padded or truncated to a length."""

from __future__ import annotations

from itertools import cycle, islice
from pathlib import Path

import numpy as np

from server.tokenizer import TextEncoder, pad_batch


def fixed_length_batch(tokenizer_file: Path, texts: list[str], batch_size: int, seq_len: int):
    """(input_ids, attention_mask) of shape [batch_size, seq_len] from the first texts (cycled if too few).

    Longer texts are truncated (special tokens kept), shorter ones padded, so every row is ``seq_len``
    wide and the attention mask marks the real tokens.
    """
    chosen = list(islice(cycle(texts), batch_size))
    ids, mask = pad_batch(TextEncoder(tokenizer_file, seq_len).encode(chosen))
    extra = seq_len - ids.shape[1]
    return np.pad(ids, ((0, 0), (0, extra))), np.pad(mask, ((0, 0), (0, extra)))
