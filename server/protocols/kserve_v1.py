"""KServe's v1 data plane (the TensorFlow Serving style) over ``server.serving.classify``.

- ``GET /`` ``{"status": "alive"}`` (KServe's liveness; TEI's ``GET /`` is a health check too)
- ``GET /v1/models`` ``{"models": [names]}``
- ``GET /v1/models/{name}`` ``{"name", "ready": true}``, 503 while draining (as KServe's ``ModelNotReady``)
- ``POST /v1/models/{name}:predict`` ``{"instances": [text, ...]}`` ->
  ``{"predictions": [{"label", "score", "probabilities", "id"}, ...]}`` in input order (``id``: the stored
  record's, for ``POST /feedback``; null with STORE_PREDICTIONS=false)

The model is named by the artifact's name or by the stable alias ``sentiment`` (what the KServe
InferenceService in docker/k8s/kserve is called), whatever artifact a reload swaps in; any other name is 404.
``:explain`` and the columnar ``{"inputs": ...}`` body are not served. Errors are ``{"error", "type"}``, KServe's
``{"error"}`` with a machine-readable ``type`` beside it.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.convertors import StringConvertor, register_url_convertor

from server.auth import require_role
from server.connections import cancel_when_client_leaves
from server.http import error_responses, json_response
from server.primitives import in_list
from server.protocols.oip_model import ALIAS, ModelNotFound
from server.schemas import ClosedBody, Texts
from server.services import Services
from server.serving import classify
from server.strict_json import StrictJsonRoute

router = APIRouter(route_class=StrictJsonRoute, tags=["KServe v1"])


class ModelNameConvertor(StringConvertor):
    """A model name in a path: no ``/`` and no ``:``, so ``GET /v1/models/{name}`` does not also match
    ``/v1/models/x:predict`` (a GET there is 405, and its ``Allow`` names only POST)."""

    regex = "[^/:]+"


register_url_convertor("model_name", ModelNameConvertor())


class ModelInstances(ClosedBody):
    model_config = ConfigDict(json_schema_extra={"examples": [{"instances": ["a gripping film"]}]})

    instances: Texts = Field(..., min_length=1, description="texts; answered in the same order")


class Models(BaseModel):
    models: list[str]


class ModelReady(BaseModel):
    name: str
    ready: bool


class KServePrediction(BaseModel):
    label: str
    score: float
    probabilities: dict[str, float]
    id: str | None = Field(..., description="the stored record's id (for POST /feedback); null when "
                                            "STORE_PREDICTIONS=false")


class KServePredictions(BaseModel):
    predictions: list[KServePrediction]


def served_names(services: Services) -> list[str]:
    """The names the served model answers to: the artifact's own, then the alias."""
    name = services.runtime.identity.name
    return [name] if name == ALIAS else [name, ALIAS]


def services_for(request: Request, name: str) -> Services:
    """The app's services if ``name`` is a served model's name; else ``ModelNotFound`` (404)."""
    services: Services = request.app.state.services
    names = served_names(services)
    if name not in names:
        raise ModelNotFound(f"model {name[:100]!r} is not served here; this server serves "
                            f"{' or '.join(map(repr, names))}")
    return services


@router.get("/", response_model=dict[str, str], summary="Liveness (KServe v1): {\"status\": \"alive\"}")
async def alive() -> Response:
    return json_response({"status": "alive"})


@router.get("/v1/models", response_model=Models, summary="Names the model answers to (KServe v1)")
async def models(request: Request) -> Response:
    return json_response({"models": served_names(request.app.state.services)})


@router.get("/v1/models/{name:model_name}", response_model=ModelReady, responses=error_responses(404, 503),
            summary="Whether the model is ready (KServe v1); 503 while the server drains")
async def model_ready(name: str, request: Request) -> Response:
    services = services_for(request, name)
    refusal = services.not_ready()
    if refusal is not None:
        raise type(refusal)(f"model {name[:100]!r} is {refusal.message}")
    return json_response({"name": name, "ready": True})


@router.post("/v1/models/{name:model_name}:predict", response_model=KServePredictions, responses=error_responses(404),
             summary="Classify {\"instances\": [text, ...]} (KServe v1)")
async def predict(name: str, body: ModelInstances, request: Request,
                  api_key_id: str | None = Depends(require_role("predict"))) -> Response:
    services = services_for(request, name)
    cancel_when_client_leaves(request.scope)  # its texts still queued are dropped if its client leaves
    classified = await classify(services, body.instances, request.scope["state"]["request_id"], api_key_id,
                                in_list("instances"))
    return json_response({"predictions": [
        {"label": p.label, "score": p.score, "probabilities": p.probabilities, "id": record_id}
        for p, record_id in zip(classified.predictions, classified.ids, strict=True)
    ]})
