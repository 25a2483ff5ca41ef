"""HTTP request and response bodies (the contract of DESIGN.md's API table).

Strings that reach the tokenizer, the database or the file system are ``UnicodeText``: JSON may spell a lone
UTF-16 surrogate (``"\\ud800"``) that no UTF-8 encoder, tokenizer or database accepts, so it is refused at the
door with a 422 that names the field and the character, not found later as a 500. Strings the store routes look
up or store are ``StorableText``, which also refuses NUL (PostgreSQL's text cannot hold it).
"""

from __future__ import annotations

from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from server.primitives import TextName, alone, in_list, too_many_texts


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


max_texts_var: ContextVar[int | None] = ContextVar("max_texts", default=None)
"""MAX_TEXTS_PER_REQUEST for the request whose body is being read (set by ``server.http.ObservedASGI``): a list of
texts longer than that is refused (413) before any item is read. Unset (None): every item is read."""

UnicodeText = Annotated[str, AfterValidator(unicode_scalars_only)]
ClassifiedText = Annotated[str, AfterValidator(unicode_scalars_only),
                           Field(json_schema_extra={"pattern": "\\S"})]  # not blank: the routes refuse that with 422


def at_most_max_texts(value: object) -> object:
    """A list of texts past ``max_texts_var`` is refused whole (413) before its items are validated: 300,000 items
    that are not strings made 300,000 errors, 1.2 s of the event loop and a 41 MB answer."""
    limit = max_texts_var.get()
    if limit is not None and isinstance(value, list) and len(value) > limit:
        raise too_many_texts(len(value), limit)  # not a ValueError: pydantic lets it through, answered as it is
    return value


StorableText = Annotated[str, AfterValidator(unicode_scalars_only), AfterValidator(no_nul),
                         Field(json_schema_extra={"pattern": "^[^\\u0000]*$"})]  # the OpenAPI document says "no NUL"
Texts = Annotated[list[ClassifiedText], BeforeValidator(at_most_max_texts)]


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
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        return aware.astimezone(UTC)
    except OverflowError:
        extreme = datetime.max if value.year == datetime.max.year else datetime.min
        return extreme.replace(tzinfo=UTC)


UtcDateTime = Annotated[datetime, BeforeValidator(not_a_timestamp), AfterValidator(in_utc)]


# ------------------------------------------------- Hugging Face / TEI bodies (server/protocols/tei.py)

TEXT_SCHEMA = {"type": "string", "pattern": "\\S"}
AT = "at"  # an error's context key: the index, inside the field, of the text at fault (``server.http.error_place``)
PAIR_HINT = "this model classifies single texts, not pairs: to classify several texts send a batch, [[\"a\"], [\"b\"]]"


def tei_inputs(value: object) -> str | list[str] | list[list[str]]:
    """TEI's ``inputs`` grammar: a string or ``[string]`` is one text, ``[string, string]`` one *pair* of texts,
    ``[[string], [string, string], ...]`` a batch. This model takes no pairs, so a pair is refused with the way to
    send a batch instead; ``["a", "b"]`` meant as two texts is the usual mistake."""
    if isinstance(value, str):
        return unicode_scalars_only(value)
    if not isinstance(value, list) or not value:
        raise PydanticCustomError("tei_inputs", "must be a string, or a batch of one-text lists [[\"a\"], [\"b\"]]")
    if all(isinstance(item, str) for item in value):
        if len(value) == 2:
            raise PydanticCustomError("text_pair", f"a list of two strings is one pair of texts in TEI, not two "
                                      f"texts; {PAIR_HINT}")
        if len(value) > 2:
            raise PydanticCustomError("tei_inputs", f"a list of {len(value)} strings is not TEI input (one string is a "
                                      f"text, two are a pair); {PAIR_HINT}")
        return [_batch_text(value[0], 0)]
    at_most_max_texts(value)
    for index, item in enumerate(value):
        if not isinstance(item, list) or not item or not all(isinstance(text, str) for text in item):
            raise PydanticCustomError("tei_inputs", "is not a list of one string; a batch is [[\"a\"], [\"b\"]]",
                                      {AT: index})
        if len(item) > 1:
            held = "a pair in TEI" if len(item) == 2 else "TEI takes one text or a pair"
            raise PydanticCustomError("text_pair", f"holds {len(item)} strings ({held}); {PAIR_HINT}", {AT: index})
        _batch_text(item[0], index)
    return value


def _batch_text(text: str, index: int) -> str:
    try:
        return unicode_scalars_only(text)
    except PydanticCustomError as exc:
        raise PydanticCustomError(exc.type, exc.message(), {AT: index}) from None


TeiInputs = Annotated[str | list[str] | list[list[str]], PlainValidator(tei_inputs), WithJsonSchema({
    "description": "Hugging Face / TEI input: one text (a string, or a list of one string), or a batch of "
                   "one-text lists. A list of two strings is a text pair in TEI, which this model does not take.",
    "oneOf": [
        {**TEXT_SCHEMA, "description": "one text"},
        {"type": "array", "items": TEXT_SCHEMA, "minItems": 1, "maxItems": 1, "description": "one text"},
        {"type": "array", "minItems": 1, "description": "a batch; answered in the same order",
         "items": {"type": "array", "items": TEXT_SCHEMA, "minItems": 1, "maxItems": 1}},
    ],
})]


def _softmax_only(raw_scores: bool) -> bool:
    if raw_scores:
        raise PydanticCustomError("unsupported", "true is not supported: this server computes softmax probabilities "
                                  "and keeps no logits; omit raw_scores or send false")
    return raw_scores


