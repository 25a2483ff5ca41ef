"""Hugging Face Inference API and Text Embeddings Inference (TEI) shapes over ``server.serving.classify``.

- ``POST /``: what ``huggingface_hub.InferenceClient(model=URL).text_classification`` posts, ``{"inputs",
  "parameters": {"top_k", "function_to_apply"}}``, and TEI's body; answered in the Inference API's shape,
  ``[[{"label", "score"}, ...]]`` (the client reads the inner list as every label; a flat list would give it one),
  a batch ``[[...], [...]]``.
- ``POST /predict`` with ``inputs`` instead of ``text``/``texts`` (server/routes.py hands it here): TEI's own
  shape, one text ``[{"label", "score"}, ...]``, a batch ``[[...], ...]``.
- ``GET /info``: TEI's model and router information.

Every label comes back, best first (``top_k`` keeps the first k). ``inputs`` follows TEI's grammar
(server/schemas.py ``tei_inputs``): ``["a", "b"]`` is one *pair* there, refused with 422 and the batch to send
instead. What this model cannot honour is refused, never ignored: ``raw_scores: true`` and ``function_to_apply``
``sigmoid``/``none`` need logits, and the server keeps softmax probabilities only (422). ``truncate: false`` and
``truncation_direction: left`` are honoured by tokenizing the texts first and refusing (422 ``input_too_long``) one
that would be cut; with STRICT_TRUNCATION=true nothing is ever cut, and ``truncate: true`` does not override it.

Answers carry TEI's timing headers, in whole milliseconds as TEI sends them: ``x-compute-time`` (admission to
predictions), ``x-tokenization-time``, ``x-queue-time`` (submitted to the batcher until its first batch's engine
call began), ``x-inference-time`` (the engine calls, measured on the engine worker), ``x-total-time`` (in this
handler), and ``x-compute-type``, ``x-compute-characters`` and ``x-compute-tokens`` (the tokens sent to the engine,
special tokens included). The stages count what the request computed itself (``server.primitives.StageTimings``):
a text answered from the cache or by another request's computation in flight adds no time and no tokens, so a
request answered wholly from the cache reports zeros. Errors are the server's own
``{"error", "type"}`` with its statuses (huggingface_hub shows ``error``); TEI's ``error_type`` is not sent.
"""

from __future__ import annotations

import functools
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, WithJsonSchema
from pydantic_core import PydanticCustomError

from server import __version__
from server.auth import require_role
from server.connections import cancel_when_client_leaves
from server.http import json_response
from server.primitives import InputTooLong, Prediction, TextName, alone, in_list
from server.runtime import ModelRuntime
from server.schemas import ClosedBody, PredictRequest, RawScores, TeiInputs, Truncate, TruncationDirection
from server.services import Services
from server.serving import Classified, classify
from server.strict_json import StrictJsonRoute

router = APIRouter(route_class=StrictJsonRoute, tags=["Hugging Face / TEI"])
DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}


class LabelScore(BaseModel):
    label: str
    score: float


TeiPredictResponse = list[LabelScore] | list[list[LabelScore]]  # one text / a batch (POST /predict with inputs)


class TeiClassifier(BaseModel):
    id2label: dict[str, str]
    label2id: dict[str, int]


class TeiModelType(BaseModel):
    classifier: TeiClassifier


class TeiInfo(BaseModel):
    """TEI's ``/info``; the last four fields are this server's own."""

    model_id: str = Field(..., description="the artifact's name")
    model_sha: str = Field(..., description="sha256 of the ONNX file being served (of its files' sha256s when "
                                            "its weights are in external-data files)")
    model_dtype: str
    served_model_name: str
    model_type: TeiModelType
    max_concurrent_requests: int = Field(..., description="MAX_CONNECTIONS")
    max_input_length: int = Field(..., description="tokens; longer texts are truncated or refused (auto_truncate)")
    max_batch_tokens: int = Field(..., description="MAX_BATCH_TOKENS")
    max_batch_requests: int | None = Field(..., description="texts per engine call (MAX_BATCH_SIZE)")
    max_client_batch_size: int = Field(..., description="texts per request (MAX_TEXTS_PER_REQUEST)")
    auto_truncate: bool = Field(..., description="false when STRICT_TRUNCATION=true")
    tokenization_workers: int = Field(..., description="texts are tokenized on the event loop")
    version: str = Field(..., description="this server's version")
    sha: str | None
    docker_label: str | None
    model_version: str
    model_variant: str
    device: str
    provider: str


def _softmax_function(name: str) -> str:
    if name != "softmax":
        raise PydanticCustomError("unsupported", f"{name!r} is not supported: this server computes softmax "
                                  "probabilities and keeps no logits; omit function_to_apply or send 'softmax'")
    return name


FunctionToApply = Annotated[Literal["softmax", "sigmoid", "none"], AfterValidator(_softmax_function),
                            WithJsonSchema({"type": "string", "enum": ["softmax"],
                                            "description": "only softmax, what the scores are"})]


class HfParameters(ClosedBody):
    top_k: StrictInt | None = Field(None, ge=1, description="answer only the k best labels")
    function_to_apply: FunctionToApply | None = None


def _hf_request_schema(schema: dict) -> None:
    schema["properties"]["inputs"].pop("default", None)
    schema["examples"] = [{"inputs": "a gripping, funny film", "parameters": {"top_k": 1}}]


