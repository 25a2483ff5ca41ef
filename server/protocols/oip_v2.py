"""Open Inference Protocol v2 over HTTP (KServe v2 / Triton), with Triton's binary-data extension.

Routes: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{version}]``
(metadata), ``.../ready``, ``.../config`` (Triton's model configuration), ``POST .../infer``. What the model looks
like (names, tensors, the alias ``sentiment``) is ``server.protocols.oip_model``. Inference goes through
``server.serving.classify`` and needs the ``predict`` role like ``/predict``; health, metadata and config are open
like ``/health``.

The infer body is JSON, or, with the binary-data extension (``tritonclient`` uses it by default), JSON of
``Inference-Header-Content-Length`` bytes followed by raw tensors: an input with ``parameters.binary_data_size``
takes that many bytes, in input order, BYTES elements each a 4-byte little-endian length and its bytes. Outputs
are answered in the binary form when the output's ``parameters.binary_data`` is true, or, if it does not say, when
the request's ``parameters.binary_data_output`` is; the answer then carries ``Inference-Header-Content-Length``
and is ``application/octet-stream``. ``Content-Type`` is not looked at (``tritonclient`` sends none, and its binary
body is not JSON), unlike the native JSON routes, which answer 415 without ``application/json``.

Choices the protocol leaves open: ``shape`` is ``[N]`` only (``[N, 1]`` is refused); JSON ``data`` is a flat list
of strings; an empty or blank text is 422 and too many or too long texts 413, as on ``/predict``; malformed
requests are 400; an unknown model or version is 404; not ready (draining) is 503 + Retry-After. Errors are
``{"error": ..., "type": ...}`` (clients read ``error``). Not supported (400 where the request asks for it):
shared-memory tensors, Triton's classification extension; compressed request bodies are 415 for every route
(``server.http``). The request's ``id`` is echoed; records are stored under the HTTP request id (``X-Request-ID``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect

from server.auth import require_role
from server.connections import cancel_when_client_leaves
from server.http import (
    byte_count,
    error_responses,
    json_response,
    location,
    not_ready_response,
    problem_message,
    unparseable,
)
from server.primitives import in_list
from server.protocols.oip_model import (
    ALIAS,
    INPUT,
    OUTPUTS,
    SHAPE_HINT,
    InputTensor,
    InvalidInferRequest,
    answered_as_asked,
    model_config,
    model_metadata,
    output_tensor,
    requested_outputs,
    resolve,
    server_metadata,
    texts_of,
    unsupported_output,
    wrong_datatype,
)
from server.schemas import UnicodeText, at_most_max_texts
from server.services import Services
from server.serving import Classified, classify
from server.strict_json import RepeatedKey, StrictJsonRoute, repeats_a_key, strict_json

router = APIRouter(route_class=StrictJsonRoute, tags=["Open Inference Protocol v2"])
HEADER_LENGTH = "inference-header-content-length"
MODEL = "/v2/models/{name}"
FEW = 16  # at most this many inputs, outputs or dimensions are read: each past it would be one more error to build
VERSIONED = "/v2/models/{name}/versions/{version}"


# -- the request and answer bodies (also the OpenAPI document's) ---------------------------------------------------

class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class RequestParameters(_Open):
    binary_data_output: bool = Field(False, description="answer every output in the binary form unless the "
                                     "output's own binary_data says otherwise")


class InputParameters(_Open):
    binary_data_size: int | None = Field(None, ge=0, description="the input's data is this many bytes of the "
                                         "binary section instead of 'data'")


class InferInput(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str = Field(json_schema_extra={"enum": [INPUT]})
    datatype: str = Field(json_schema_extra={"enum": ["BYTES"]})
    shape: list[Annotated[int, Field(json_schema_extra={"minimum": 1})]] = Field(
        description="[N]: N, the number of texts", max_length=FEW, json_schema_extra={"minItems": 1, "maxItems": 1})
    parameters: InputParameters | None = None
    data: Annotated[list[Annotated[str, Field(json_schema_extra={"pattern": "\\S"})]] | None,
                    BeforeValidator(at_most_max_texts)] = Field(
        None, description="the N texts (absent when sent as binary data)", json_schema_extra={"minItems": 1})


class OutputParameters(_Open):
    binary_data: bool | None = Field(None, description="this output in the binary form (true) or as JSON data")


class RequestedOutput(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str = Field(json_schema_extra={"enum": list(OUTPUTS)})
    parameters: OutputParameters | None = None


class InferRequest(BaseModel):
    """An OIP v2 inference request (its JSON part, when the binary-data extension is used)."""

    model_config = ConfigDict(strict=True)
    id: UnicodeText | None = Field(None, description="echoed in the answer (so valid Unicode: the answer's JSON "
                                   "could not carry an unpaired surrogate)")
    parameters: RequestParameters | None = None
    inputs: list[InferInput] = Field(max_length=FEW, json_schema_extra={"minItems": 1, "maxItems": 1})
    outputs: list[RequestedOutput] | None = Field(None, max_length=FEW, description="the outputs to answer; all "
                                                  "when absent")


class JsonInferInput(InferInput):
    """The documented input: its texts in ``data`` (the binary form is described in prose, as it is not JSON)."""

    parameters: dict[str, Any] | None = None
    data: list[Annotated[str, Field(json_schema_extra={"pattern": "\\S"})]] = Field(
        description="the N texts", json_schema_extra={"minItems": 1})


class JsonInferRequest(InferRequest):
    """An OIP v2 inference request in its JSON form."""

    inputs: list[JsonInferInput] = Field(max_length=FEW, json_schema_extra={"minItems": 1, "maxItems": 1})


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class OutputData(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[str] | list[float] | None = Field(None, description="absent when the output is in the binary form")
    parameters: dict[str, int] | None = Field(None, description="binary_data_size: the output's bytes in the "
                                              "binary section")


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(None, description="the request's id, when it had one")
    outputs: list[OutputData]


def inline_schema(model: type[BaseModel]) -> dict:
    """``model``'s JSON schema with its nested models written in place: the infer routes read their body
    themselves, so FastAPI puts no request model into the document's components for a ``$ref`` to name."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def expand(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return expand(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: expand(value) for key, value in node.items()}
        if isinstance(node, list):
            return [expand(item) for item in node]
        return node

    return expand(schema)


