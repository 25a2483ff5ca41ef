"""Which texts a load test sends: labeled texts, a duplicate ratio, a text-length mix.

Each text of a request is, with probability ``duplicate_ratio``, a repeat of a text already sent
in this run (to exercise the server's cache); otherwise the next "fresh" text. Fresh texts come
from a shuffled pass over the file; with a length mix, first a length class is drawn (short /
medium / long: terciles of the file by character length) and the text comes from that class's
own shuffled pass. A run that needs more fresh texts than the file holds starts another pass, so
those texts repeat too: ``Draw.duplicates`` counts every text sent before in the run, whatever
made it repeat, and the report shows the fraction actually achieved.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from models.data import LabeledData

LENGTH_CLASSES = ("short", "medium", "long")


@dataclass(frozen=True)
class Draw:
    texts: list[str]
    labels: list[str | int]  # as the labeled file spells them; matched to the model's by name when scored
    duplicates: int

    def body(self) -> dict:
        """The /predict body: ``{"text"}`` for one text, ``{"texts"}`` for several."""
        return {"text": self.texts[0]} if len(self.texts) == 1 else {"texts": self.texts}


class _Pass:
    """Endless shuffled passes over some indices."""

    def __init__(self, indices: list[int], rng: random.Random) -> None:
        self._indices, self._rng, self._queue = list(indices), rng, []

    def next(self) -> int:
        if not self._queue:
            self._queue = self._indices[:]
            self._rng.shuffle(self._queue)
        return self._queue.pop()


class Workload:
    def __init__(
        self,
        data: LabeledData,
        duplicate_ratio: float = 0.0,
        texts_per_request: int = 1,
        length_mix: tuple[float, float, float] | None = None,
        seed: int = 0,
    ) -> None:
        if not len(data):
            raise ValueError("the labeled file has no texts")
        if not 0.0 <= duplicate_ratio <= 1.0:
            raise ValueError(f"duplicate ratio {duplicate_ratio} is not within [0, 1]")
        if texts_per_request < 1:
            raise ValueError("texts per request must be >= 1")
        self.data, self.duplicate_ratio, self.texts_per_request = data, duplicate_ratio, texts_per_request
        self._rng = random.Random(seed)
        self._sent: list[int] = []
        self._seen: set[int] = set()
        by_length = sorted(range(len(data)), key=lambda i: len(data.texts[i]))
        if length_mix is None:
            self._classes, self._weights = [_Pass(by_length, self._rng)], [1.0]
        else:
            if len(length_mix) != 3 or min(length_mix) < 0 or sum(length_mix) <= 0:
                raise ValueError(f"length mix {length_mix} must be three non-negative weights (short, medium, long)")
            thirds = [by_length[k * len(data) // 3 : (k + 1) * len(data) // 3] for k in range(3)]
            if any(w > 0 and not part for w, part in zip(length_mix, thirds, strict=True)):
                raise ValueError("the labeled file is too small for a length mix (fewer than 3 texts)")
            self._classes, self._weights = [_Pass(part, self._rng) for part in thirds], list(length_mix)

    def _next_index(self) -> int:
        if self._sent and self._rng.random() < self.duplicate_ratio:
            return self._rng.choice(self._sent)
        return self._rng.choices(self._classes, self._weights)[0].next()

    def next(self) -> Draw:
        """The texts (and their labels) of the next request."""
        indices = [self._next_index() for _ in range(self.texts_per_request)]
        duplicates = 0
        for index in indices:
            duplicates += index in self._seen
            self._seen.add(index)
            self._sent.append(index)
        return Draw([self.data.texts[i] for i in indices], [self.data.labels[i] for i in indices], duplicates)
