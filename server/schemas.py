"""HTTP request and response bodies (the contract of DESIGN.md's API table).

Strings that reach the tokenizer, the database or the file system are ``UnicodeText``: JSON may spell a lone
UTF-16 surrogate (``"\\ud800"``) that no UTF-8 encoder, tokenizer or database accepts, so it is refused at the
door with a 422 that names the field and the character, not found later as a 500. Strings the store routes look
up or store are ``StorableText``, which also refuses NUL (PostgreSQL's text cannot hold it).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError


def unicode_scalars_only(value: str) -> str:
    """``value`` unchanged if every code point is a Unicode scalar value (no unpaired surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "unpaired_surrogate",
            f"contains an unpaired surrogate (U+{ord(value[exc.start]):04X}) at character {exc.start}; "
            "send valid Unicode text (a JSON \\uD800-\\uDFFF escape must be half of a pair)",
        ) from None
    return value


def no_nul(value: str) -> str:
    if "\x00" in value:
        raise PydanticCustomError("nul_character", f"contains a NUL character (U+0000) at character "
                                  f"{value.index(chr(0))}, which the database cannot store")
    return value


UnicodeText = Annotated[str, AfterValidator(unicode_scalars_only)]
ClassifiedText = Annotated[str, AfterValidator(unicode_scalars_only),
                           Field(json_schema_extra={"pattern": "\\S"})]  # not blank: the routes refuse that with 422
StorableText = Annotated[str, AfterValidator(unicode_scalars_only), AfterValidator(no_nul),
                         Field(json_schema_extra={"pattern": "^[^\\u0000]*$"})]  # the OpenAPI document says "no NUL"


def not_a_timestamp(value: object) -> object:
    """Refuse the Unix timestamps pydantic would read as a time: the parameter is documented as ISO 8601."""
    try:
        float(str(value))
    except ValueError:
        return value
    raise PydanticCustomError("datetime_format", "is a number; send an ISO 8601 date-time, e.g. 2024-05-01T12:00:00Z")


def in_utc(value: datetime) -> datetime:
    """``value`` in UTC (no offset means UTC). A bound past what a datetime holds in UTC (9999-12-31T23:00-05:00)
    is clamped to the last or first UTC datetime: as a filter bound it selects exactly the same rows."""
    aware = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    try:
        return aware.astimezone(timezone.utc)
    except OverflowError:
        extreme = datetime.max if value.year == datetime.max.year else datetime.min
        return extreme.replace(tzinfo=timezone.utc)


UtcDateTime = Annotated[datetime, BeforeValidator(not_a_timestamp), AfterValidator(in_utc)]


def _predict_request_schema(schema: dict[str, Any]) -> None:
    # What the checks below enforce, said in the schema for generated clients (and schemathesis): exactly one of
    # the two, each only ever its own type (no "default": null), a non-empty list. Size limits are settings
    # (MAX_TEXTS_PER_REQUEST, MAX_TEXT_CHARS, MAX_REQUEST_BYTES) answered with 413, so not in the schema.
    schema["oneOf"] = [{"required": ["text"]}, {"required": ["texts"]}]
    for name in ("text", "texts"):
        schema["properties"][name].pop("default", None)
    schema["properties"]["texts"]["minItems"] = 1
    schema["examples"] = [{"text": "a gripping, funny film"}]


class PredictRequest(BaseModel):
    """Exactly one of ``text`` or ``texts``, each a string that is not blank."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_predict_request_schema)

    text: ClassifiedText = Field(None, description="one text")
    texts: list[ClassifiedText] = Field(None, description="several texts; predictions come back in the same order")

    @model_validator(mode="after")
    def _exactly_one(self) -> PredictRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError('send exactly one of "text" (a string) or "texts" (a list of strings)')
        if self.texts is not None and not self.texts:
            raise ValueError('"texts" must hold at least one string')
        return self

    def items(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class PredictionOut(BaseModel):
    id: str | None = Field(..., description="the stored record's id (for POST /feedback); null when "
                                             "STORE_PREDICTIONS=false")
    label: str
    score: float
    probabilities: dict[str, float]
    cached: bool


class ModelOut(BaseModel):
    name: str
    version: str
    variant: str
    provider: str
    device: str


class PredictResponse(BaseModel):
    predictions: list[PredictionOut]
    model: ModelOut
    request_id: str | None = None


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_path: UnicodeText | None = Field(None, description="artifact directory; default: the configured "
                                                             "MODEL_PATH")


class ErrorResponse(BaseModel):
    """The body of every error the server sends, the web framework's included (see server/http.py)."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(..., description="what went wrong and what to do about it, for a person")
    type: str = Field(..., description="the kind of error, for a program: e.g. invalid_input, invalid_json, "
                                       "too_large, unsupported_media_type, unauthorized, not_found, queue_full, "
                                       "internal_error")
    request_id: str | None = Field(None, description="on 500: the id the server logged the failure under")
    detail: list[dict[str, Any]] | None = Field(None, description="on 422: each problem's location, message "
                                                                  "and type")