BINARY = {"schema": {"type": "string", "format": "binary"}}
INFER_BODY = {
    "required": True,
    "description": "JSON; or, with the binary-data extension, this JSON as a header of "
                   "Inference-Header-Content-Length bytes, then each binary input's bytes in input order (a BYTES "
                   "element: 4-byte little-endian length, then its bytes). Content-Type is not checked.",
    "content": {"application/json": {"schema": inline_schema(JsonInferRequest)}},
}
INFER_ANSWERS = {
    **error_responses(400, 404, 413, 415, 422),
    200: {"description": "JSON, or the JSON header (Inference-Header-Content-Length bytes) followed by the outputs "
                         "in the binary form", "content": {"application/octet-stream": BINARY}},
}


# -- routes --------------------------------------------------------------------------------------------------------

def services_of(request: Request) -> Services:
    return request.app.state.services


@router.get("/v2", response_model=ServerMetadata, summary="OIP v2 server metadata")
async def server_metadata_route():
    return json_response(server_metadata())


@router.get("/v2/health/live", response_model=Live, summary="OIP v2 liveness: 200 while the process answers")
async def live():
    return json_response({"live": True})


@router.get("/v2/health/ready", response_model=Ready, responses=error_responses(503),
            summary="OIP v2 readiness: 200 when the model is warm and the server is not draining, else 503")
async def ready(request: Request):
    refusal = services_of(request).not_ready()
    if refusal is None:
        return json_response({"ready": True})
    return not_ready_response(refusal, ready=False)


ModelName = Annotated[str, Path(description=f"the artifact's name, or the alias {ALIAS!r}", examples=[ALIAS])]
Version = Annotated[str, Path(description="the artifact's version (GET /v2/models/{name} lists it)")]
PREDICT = Depends(require_role("predict"))


@router.get(MODEL, response_model=ModelMetadata, responses=error_responses(404), summary="OIP v2 model metadata")
async def metadata(request: Request, name: ModelName):
    return metadata_of(request, name, None)


@router.get(VERSIONED, response_model=ModelMetadata, responses=error_responses(404),
            summary="OIP v2 model metadata of one version")
