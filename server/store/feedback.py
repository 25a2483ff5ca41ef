"""Feedback: the correct label for a stored prediction, exported as training data.

A label is one of the serving model's labels at the time the feedback is given
(``POST /feedback`` checks it against the model in use, so after a reload to a
model with other labels, those are the ones accepted) and is stored and
exported by name: a number would mean a different label for a model whose
labels are in another order or of another count.

The export is what ``models.data.load_labeled`` reads and ``models.finetune``
trains on: a header ``text\tlabel`` and one row per corrected prediction, the
label by name (``POSITIVE``, ``neutral``, ...), read verbatim (no quoting), so
tabs and line breaks inside a text become spaces. (Before named labels the
column held 1 = POSITIVE, 0 = NEGATIVE; ``models.labels`` still reads that.)
Predictions stored without their text (STORE_TEXT=false) cannot be exported
and are counted as skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from sqlalchemy import Engine, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite

from server.store.keys import ApiKey
from server.store.tables import FEEDBACK, PREDICTIONS

_BREAKS = re.compile(r"[\t\r\n]+")


class UnknownPrediction(LookupError):
    """Feedback names a prediction the database does not hold (yet)."""


class NotYourPrediction(UnknownPrediction):
    """Feedback from a key other than the one that made the prediction (an admin key may label any).

    Answered as an unknown prediction, so that a key cannot learn which ids exist, nor overwrite the label on
    another key's prediction whose id it has come by.
    """


class UnknownLabel(ValueError):
    """Feedback gives a label the serving model does not have."""


def add_feedback(engine: Engine, prediction_id: str, label: str, labels: list[str], *,
                 by: ApiKey | None) -> dict[str, Any]:
    """Record (or replace) the correct label of a prediction; ``labels`` are the serving model's.

    ``by`` is the caller's key (None: a keyless caller in AUTH_MODE=open). A prediction made with a key is
    labelled only by that key or an admin key; one made without a key, by whoever holds its id.

    An unknown prediction is reported before a wrong label: whether the id exists is what a client
    retries on (a record is written shortly after its answer), a wrong label never fixes itself.
    """
    values = {"prediction_id": prediction_id, "label": label, "created_at": datetime.now(UTC)}
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    upsert = dialect.insert(FEEDBACK).values(values)
    upsert = upsert.on_conflict_do_update(index_elements=["prediction_id"],
                                          set_={"label": upsert.excluded.label,
                                                "created_at": upsert.excluded.created_at})
    with engine.begin() as connection:
        found = connection.execute(select(PREDICTIONS.c.api_key_id).where(PREDICTIONS.c.id == prediction_id)).first()
        if found is None:
            raise UnknownPrediction(prediction_id)
        owner = found.api_key_id
        if owner is not None and not (by is not None and (by.id == owner or by.allows("admin"))):
            raise NotYourPrediction(prediction_id)
        if label not in labels:
            raise UnknownLabel(label)
        connection.execute(upsert)
    return {**values, "created_at": values["created_at"].isoformat()}


EXPORT_HEADER = "text\tlabel\n"
EXPORT_PAGE_ROWS = 500  # rows read at a time: a page of texts at MAX_TEXT_CHARS is ~10 MB, not the whole table


@dataclass(frozen=True)
class ExportPage:
    """Some of the export's lines, in order, and where the next page starts (None: this was the last)."""

    lines: list[str]
    skipped: int  # rows without text (STORE_TEXT=false)
    after: tuple[datetime, str] | None


def export_page(engine: Engine, after: tuple[datetime, str] | None, rows: int | None = None) -> ExportPage:
    """The TSV lines of up to ``rows`` feedback rows after ``after`` (their order: when given, then prediction id).
    Read a page at a time, so neither the server nor the CLI holds the whole export: ``GET /feedback/export`` built
    it in memory, 779 MiB at its peak for a 203 MB export, outside the memory plan (red team helper-106)."""
    rows = rows or EXPORT_PAGE_ROWS
    query = (select(PREDICTIONS.c.text, FEEDBACK.c.label, FEEDBACK.c.created_at, FEEDBACK.c.prediction_id)
             .join(PREDICTIONS, PREDICTIONS.c.id == FEEDBACK.c.prediction_id)
             .order_by(FEEDBACK.c.created_at, FEEDBACK.c.prediction_id).limit(rows))
    if after is not None:
        query = query.where(tuple_(FEEDBACK.c.created_at, FEEDBACK.c.prediction_id) > tuple_(*after))
    with engine.connect() as connection:
        found = connection.execute(query).all()
    lines = []
    for text, label, _, _ in found:
        clean = _BREAKS.sub(" ", text or "").strip()
        if clean:
            lines.append(f"{clean}\t{label}\n")
    last = (found[-1].created_at, found[-1].prediction_id) if len(found) == rows else None
    return ExportPage(lines, len(found) - len(lines), last)


def export_feedback(engine: Engine, out: TextIO) -> tuple[int, int]:
    """Write the TSV to ``out``; returns (rows written, rows skipped for want of text)."""
    written = skipped = 0
    out.write(EXPORT_HEADER)
    after = None
    while True:
        page = export_page(engine, after)
        out.writelines(page.lines)
        written, skipped = written + len(page.lines), skipped + page.skipped
        if page.after is None:
            return written, skipped
        after = page.after
