"""Match the labels of a labeled file to a model's labels, by name, never by position alone.

A labeled file says ``label`` per text; a model has label names in logit order
(``manifest.json`` ``labels``, ``config.id2label``). Comparing a file's ``1`` with
output position 1 scores a 3-label negative/neutral/positive model 0% on SST-2
(position 1 is "neutral"), so every value is matched to a model label *name*:

1. an explicit ``--label-map`` entry (``0=negative,1=positive``), when given, and
   only those: a value the map does not name is refused;
2. the same name, ignoring case (``positive`` matches ``POSITIVE``);
3. an integer ``i`` matches a model label spelled ``LABEL_i`` (Hugging Face's
   name for an unnamed position: the name says the position);
4. the binary-sentiment convention of SST-2, IMDB and this project's data:
   ``0`` is the label named negative (or neg), ``1`` the one named positive (or pos).

A value none of these match is refused with ``LabelMismatch``, whose message lists
the file's unmatched values and the model's labels and shows a ``--label-map`` to
pass. A file may use fewer labels than the model has (SST-2 on a 3-label model:
the model can still predict "neutral", which is then an error).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

NEGATIVE_NAMES = ("negative", "neg")
POSITIVE_NAMES = ("positive", "pos")
_LABEL_I = re.compile(r"label_(\d+)")


class LabelMismatch(LookupError):
    """A labeled file's labels cannot be matched to the model's; the message says how to fix it.

    A ``LookupError``, not a ``ValueError``: the load generator treats ``ValueError`` from a response as a
    malformed answer, and a label mismatch is the operator's to fix, not the server's.
    """


def parse_label_map(text: str | None) -> dict[str, str] | None:
    """``"0=negative,1=positive"`` -> ``{"0": "negative", "1": "positive"}``; None or empty -> None."""
    if not text:
        return None
    mapping: dict[str, str] = {}
    for pair in text.split(","):
        value, sep, label = pair.partition("=")
        if not sep or not value.strip() or not label.strip():
            raise ValueError(f"label map entry {pair!r} is not FILE_LABEL=MODEL_LABEL (e.g. 0=negative,1=positive)")
        if value.strip() in mapping:
            raise ValueError(f"label map names file label {value.strip()!r} twice")
        mapping[value.strip()] = label.strip()
    return mapping


def model_label_for(value: str, model_labels: Sequence[str], label_map: dict[str, str] | None = None) -> str | None:
    """The model label ``value`` (a file's label) stands for, or None (rules in the module docstring)."""
    value = str(value).strip()
    if label_map is not None:
        wanted = label_map.get(value)
        return next((label for label in model_labels if wanted is not None and label == wanted), None)
    by_name = {label.casefold(): label for label in model_labels}
    if value.casefold() in by_name:
        return by_name[value.casefold()]
    if value.isdigit():
        for label in model_labels:
            match = _LABEL_I.fullmatch(label.casefold())
            if match and int(match.group(1)) == int(value):
                return label
        names = {"0": NEGATIVE_NAMES, "1": POSITIVE_NAMES}.get(value, ())
        return next((by_name[name] for name in names if name in by_name), None)
    return None


def resolve_labels(values: Iterable[str], model_labels: Sequence[str],
                   label_map: dict[str, str] | None = None) -> dict[str, str]:
    """``{file label: model label}`` for every distinct value; ``LabelMismatch`` if any cannot be matched."""
    model_labels = list(model_labels)
    if label_map is not None:
        unknown = sorted(set(label_map.values()) - set(model_labels))
        if unknown:
            raise LabelMismatch(f"--label-map names {unknown}, which the model does not have; its labels are "
                                f"{model_labels}")
    distinct = sorted({str(v).strip() for v in values}, key=_natural)
    mapping = {value: model_label_for(value, model_labels, label_map) for value in distinct}
    unmatched = [value for value, label in mapping.items() if label is None]
    if unmatched:
        raise LabelMismatch(
            f"the labeled file's label(s) {unmatched} do not match the model's labels {model_labels} "
            f"{'in --label-map' if label_map is not None else 'by name'}; say which is which with "
            f"--label-map {suggested_map(distinct, model_labels)}"
        )
    return mapping  # type: ignore[return-value]  # every value matched


def label_positions(values: Sequence[str], model_labels: Sequence[str],
                    label_map: dict[str, str] | None = None) -> list[int]:
    """Each value's model label as its logit position (for accuracy and training targets)."""
    mapping = resolve_labels(values, model_labels, label_map)
    position = {label: i for i, label in enumerate(model_labels)}
    return [position[mapping[str(v).strip()]] for v in values]


def suggested_map(values: Sequence[str], model_labels: Sequence[str]) -> str:
    """An example ``--label-map`` pairing the file's values with the model's labels in order (to be checked)."""
    return ",".join(f"{value}={label}" for value, label in zip(values, model_labels, strict=False))


def _natural(value: str) -> tuple[int, int | str]:
    return (0, int(value)) if value.isdigit() else (1, value)