async def versioned_metadata(request: Request, name: ModelName, version: Version):
    return metadata_of(request, name, version)


def metadata_of(request: Request, name: str, version: str | None) -> Response:
    services = services_of(request)
    return json_response(model_metadata(services, resolve(services, name, version)))


@router.get(MODEL + "/ready", response_model=ModelReady, responses=error_responses(404, 503),
            summary="OIP v2 model readiness")
async def model_ready(request: Request, name: ModelName):
    return readiness_of(request, name, None)


@router.get(VERSIONED + "/ready", response_model=ModelReady, responses=error_responses(404, 503),
            summary="OIP v2 model readiness of one version")
async def versioned_model_ready(request: Request, name: ModelName, version: Version):
    return readiness_of(request, name, version)


def readiness_of(request: Request, name: str, version: str | None) -> Response:
    services = services_of(request)
    identity = resolve(services, name, version)
    refusal = services.not_ready()
    if refusal is None:
        return json_response({"name": identity.name, "ready": True})
    return not_ready_response(refusal, name=identity.name, ready=False)


@router.get(MODEL + "/config", response_model=dict[str, Any], responses=error_responses(404),
            summary="Triton model configuration")
async def config(request: Request, name: ModelName):
    return config_of(request, name, None)


@router.get(VERSIONED + "/config", response_model=dict[str, Any], responses=error_responses(404),
            summary="Triton model configuration of one version")
async def versioned_config(request: Request, name: ModelName, version: Version):
    return config_of(request, name, version)


def config_of(request: Request, name: str, version: str | None) -> Response:
    services = services_of(request)
    return json_response(model_config(services, resolve(services, name, version)))


@router.post(MODEL + "/infer", response_model=InferResponse, responses=INFER_ANSWERS,
             openapi_extra={"requestBody": INFER_BODY},
             summary="OIP v2 inference (JSON or binary tensors)")
async def infer(request: Request, name: ModelName, api_key_id: str | None = PREDICT):
    return await infer_on(request, name, None, api_key_id)


@router.post(VERSIONED + "/infer", response_model=InferResponse, responses=INFER_ANSWERS,
             openapi_extra={"requestBody": INFER_BODY},
             summary="OIP v2 inference on one version")
async def versioned_infer(request: Request, name: ModelName, version: Version, api_key_id: str | None = PREDICT):
    return await infer_on(request, name, version, api_key_id)


async def infer_on(request: Request, name: str, version: str | None, api_key_id: str | None) -> Response:
    services = services_of(request)
    resolve(services, name, version)
    try:
        body = await request.body()
    except ClientDisconnect:
        raise InvalidInferRequest("the client closed the connection before the body ended") from None
    cancel_when_client_leaves(request.scope)  # its texts still queued are dropped if its client leaves
    parsed, binary = parse_body(body, header_length(request))
    inputs = [_input_tensor(tensor, binary) for tensor in parsed.inputs]
    texts = texts_of(inputs, services.settings.max_texts_per_request)
    binary.check_consumed()
    outputs = planned_outputs(parsed)
    classified = await classify(services, texts, request.scope["state"]["request_id"], api_key_id, in_list(INPUT))
    answered_as_asked(classified.identity, name, version)
    return infer_response(classified, parsed.id, outputs)


# -- reading the request -------------------------------------------------------------------------------------------