class HfRequest(ClosedBody):
    """The Hugging Face Inference API's text-classification body, with TEI's options."""

    model_config = ConfigDict(json_schema_extra=_hf_request_schema)

    inputs: TeiInputs
    parameters: HfParameters | None = None
    truncate: Truncate = None
    truncation_direction: TruncationDirection = "right"
    raw_scores: RawScores = False


@router.post("/", response_model=list[list[LabelScore]],
             summary="Classify (Hugging Face Inference API / TEI): [[{label, score}, ...]], every label best first")
async def classify_hf(body: HfRequest, request: Request,
                      api_key_id: str | None = Depends(require_role("predict"))) -> Response:
    top_k = body.parameters.top_k if body.parameters else None
    return await answer(request, api_key_id, body.inputs, body.truncate, body.truncation_direction, top_k,
                        nest_single=True)


async def predict_tei(body: PredictRequest, request: Request, api_key_id: str | None) -> Response:
    """``POST /predict`` with TEI's body: one text is answered as a flat list, as TEI does."""
    return await answer(request, api_key_id, body.inputs, body.truncate, body.truncation_direction, None,
                        nest_single=False)


@router.get("/info", response_model=TeiInfo, summary="Model and limits, as Text Embeddings Inference gives them")
async def info(request: Request) -> Response:
    services: Services = request.app.state.services
    runtime, settings = services.runtime, services.settings
    identity, labels = runtime.identity, runtime.labels()
    return json_response({
        "model_id": identity.name,
        "model_sha": runtime.artifact.variant_sha256(identity.variant),
        "model_dtype": DTYPES.get(identity.variant, identity.variant),
        "served_model_name": identity.name,
        "model_type": {"classifier": {"id2label": {str(i): label for i, label in enumerate(labels)},
                                      "label2id": {label: i for i, label in enumerate(labels)}}},
        "max_concurrent_requests": settings.max_connections,
        "max_input_length": runtime.artifact.max_length,
        "max_batch_tokens": settings.max_batch_tokens,
        "max_batch_requests": settings.max_batch_size,
        "max_client_batch_size": settings.max_texts_per_request,
        "auto_truncate": not settings.strict_truncation,
        "tokenization_workers": 1,
        "version": __version__,
        "sha": None,
        "docker_label": None,
        "model_version": identity.version,
        "model_variant": identity.variant,
        "device": identity.device,
        "provider": identity.provider,
    })


async def answer(request: Request, api_key_id: str | None, inputs: str | list, truncate: bool | None,
                 direction: str, top_k: int | None, *, nest_single: bool) -> Response:
    """Classify TEI's ``inputs`` and answer every text's ranked labels; one text is answered flat (TEI's
    ``/predict``) or, with ``nest_single``, as a list of one (the Inference API's ``POST /``)."""
    cancel_when_client_leaves(request.scope)  # its texts still queued are dropped if its client leaves
    started = time.perf_counter()
    services: Services = request.app.state.services
    batched = isinstance(inputs, list) and isinstance(inputs[0], list)
    texts = [item[0] for item in inputs] if batched else [inputs[0] if isinstance(inputs, list) else inputs]
    name = in_list("inputs") if isinstance(inputs, list) else alone("inputs")
    check = None
    if truncate is False or direction.lower() == "left":
        check = functools.partial(refuse_truncation, services, name, "truncate is false" if truncate is False else
                                  "this server truncates on the right only (truncation_direction left)")
    classified = await classify(services, texts, request.scope["state"]["request_id"], api_key_id, name, check)
    ranked = [ranked_labels(p, top_k) for p in classified.predictions]
    return json_response(ranked if batched or nest_single else ranked[0], headers=timing_headers(
        classified, texts, started))


async def refuse_truncation(services: Services, name: TextName, why: str, runtime: ModelRuntime,
                            texts: list[str]) -> None:
    """``InputTooLong`` (422) for the first of the (validated) texts that ``runtime``, the model that will answer
    them, would cut. With STRICT_TRUNCATION=true the predictor refuses such texts itself (nothing is ever cut), so
    they are not tokenized twice."""
    encoder = runtime.encoder
    if encoder.strict:
        return
    _, cut = await services.predictor.text_work(texts, encoder.encode_marking_truncation, texts)
    if any(cut):
        raise InputTooLong(f"{name(cut.index(True))} is longer than the model's {encoder.max_length} tokens and "
                           f"{why}: shorten it, or send truncate true and truncation_direction right to classify "
                           f"its first {encoder.max_length} tokens")


def ranked_labels(prediction: Prediction, top_k: int | None) -> list[dict[str, float | str]]:
    """Every label and its probability, best first; the first ``top_k`` when given."""
    best_first = sorted(prediction.probabilities.items(), key=lambda item: item[1], reverse=True)
    return [{"label": label, "score": score} for label, score in best_first[:top_k]]


def timing_headers(classified: Classified, texts: list[str], started: float) -> dict[str, str]:
    """TEI's timing headers (module docstring), in whole milliseconds as TEI sends them."""
    timings = classified.timings
    return {
        "x-compute-type": "gpu" if classified.identity.device == "cuda" else "cpu",
        "x-compute-time": str(int(classified.compute_ms)),
        "x-compute-characters": str(sum(len(text) for text in texts)),
        "x-compute-tokens": str(timings.compute_tokens),
        "x-tokenization-time": str(int(timings.tokenization * 1000)),
        "x-queue-time": str(int(timings.queue * 1000)),
        "x-inference-time": str(int(timings.inference * 1000)),
        "x-total-time": str(int((time.perf_counter() - started) * 1000)),
    }
