"""A prediction record as a row: the spool's line format, and the form a database can hold.

Lines are JSON objects, one per line, encoded with orjson; the rare text orjson refuses (a lone UTF-16
surrogate, which JSON input can carry) falls back to the standard library's escaped form, so encoding a
record the server accepted never fails.

What a database cannot hold is stored in a form it can, rather than refused (``storable``):
- U+0000 in any text (PostgreSQL's text type cannot hold it) and lone surrogates (not UTF-8 at all)
  are replaced by U+FFFD, the Unicode replacement character. ``text_sha256`` stays the hash of the
  original text, so a stored text that differs from what was sent can be recognised.
The spool and ``rejected.jsonl`` keep the original row.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import orjson

from server.primitives import PredictionRecord
from server.store.tables import PREDICTIONS

REPLACEMENT = "\ufffd"
TEXT_FIELDS = ("request_id", "text", "label", "model_name", "model_version", "device", "api_key_id")
OPTIONAL_ABSENT = {column.name: None for column in PREDICTIONS.c if column.nullable and not column.primary_key}


def record_row(record: PredictionRecord, store_text: bool) -> dict[str, Any]:
    """A record as a JSON-ready row (numpy scalars become floats); STORE_TEXT=false drops the text here."""
    return {
        "id": record.id, "created_at": record.created_at.isoformat(), "request_id": record.request_id,
        "text": record.text if store_text else None, "text_sha256": record.text_sha256,
        "label": record.label, "score": float(record.score),
        "probabilities": {str(label): float(p) for label, p in record.probabilities.items()},
        "model_name": record.model_name, "model_version": record.model_version, "device": record.device,
        "latency_ms": float(record.latency_ms), "cached": bool(record.cached), "api_key_id": record.api_key_id,
    }


def encode_lines(rows: list[dict[str, Any]]) -> bytes:
    """The rows as spool lines, each ending in a newline."""
    try:
        return b"".join([orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE) for row in rows])
    except TypeError:  # orjson.JSONEncodeError: a lone surrogate somewhere; escape that row the slow way
        return b"".join([_encode_one(row) for row in rows])


def _encode_one(row: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        return json.dumps(row, separators=(",", ":")).encode() + b"\n"


def decode_line(line: bytes) -> dict[str, Any] | None:
    """A spool line back as a row; None when it is not a JSON object.

    orjson refuses an escaped lone surrogate, which ``_encode_one`` writes for a text holding one: only such a line
    is read again by ``json``, so a damaged line costs one parse (junk lines cost 5 us each through both), and
    ``json``'s recursion limit is caught: a line of 200,000 nested brackets raised ``RecursionError`` from the
    store's writer, which held the database "down" for good (red team helper-61)."""
    try:
        row = orjson.loads(line)
    except orjson.JSONDecodeError:
        if b"\\u" not in line:
            return None
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            return None
    return row if isinstance(row, dict) else None


def storable(row: dict[str, Any], dialect: str) -> dict[str, Any]:
    """The row as the insert takes it: ``created_at`` parsed, texts the database could not hold made holdable,
    an optional column it lacks (a line from a version without ``api_key_id``, a hand edit) as null: rows are
    inserted many at a time in one statement whose columns are the first row's, and a short first row dropped
    those columns' values from every other row of its chunk (their texts, their keys).

    Raises KeyError/TypeError/ValueError for a row that is not a prediction row at all (a damaged line).
    """
    values = {**OPTIONAL_ABSENT, **row, "created_at": datetime.fromisoformat(row["created_at"])}
    for field in TEXT_FIELDS:
        value = values.get(field)
        if isinstance(value, str):
            values[field] = holdable(value, dialect)
    return values


def holdable(text: str, dialect: str) -> str:
    if dialect == "postgresql" and "\x00" in text:
        text = text.replace("\x00", REPLACEMENT)
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = "".join(REPLACEMENT if "\ud800" <= c <= "\udfff" else c for c in text)
    return text
