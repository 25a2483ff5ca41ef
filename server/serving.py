"""Classifying a request's texts, whatever protocol it came in by: admission, prediction, durable records.

Every protocol adapter (the native ``/predict``, Hugging Face / TEI, Open Inference
Protocol v2 over HTTP and gRPC, KServe v1) calls ``classify``, so the limits, draining,
deadlines, cache, metrics and the store behave the same for all of them. Errors are
``ServerError`` subclasses carrying their HTTP status, ``Retry-After`` and ``error_type``;
each adapter turns them into its protocol's error shape.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from server.config import Settings
from server.predictor import normalize
from server.primitives import (
    TEXTS,
    Draining,
    ModelIdentity,
    PayloadTooLarge,
    Prediction,
    ServerError,
    StageTimings,
    TextName,
    too_many_texts,
)
from server.records import RecordContext, RecordKeys, WorkerRecords, prediction_records
from server.runtime import ModelRuntime
from server.services import Services
from server.store import RecordsTooLarge, SpoolUnavailable


class EmptyText(ServerError):
    status_code = 422


class UnpairedSurrogate(ServerError):
    """A text no UTF-8 encoder, tokenizer or database takes. The JSON bodies' models refuse it at the door
    (``server.schemas.unicode_scalars_only``); OIP v2's header, read again by ``json`` after orjson refused it,
    reaches this check instead (the tokenizer raised TypeError: a 500)."""

    status_code = 422


@dataclass(frozen=True)
class Classified:
    """The answer to one request: predictions in input order, their record ids, the model that made them."""

    predictions: list[Prediction]
    ids: list[str | None]  # None when STORE_PREDICTIONS=false
    identity: ModelIdentity
    labels: list[str]
    compute_ms: float  # from admission to predictions, queueing and cache included
    timings: StageTimings  # what this request computed itself: tokenization, queue, engine, tokens


def validated_texts(raw: list[str], services: Services, name: TextName = TEXTS) -> list[str]:
    """Normalized texts within the request limits; messages name a text by ``name`` (its index in the request, in
    the request's own spelling)."""
    settings = services.settings
    if len(raw) > settings.max_texts_per_request:
        raise too_many_texts(len(raw), settings.max_texts_per_request)
    encoder = services.predictor.runtime.encoder
    texts = []
    for index, text in enumerate(raw):
        if len(text) > settings.max_text_chars:
            raise PayloadTooLarge(f"{name(index)} has {len(text)} characters; at most {settings.max_text_chars} "
                                  "(MAX_TEXT_CHARS)")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                code = ord(text[error.start])
                raise UnpairedSurrogate(f"{name(index)}: contains an unpaired surrogate (U+{code:04X}) at character "
                                        f"{error.start}; send valid Unicode text (a JSON \\uD800-\\uDFFF escape "
                                        "must be half of a pair)") from None
        clean = normalize(text)
        if not clean:
            raise EmptyText(f"{name(index)} is empty or only whitespace; send some text to classify")
        if encoder.reads_nothing(clean):  # else answered as the model's guess for no text at all, and recorded
            raise EmptyText(f"{name(index)} holds no character the model reads (only control, formatting or "
                            "zero-width characters); send some text to classify")
        texts.append(clean)
    return texts


Check = Callable[[ModelRuntime, list[str]], Awaitable[None]]


def cache_scope(settings: Settings, api_key_id: str | None) -> str | None:
    """Whose cached predictions a request may be answered from and share computations with (``CACHE_SCOPE``):
    its key's (requests without a key share theirs), or everyone's (None)."""
    return (api_key_id or "") if settings.cache_scope == "key" else None


async def classify(services: Services, raw_texts: list[str], request_id: str,
                   api_key_id: str | None, name: TextName = TEXTS, check: Check | None = None) -> Classified:
    """Admit, predict and record ``raw_texts``; raises ``ServerError`` with the status to answer, naming a text
    by ``name``. ``check`` (TEI's refusal to truncate) judges the validated texts by the model that will answer
    them: the serving model is held from there to the answer, so a reload meanwhile cannot put another model's
    tokenizer in between (``Predictor.using``)."""
    if services.draining:
        services.metrics.rejected.labels("draining").inc()
        error = Draining("server is shutting down; retry on another replica")
        error.headers = {"Connection": "close"}
        raise error
    texts = await services.predictor.text_work(raw_texts, validated_texts, raw_texts, services, name)
    with services.predictor.using() as runtime:
        if check is not None:
            await check(runtime, texts)
        return await _classify_on(services, runtime, texts, request_id, api_key_id, name)


def spool_refusal(services: Services, error: SpoolUnavailable) -> SpoolUnavailable:
    """The client's 503 for records the spool refused (counted as ``spool_full``, whatever the cause)."""
    services.metrics.rejected.labels("spool_full").inc()
    return SpoolUnavailable(error.cause, f"the predictions could not be recorded: {error.message}; retry shortly "
                            "(see /health)")


async def _classify_on(services: Services, runtime: ModelRuntime, texts: list[str], request_id: str,
                       api_key_id: str | None, name: TextName) -> Classified:
    started = time.perf_counter()
    identity = runtime.identity
    timings = StageTimings()
    settings, store = services.settings, services.store
    context = RecordContext(request_id, api_key_id, identity, settings.store_text)
    keys = RecordKeys.of(texts) if settings.store_predictions else None
    try:  # before anything is computed for records that could not be kept
        room = store.room_for(texts) if keys is not None else contextlib.nullcontext()
    except SpoolUnavailable as error:
        raise spool_refusal(services, error) from None
    with room:
        on_worker = WorkerRecords(store, texts, runtime.labels(), started, context, keys) \
            if keys is not None and store.ack else None
        predictions = await services.predictor.predict(texts, timings=timings, on_worker=on_worker, name=name,
                                                       runtime=runtime, scope=cache_scope(settings, api_key_id))
        compute_ms = (time.perf_counter() - started - (on_worker.recording_s if on_worker else 0.0)) * 1000
        ids: list[str | None] = [None] * len(predictions)
        if settings.store_predictions:
            records = on_worker.records if on_worker else None
            try:
                if on_worker and on_worker.refused:
                    raise on_worker.refused
                if records is None:
                    records = prediction_records(texts, predictions, context, keys, compute_ms)
                    await store.record(records)  # STORE_DURABILITY=ack: synced to the spool before the answer
            except RecordsTooLarge:  # 413: no retry can fit them (counted as too_large with the other 413s)
                raise
            except SpoolUnavailable as error:  # never a 200 without its record
                raise spool_refusal(services, error) from None
            ids = [record.id for record in records]
    return Classified(predictions=predictions, ids=ids, identity=identity, labels=runtime.labels(),
                      compute_ms=compute_ms, timings=timings)
