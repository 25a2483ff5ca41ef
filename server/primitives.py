"""Small types that cross layers (HTTP, batcher, engine, cache, store)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime


def new_id() -> str:
    """128 random bits as 32 hex digits: a record's or a request's id. Unguessable (``POST /feedback`` names a
    prediction by its id); the shape of ``uuid4().hex`` without building a UUID object (0.3 against 1.7 us, two
    per request on the event loop)."""
    return os.urandom(16).hex()


REQUEST_ID_CHARS = 128
_NOT_IN_REQUEST_IDS = frozenset(" []")


def request_id_from(sent: str) -> str:
    """The client's ``X-Request-ID`` when a log line can hold it as it is (at most 128 visible ASCII characters
    and no brackets: the text log writes it as ``[id]``, and ``]`` or Latin-1 let a client forge a line's
    start), else a new id."""
    if 0 < len(sent) <= REQUEST_ID_CHARS and sent.isascii() and sent.isprintable() \
            and _NOT_IN_REQUEST_IDS.isdisjoint(sent):
        return sent
    return new_id()


@dataclass(frozen=True)
class Prediction:
    """One text's result: the top label, its probability, and every label's probability.

    ``truncated``: the text was longer than the model's max_sequence_length and only its first tokens were read.
    """

    label: str
    score: float
    probabilities: dict[str, float]
    cached: bool = False
    truncated: bool = False


@dataclass
class StageTimings:
    """Where one request's time went, in seconds, for what it computed itself (TEI's timing headers).

    Filled along the request path: ``tokenization`` by the predictor, ``queue`` and ``inference`` by the batcher
    (``queue``: from submission until its first batch started on an engine worker, the hand-off included;
    ``inference``: from that start until its last batch's engine call returned, measured on the worker),
    ``compute_tokens``: the tokens it sent to the engine, special tokens included. Texts answered from the cache
    or by another request's computation in flight add nothing, so a request answered wholly so reports zeros.
    """

    tokenization: float = 0.0
    queue: float = 0.0
    inference: float = 0.0
    compute_tokens: int = 0


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    version: str
    variant: str
    provider: str
    device: str


@dataclass
class PredictionRecord:
    """A prediction as the store keeps it. ``id`` is generated here so inserts are idempotent."""

    request_id: str
    text: str | None
    text_sha256: str
    label: str
    score: float
    probabilities: dict[str, float]
    model_name: str
    model_version: str
    device: str
    latency_ms: float
    cached: bool
    api_key_id: str | None = None
    id: str = field(default_factory=new_id)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class ServerError(Exception):
    """An error with an HTTP status and a message a person can act on."""

    status_code = 500
    error_type: str | None = None  # the body's "type"; None: the status's (server/http.py STATUS_TYPES)
    retry_after: float | None = None
    headers: dict[str, str] | None = None  # extra response headers the status calls for
    logged_where_raised = False  # a 5xx whose cause is logged (throttled) where it is raised, not per request

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retry_after is not None:
            self.retry_after = retry_after

    @property
    def logged_per_request(self) -> bool:
        """Whether answering it logs an ERROR: a 5xx that is not shedding (no Retry-After) and whose cause was not
        logged where it was raised. Every protocol asks here (gRPC once kept a copy of this test that missed the
        last part, and logged every such call)."""
        return self.status_code >= 500 and self.retry_after is None and not self.logged_where_raised


class PayloadTooLarge(ServerError):
    status_code = 413


TextName = Callable[[int], str]  # how an error names a request's i-th text, spelled as the client's body spells it


def in_list(field: str) -> TextName:
    """``field[i]``: texts sent as a list (``texts``, TEI's ``inputs``, KServe's ``instances``, OIP's ``text``)."""
    return lambda index: f"{field}[{index}]"


def alone(field: str) -> TextName:
    """``field``: one text sent on its own (``text``, TEI's ``inputs`` as a string)."""
    return lambda index: field


TEXTS = in_list("texts")


def too_many_texts(count: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{count} texts in one request; at most {limit} (MAX_TEXTS_PER_REQUEST): split the request")


class Overloaded(ServerError):
    """The queue is full: shed with 503 and Retry-After."""

    status_code = 503
    error_type = "queue_full"
    retry_after = 1.0


class DeadlineExceeded(ServerError):
    """A request waited past its deadline; answered with 503 and Retry-After."""

    status_code = 503
    error_type = "deadline"
    retry_after = 1.0


class Draining(ServerError):
    """The server is shutting down and accepts no new work."""

    status_code = 503
    error_type = "draining"
    retry_after = 5.0


class EngineStuck(ServerError):
    """Every engine worker has been on one batch past REQUEST_TIMEOUT_S: not ready (``Services.not_ready``)."""

    status_code = 503
    error_type = "engine_stuck"
    retry_after = 5.0


class KeysUnknown(ServerError):
    """AUTH_MODE=required, and no API key has been read yet, from the database or a snapshot: every prediction would
    be refused 503 (``Services.not_ready``)."""

    status_code = 503
    error_type = "keys_unknown"
    retry_after = 5.0


class InferenceFailed(ServerError):
    """The engine failed in a way the server could not recover from."""

    status_code = 503
    error_type = "inference_failed"
    retry_after = 1.0


class OutOfMemory(InferenceFailed):
    """Memory ran out for a text even on its own, or the CPU fallback after a GPU's failed (``server.oom``): a 503 with
    Retry-After, never blamed on the input (``InputFailed``): memory frees up, and under host memory pressure every
    real batch failed while a one-token canary still ran."""


class InputFailed(InferenceFailed):
    """The engine failed on one request's texts twice, in their batch and run again on their own, while it ran a
    one-token canary (``Batcher._per_request``): the input is at fault (an id the model cannot embed), and sending it
    again fails again. A 500 without Retry-After, which invited the client to retry; the batcher logs it
    (throttled), not each request."""

    status_code = 500
    retry_after = None
    logged_where_raised = True


class ModelOutputInvalid(ServerError):
    """The model gave NaN or infinite scores for a text (fp16 overflow, damaged weights): no answer to give, and
    retrying the same text gets the same. A 500, counted as an inference error, never cached or recorded."""

    status_code = 500
    error_type = "model_output_invalid"
    logged_where_raised = True


class InputTooLong(ServerError):
    """Strict truncation mode: a text is longer than the model accepts."""

    status_code = 422
    error_type = "input_too_long"