class BinarySection:
    """The bytes after the JSON header, handed out to the inputs that claim them, in order."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: int, name: str) -> memoryview:
        if self.offset + size > len(self.data):
            raise InvalidInferRequest(f"input {name[:100]!r} claims {size} bytes of binary data but "
                                      f"{len(self.data) - self.offset} remain after the inference header")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def check_consumed(self) -> None:
        left = len(self.data) - self.offset
        if left:
            raise InvalidInferRequest(f"{left} bytes after the inference header belong to no input: each binary "
                                      "input says its size in parameters.binary_data_size")


def header_length(request: Request) -> str | None:
    """The request's Inference-Header-Content-Length. It frames the body, so a second copy is refused rather than
    one picked: read by its first copy, ``123`` then ``3`` was answered 200 where a proxy in front may have read the
    other (red team helper-83), as a Content-Type sent twice is refused (``server.http``)."""
    copies = request.headers.getlist(HEADER_LENGTH)
    if len(copies) > 1:
        raise InvalidInferRequest(f"Inference-Header-Content-Length is sent {len(copies)} times: it says where the "
                                  "JSON header ends, so send it once")
    return copies[0] if copies else None


def parse_body(body: bytes, header_length: str | None) -> tuple[InferRequest, BinarySection]:
    """The JSON header as an ``InferRequest`` and the binary section after it (empty without the extension)."""
    size = len(body)
    if header_length is not None:
        declared = header_length.strip()
        size = byte_count(declared)
        if size is None or size > len(body):
            raise InvalidInferRequest(f"Inference-Header-Content-Length {declared[:20]!r} is not a byte count "
                                      f"within the {len(body)}-byte body")
    view = memoryview(body)
    try:
        document = orjson.loads(view[:size])
    except orjson.JSONDecodeError as error:
        document = readable_elsewhere(view[:size], error, header_length is not None)
    if not isinstance(document, dict):
        raise InvalidInferRequest("the inference request must be a JSON object with 'inputs'")
    if repeats_a_key(body if size == len(body) else view[:size], document):  # orjson kept the last copy
        raise key_sent_twice(view[:size])
    try:
        parsed = InferRequest.model_validate(document)
    except ValidationError as error:
        datatype = datatype_at_fault(document, error)
        if datatype is not None:
            raise wrong_datatype(datatype) from None
        element = text_element_at_fault(document, error)
        if element is not None:
            raise element from None
        problems = [f"{location(e['loc'])}: {problem_message(e)}" for e in error.errors()[:5]]
        raise InvalidInferRequest("invalid inference request: " + "; ".join(problems)) from None
    return parsed, BinarySection(view[size:])


def text_data_problems(document: dict, error: ValidationError) -> Iterator[tuple[dict, dict]]:
    """Each of the request model's problems with the ``data`` of an input named ``text``, and that input."""
    inputs = document.get("inputs")
    if not isinstance(inputs, list):
        return
    for problem in error.errors():
        where = problem["loc"]
        if len(where) > 2 and where[0] == "inputs" and where[2] == "data" and isinstance(where[1], int) \
                and where[1] < len(inputs) and isinstance(inputs[where[1]], dict) \
                and inputs[where[1]].get("name") == INPUT:
            yield problem, inputs[where[1]]


def datatype_at_fault(document: dict, error: ValidationError) -> str | None:
    """The datatype of the ``text`` input, when the request model refused its ``data`` and it is not BYTES: numbers
    sent as INT32 are refused for that, as over gRPC, not as "Input should be a valid string" once per element.
    Another input's problems are left to the request model's words (gRPC's "unknown input" is about its name)."""
    for _, tensor in text_data_problems(document, error):
        datatype = tensor.get("datatype")
        if isinstance(datatype, str) and datatype != "BYTES":
            return datatype
    return None


def text_element_at_fault(document: dict, error: ValidationError) -> InvalidInferRequest | None:
    """The first element of the BYTES ``text`` input that is not a string, named as the other protocols name a text
    (``text[i]``): pydantic's words were "inputs[0].data[1]: Input should be a valid string", once per element."""
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or sum(isinstance(i, dict) and i.get("name") == INPUT for i in inputs) != 1:
        return None  # no text input, or several: which one is meant is the first thing to fix (pydantic names both)
    for problem, tensor in text_data_problems(document, error):
        where = problem["loc"]
        if problem["type"] == "string_type" and len(where) == 4 and isinstance(where[3], int):
            return InvalidInferRequest(f"{INPUT}[{where[3]}] is {json_kind(tensor['data'][where[3]])}, not a string: "
                                       f"BYTES data hold texts, each a JSON string in a flat list; {SHAPE_HINT}")
    return None


def json_kind(value: object) -> str:
    """What a JSON value is, in words."""
    if isinstance(value, bool):  # before numbers: a bool is an int in Python
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if value is None:
        return "null"
    return "a list" if isinstance(value, list) else "an object"


def key_sent_twice(header: memoryview) -> InvalidInferRequest:
    """The refusal of a header that writes a key twice in an object, naming the key as the other routes do."""
    try:
        strict_json(header.tobytes())
    except (ValueError, RecursionError) as error:
        return InvalidInferRequest(f"the inference request is not valid JSON: {unparseable(error)}")
    return InvalidInferRequest("the inference request is not valid JSON: it sends a key twice in one object")


