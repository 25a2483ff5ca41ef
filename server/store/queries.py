"""Reading predictions back (admin API): filters, newest first, offset pagination."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select

from server.store.tables import FEEDBACK, PREDICTIONS

MAX_PAGE = 1000


@dataclass(frozen=True)
class PredictionFilter:
    label: str | None = None
    model_version: str | None = None
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive


def list_predictions(engine: Engine, where: PredictionFilter, limit: int = 100, offset: int = 0) -> dict[str, Any]:
    """One page; ``next_offset`` is null on the last page. Rows still queued or spooled are not visible yet."""
    query = _with_feedback()
    if where.label is not None:
        query = query.where(PREDICTIONS.c.label == where.label)
    if where.model_version is not None:
        query = query.where(PREDICTIONS.c.model_version == where.model_version)
    if where.since is not None:
        query = query.where(PREDICTIONS.c.created_at >= where.since)
    if where.until is not None:
        query = query.where(PREDICTIONS.c.created_at < where.until)
    limit = max(1, min(limit, MAX_PAGE))
    query = query.order_by(PREDICTIONS.c.created_at.desc(), PREDICTIONS.c.id.desc()).limit(limit + 1).offset(offset)
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return {"items": [_prediction(row) for row in rows[:limit]], "limit": limit, "offset": offset,
            "next_offset": offset + limit if len(rows) > limit else None}


def get_prediction(engine: Engine, prediction_id: str) -> dict[str, Any] | None:
    with engine.connect() as connection:
        row = connection.execute(_with_feedback().where(PREDICTIONS.c.id == prediction_id)).first()
    return _prediction(row) if row else None


def _with_feedback():
    return select(PREDICTIONS, FEEDBACK.c.label.label("feedback_label")).outerjoin(
        FEEDBACK, FEEDBACK.c.prediction_id == PREDICTIONS.c.id)


def _prediction(row) -> dict[str, Any]:
    values = dict(row._mapping)
    values["created_at"] = values["created_at"].isoformat()
    return values
