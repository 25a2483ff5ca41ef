"""Inference and operations endpoints: /predict, /health, /ready, /metrics, /admin/reload."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.auth import require_role
from server.connections import cancel_when_client_leaves
from server.http import error_responses, json_response, not_ready_response
from server.protocols import tei
from server.schemas import PredictRequest, PredictResponse, ReloadRequest
from server.services import Services
from server.serving import Classified, classify
from server.strict_json import StrictJsonRoute

router = APIRouter(route_class=StrictJsonRoute)


def services_of(request: Request) -> Services:
    return request.app.state.services


@router.post("/predict", response_model=PredictResponse | tei.TeiPredictResponse, responses=error_responses(503),
             summary="Classify the sentiment of one or more texts (or TEI's body: inputs)")
async def predict(body: PredictRequest, request: Request, api_key_id: str | None = Depends(require_role("predict"))):
    if body.inputs is not None:
        return await tei.predict_tei(body, request, api_key_id)
    cancel_when_client_leaves(request.scope)  # its texts still queued are dropped if its client leaves
    request_id = request.scope["state"]["request_id"]
    answer = await classify(services_of(request), body.items(), request_id, api_key_id, body.text_name())
    return json_response(predict_answer(answer, request_id))


def predict_answer(answer: Classified, request_id: str) -> dict:
    """``/predict``'s answer (``PredictResponse``), here and in ``server.fastpath``."""
    return {
        "predictions": [
            {"id": record_id, "label": p.label, "score": p.score, "probabilities": p.probabilities,
             "cached": p.cached, "truncated": p.truncated}
            for record_id, p in zip(answer.ids, answer.predictions, strict=True)
        ],
        "model": vars(answer.identity),
        "request_id": request_id,
    }


@router.get("/health", summary="Liveness and detail; status ok or degraded")
async def health(request: Request):
    return json_response(services_of(request).health())


@router.get("/ready", summary="200 when the model is loaded and warm and the server is not draining",
            responses=error_responses(503))
async def ready(request: Request):
    refusal = services_of(request).not_ready()
    if refusal is None:
        return json_response({"ready": True})
    return not_ready_response(refusal, ready=False)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(request: Request):
    services = services_of(request)
    services.refresh_gauges()
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/admin/reload", summary="Load a new or replaced model artifact and swap it in atomically",
             responses=error_responses(409, 503))
async def reload_model(request: Request, body: ReloadRequest | None = None,
                       _: str | None = Depends(require_role("admin"))):
    outcome = await services_of(request).reload(body.model_path if body else None)  # Draining: 503 while draining
    return json_response(outcome, 200 if outcome["reloaded"] else 409)