def readable_elsewhere(header: memoryview, error: orjson.JSONDecodeError, declared: bool) -> Any:
    """A header orjson refuses but the other routes' reader takes: a text with an unpaired surrogate escape
    (``"\\ud800"``) is then refused by the text checks, naming it (``text[1]``), as on every other route; before,
    it was "not valid JSON: no low surrogate in string". Anything else is not JSON, said as such."""
    try:
        return strict_json(bytes(header))
    except RepeatedKey as repeated:  # named as such, not as what orjson stumbled on first (a surrogate in that key)
        raise InvalidInferRequest(f"the inference request is not valid JSON: {repeated}") from None
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError; nested past Python's stack
        pass
    if declared:  # a wrong length cuts the header short or runs into the binary data
        raise InvalidInferRequest(f"the body's first {len(header)} bytes (Inference-Header-Content-Length) are not "
                                  f"valid JSON: {not_json(header, error)}; send the JSON header's exact length in "
                                  "bytes") from None
    hint = ("; a body with binary data after its JSON header (the binary-data extension) must say the header's "
            "length in Inference-Header-Content-Length") if "after document" in str(error) else ""
    raise InvalidInferRequest(f"the inference request is not valid JSON: {not_json(header, error)}{hint}") from None


def not_json(header: memoryview, error: orjson.JSONDecodeError) -> str:
    """Why the JSON header is not JSON: orjson says "str is not valid UTF-8: surrogates not allowed" for any bytes
    that are not UTF-8, which a client sending Latin-1 or UTF-16 cannot act on."""
    try:
        str(header, "utf-8")
    except UnicodeDecodeError as undecodable:
        return (f"it is not UTF-8 (byte 0x{header[undecodable.start]:02x} at offset {undecodable.start}); send it "
                "UTF-8 encoded")
    return str(error)


def _input_tensor(tensor: InferInput, binary: BinarySection) -> InputTensor:
    parameters = tensor.parameters.model_extra if tensor.parameters else {}
    if "shared_memory_region" in (parameters or {}):
        raise InvalidInferRequest("shared-memory tensors are not supported: send the data in the request")
    size = tensor.parameters.binary_data_size if tensor.parameters else None
    if size is None:
        if tensor.data is None:
            raise InvalidInferRequest(f"input {tensor.name[:100]!r} has no 'data' and no "
                                      "parameters.binary_data_size")
        return InputTensor(tensor.name, tensor.datatype, tensor.shape, elements=tensor.data)
    if tensor.data is not None:
        raise InvalidInferRequest(f"input {tensor.name[:100]!r} has both 'data' and binary_data_size: send one")
    return InputTensor(tensor.name, tensor.datatype, tensor.shape, raw=binary.take(size, tensor.name))


# -- the answer ----------------------------------------------------------------------------------------------------

def planned_outputs(parsed: InferRequest) -> list[tuple[str, bool]]:
    """(name, in the binary form) of each output to answer; checked before anything is predicted."""
    binary_default = bool(parsed.parameters and parsed.parameters.binary_data_output)
    own = {output.name: output.parameters for output in parsed.outputs or []}
    planned = []
    for name in requested_outputs([output.name for output in parsed.outputs or []]):
        parameters = own.get(name)
        unsupported_output(parameters.model_extra or {} if parameters is not None else {})
        binary = parameters.binary_data if parameters is not None and parameters.binary_data is not None \
            else binary_default
        planned.append((name, binary))
    return planned


def infer_response(classified: Classified, request_id: str | None, outputs: list[tuple[str, bool]]) -> Response:
    header: dict[str, Any] = {"model_name": classified.identity.name, "model_version": classified.identity.version}
    if request_id is not None:
        header["id"] = request_id
    header["outputs"] = []
    chunks = []
    for name, binary in outputs:
        tensor = output_tensor(name, classified.predictions)
        described: dict[str, Any] = {"name": name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary:
            raw = tensor.raw()
            described["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            described["data"] = tensor.values
        header["outputs"].append(described)
    encoded = orjson.dumps(header)
    if not chunks:
        return Response(encoded, media_type="application/json")
    return Response(b"".join([encoded, *chunks]), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(encoded))})



