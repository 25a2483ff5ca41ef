"""Labeled text files (TSV or CSV with a ``text`` and a ``label`` column).

A label is kept as the file spells it (``1``, ``positive``, ``LABEL_2``): what it
means for a given model is decided by ``models.labels``, which matches it to
the model's label names, never to an output position alone.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LabeledData:
    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def load_labeled(path: str | Path, limit: int | None = None) -> LabeledData:
    """Read ``text``/``label`` rows; the delimiter follows the extension (.tsv or .csv).

    SST-2 text contains quotes that are not CSV quoting, so TSV is read verbatim.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labeled file not found: {path}")
    tsv = path.suffix.lower() in {".tsv", ".tab"}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(
            handle,
            delimiter="\t" if tsv else ",",
            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
        )
        missing = {"text", "label"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; header must name text and label")
        texts: list[str] = []
        labels: list[str] = []
        for line_no, row in enumerate(reader, start=2):
            label = (row["label"] or "").strip()
            if not label:
                raise ValueError(f"{path}:{line_no}: the label is empty")
            labels.append(label)
            texts.append((row["text"] or "").strip())
            if limit is not None and len(texts) >= limit:
                break
    return LabeledData(texts, labels)