RawScores = Annotated[StrictBool, AfterValidator(_softmax_only), WithJsonSchema(
    {"type": "boolean", "enum": [False], "default": False,
     "description": "only false: the scores are softmax probabilities (the logits are not kept)"})]


Truncate = Annotated[StrictBool | None, Field(
    description="false: refuse (422) a text longer than the model's max_input_length (GET /info) instead of "
                "truncating it; null: the server's setting (truncate unless STRICT_TRUNCATION=true)")]
TruncationDirection = Annotated[Literal["right", "left", "Right", "Left"], Field(
    description="the server keeps a long text's first tokens (right); left is accepted only for texts that need no "
                "truncation, and refused (422) for one that would")]
TEI_OPTIONS = ("truncate", "truncation_direction", "raw_scores")  # TEI's options for "inputs"


def _predict_request_schema(schema: dict[str, Any]) -> None:
    # What the checks below enforce, said in the schema for generated clients (and schemathesis): exactly one of
    # the three, each only ever its own type (no "default": null), a non-empty list, TEI's options only with
    # "inputs". Size limits are settings (MAX_TEXTS_PER_REQUEST, MAX_TEXT_CHARS, MAX_REQUEST_BYTES) answered with
    # 413, so not in the schema.
    absent = {name: False for name in ("text", "texts", "inputs", *TEI_OPTIONS)}  # JSON Schema: false = not there
    allowed = {"text": ["text"], "texts": ["texts"], "inputs": ["inputs", *TEI_OPTIONS]}
    schema["oneOf"] = [{"required": [name], "properties": {k: v for k, v in absent.items() if k not in fields}}
                       for name, fields in allowed.items()]
    for name in ("text", "texts", "inputs"):
        schema["properties"][name].pop("default", None)
    schema["properties"]["texts"]["minItems"] = 1
    schema["examples"] = [{"text": "a gripping, funny film"}, {"inputs": "a gripping, funny film"}]


ERRORS_SHOWN = 20  # validation errors a 422 names, at most (server.http)


class ClosedBody(BaseModel):
    """A request body that takes only its own fields: an unknown one is a 422 (a misspelt field is not silently
    dropped). More unknown fields than a 422 names are one error, not one each: a 750 KB body of 60,000 unknown
    keys made as many errors, whose conversion by pydantic and the framework held the event loop 0.25-0.4 s per
    request, so that four such clients at once kept ``/ready`` waiting 0.3-0.8 s."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _few_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(data) > ERRORS_SHOWN:  # fewer keys cannot hold more unknown ones
            fields = cls.model_fields
            unknown = [key for key in data if key not in fields]
            if len(unknown) > ERRORS_SHOWN:
                context = {"count": len(unknown), "named": ", ".join(repr(key)[:40] for key in unknown[:ERRORS_SHOWN]),
                           "fields": ", ".join(fields)}
                raise PydanticCustomError("extra_forbidden",
                                          "{count} fields this body does not take ({named}, ...): send only {fields}",
                                          context)
        return data


class PredictRequest(ClosedBody):
    """Exactly one of ``text`` or ``texts``, each a string that is not blank, or TEI's ``inputs`` with its options
    (answered in TEI's shape by server/protocols/tei.py)."""

    model_config = ConfigDict(json_schema_extra=_predict_request_schema)

    text: ClassifiedText = Field(None, description="one text")
    texts: Texts = Field(None, description="several texts; predictions come back in the same order")
    inputs: TeiInputs = Field(None, description="Text Embeddings Inference's body instead: answered [{label, score}, "
                                                "...] (every label, best first), a batch [[...], ...]")
    truncate: Truncate = None
    truncation_direction: TruncationDirection = "right"
    raw_scores: RawScores = False

    @model_validator(mode="after")
    def _exactly_one(self) -> PredictRequest:
        if sum(given is not None for given in (self.text, self.texts, self.inputs)) != 1:
            raise ValueError('send exactly one of "text" (a string) or "texts" (a list of strings), or "inputs" '
                             '(the Hugging Face / TEI body)')
        if self.texts is not None and not self.texts:
            raise ValueError('"texts" must hold at least one string')
        misplaced = sorted(self.model_fields_set & set(TEI_OPTIONS)) if self.inputs is None else []
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)}: TEI's options are taken only with \"inputs\" (the TEI body), "
                             'not with "text" or "texts"')
        return self

    def items(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])

    def text_name(self) -> TextName:
        """How errors name a text: ``text`` or ``texts[i]``, as this body sent it."""
        return alone("text") if self.text is not None else in_list("texts")


class PredictionOut(BaseModel):
    id: str | None = Field(..., description="the stored record's id (for POST /feedback); null when "
                                             "STORE_PREDICTIONS=false")
    label: str
    score: float
    probabilities: dict[str, float]
    cached: bool
    truncated: bool = Field(False, description="the text was longer than the model's max_sequence_length and only "
                                               "its beginning was classified")


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


def a_path(value: str) -> str:
    """An empty (or blank) ``model_path`` names no artifact (it once reloaded MODEL_PATH silently); pydantic's own
    words for it were "at least 1 character", which does not say what to send."""
    if not value.strip():
        raise PydanticCustomError("empty_path", "is empty, which names no artifact: give the artifact's directory, "
                                  "or leave model_path out (or null) to reload the configured MODEL_PATH")
    if "\x00" in value:  # no path holds one: it was a 409 "embedded null byte", and a raw NUL in the text log
        raise PydanticCustomError("nul_character", "contains a NUL character (U+0000), which no path holds")
    return value


class ReloadRequest(ClosedBody):
    model_path: Annotated[UnicodeText, AfterValidator(a_path)] | None = Field(
        None, json_schema_extra={"minLength": 1},
        description="artifact directory; default (absent or null): the configured MODEL_PATH")


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
