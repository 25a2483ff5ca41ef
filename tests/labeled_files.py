"""Labeled text files for tests, in the format ``models.data.load_labeled`` reads."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def write_labeled(path: Path, rows: Iterable[tuple[str, int]]) -> Path:
    """Write ``(text, label)`` rows as a TSV with a ``text``/``label`` header; returns ``path``."""
    path.write_text("text\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows))
    return path
