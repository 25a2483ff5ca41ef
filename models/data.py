"""Labeled text files (TSV or CSV with a ``text`` and a ``label`` column)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LabeledData:
    texts: list[str]
    labels: list[int]

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
        labels: list[int] = []
        for line_no, row in enumerate(reader, start=2):
            try:
                labels.append(int(row["label"]))
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line_no}: label {row['label']!r} is not an integer") from None
            texts.append(row["text"].strip())
            if limit is not None and len(texts) >= limit:
                break
    return LabeledData(texts, labels)
