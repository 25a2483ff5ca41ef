"""argparse types for comma-separated lists."""

from __future__ import annotations

import argparse


def _positive_list(kind, name: str):
    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {name}") from None
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: give one or more positive {name}, comma-separated")
        return values

    return parse


positive_ints = _positive_list(int, "integers")
positive_floats = _positive_list(float, "numbers")


def names(text: str) -> list[str]:
    """A comma-separated list of names (whitespace stripped, empties dropped)."""
    return [part.strip() for part in text.split(",") if part.strip()]
