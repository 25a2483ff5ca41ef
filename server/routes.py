"""Inference and operations endpoints: /predict, /health, /ready, /metrics, /admin/reload."""

from __future__ import annotations

import hashlib
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.auth import require_role
from server.http import PayloadTooLarge, error_response, json_response
from server.predictor import normalize
from server.primitives import PredictionRecord, ServerError
from server.protocols import tei
from server.schemas import PredictRequest, PredictResponse, ReloadRequest
from server.services import Services
from server.store import SpoolUnavailable

router = APIRouter()


def services_of(request: Request) -> Services:
    return request.app.state.services


class EmptyText(ServerError):
    status_code = 422


def validated_texts(body: PredictRequest, services: Services) -> list[str]:
    settings = services.settings
    raw = body.items()
    if len(raw) > settings.max_texts_per_request:
        raise PayloadTooLarge(f"{len(raw)} texts in one request; at most {settings.max_texts_per_request} "
                              "(MAX_TEXTS_PER_REQUEST): split the request")
    texts = []
    for index, text in enumerate(raw):
        if len(text) > settings.max_text_chars:
            raise PayloadTooLarge(f"texts[{index}] has {len(text)} characters; at most {settings.max_text_chars} "
                                  "(MAX_TEXT_CHARS)")
        clean = normalize(text)
        if not clean:
            raise EmptyText(f"texts[{index}] is empty or only whitespace; send some text to classify")
        texts.append(clean)
    return texts


@router.post("/predict", response_model=PredictResponse | tei.TeiPredictResponse,
             summary="Classify the sentiment of one or more texts (or TEI's body: inputs)")
async def predict(body: PredictRequest, request: Request, api_key_id: str | None = Depends(require_role("predict"))):
    if body.inputs is not None:
        return await tei.predict_tei(body, request, api_key_id)
    services = services_of(request)
    if services.draining:
        services.metrics.rejected.labels("draining").inc()
        return error_response(503, "server is shutting down; retry on another replica", retry_after=5,
                              headers={"Connection": "close"}, error_type="draining")
    texts = validated_texts(body, services)
    started = time.perf_counter()
    identity = services.predictor.runtime.identity
    predictions = await services.predictor.predict(texts)
    latency_ms = (time.perf_counter() - started) * 1000
    request_id = request.scope["state"]["request_id"]
    ids: list[str | None] = [None] * len(predictions)
    if services.settings.store_predictions:
        records = [PredictionRecord(
            request_id=request_id,
            text=text if services.settings.store_text else None,
            text_sha256=hashlib.sha256(text.encode()).hexdigest(),
            label=p.label, score=p.score, probabilities=p.probabilities,
            model_name=identity.name, model_version=identity.version, device=identity.device,
            latency_ms=latency_ms, cached=p.cached, api_key_id=api_key_id,
        ) for text, p in zip(texts, predictions, strict=True)]
        try:
            await services.store.record(records)  # STORE_DURABILITY=ack: fsynced to the spool before the answer
        except SpoolUnavailable as error:  # never a 200 without its record
            services.metrics.rejected.labels("spool_full").inc()
            return error_response(503, f"the predictions could not be recorded: {error.message}; retry shortly "
                                       "(see /health)", retry_after=error.retry_after, error_type=error.error_type)
        ids = [record.id for record in records]
    return json_response({
        "predictions": [
            {"id": record_id, "label": p.label, "score": p.score, "probabilities": p.probabilities,
             "cached": p.cached}
            for record_id, p in zip(ids, predictions, strict=True)
        ],
        "model": vars(identity),
        "request_id": request_id,
    })


@router.get("/health", summary="Liveness and detail; status ok or degraded")
async def health(request: Request):
    return json_response(services_of(request).health())


@router.get("/ready", summary="200 when the model is loaded and warm and the server is not draining")
async def ready(request: Request):
    services = services_of(request)
    if services.is_ready():
        return json_response({"ready": True})
    # The port opens only after the model is loaded and warm, so "not ready" here means draining.
    return error_response(503, "not ready: draining for shutdown", retry_after=5, error_type="draining", ready=False)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request):
    services = services_of(request)
    services.refresh_gauges()
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/admin/reload", summary="Load a new or replaced model artifact and swap it in atomically")
async def reload_model(request: Request, body: ReloadRequest | None = None,
                       _: str | None = Depends(require_role("admin"))):
    services = services_of(request)
    outcome = await services.reload(body.model_path if body else None)
    return json_response(outcome, 200 if outcome["reloaded"] else 409)
