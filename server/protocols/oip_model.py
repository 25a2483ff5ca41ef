"""The served model as Open Inference Protocol v2 describes it, for both transports (``oip_v2`` REST, ``oip_grpc``).

One model: the artifact's name, also answered as the stable alias ``sentiment``; one version, the artifact's (an
empty or absent version means that one). One input, ``text``: BYTES of shape ``[N]``, N texts. Three outputs, all
of shape ``[N, ...]`` in input order: ``label`` (BYTES ``[N]``), ``score`` (FP32 ``[N]``, the top label's
probability) and ``probabilities`` (FP32 ``[N, L]``, one column per label in the model's label order, as in
``GET /health``). A request that names no outputs gets all three.

Model configuration (Triton's extension, which ``perf_analyzer`` reads): ``max_batch_size`` 0 and ``dims`` as in
the metadata, i.e. the request's shape is the whole shape: the N texts of one request are N rows of ``text``, not
Triton's batch dimension over ``[N, 1]`` (``perf_analyzer`` sends N texts per request with ``--shape text:N`` or
an input-data file that gives each step's shape, and ``-b 1``). Here rather than in each transport: the checks and
their messages are the same over HTTP and gRPC.
"""

from __future__ import annotations

import struct
from collections.abc import Container
from dataclasses import dataclass

import numpy as np

from server import __version__
from server.primitives import ModelIdentity, Prediction, ServerError, too_many_texts
from server.services import Services

ALIAS = "sentiment"
INPUT = "text"
OUTPUTS = ("label", "score", "probabilities")
DATATYPES = {"label": "BYTES", "score": "FP32", "probabilities": "FP32"}
CONFIG_TYPES = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32"}
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["binary_tensor_data", "model_configuration"]  # no "statistics": perf_analyzer would ask for them
SHAPE_HINT = f"send one input named {INPUT!r}, datatype BYTES, shape [N] with N texts"
LENGTH = struct.Struct("<I")


class InvalidInferRequest(ServerError):
    status_code = 400


class ModelNotFound(ServerError):
    status_code = 404
    error_type = "model_not_found"


@dataclass
class InputTensor:
    """An input as a transport parsed it: its elements as a list (JSON strings, gRPC ``bytes_contents``), or
    ``raw`` in the binary form, decoded only once the name, datatype and shape are known to be right."""

    name: str
    datatype: str
    shape: list[int]
    elements: list[str] | list[bytes] | None = None
    raw: bytes | memoryview | None = None


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    values: list[str] | list[float]  # flat, row-major

    def raw(self) -> bytes:
        """The binary-data form: FP32 little-endian; BYTES as 4-byte little-endian length + UTF-8, per element."""
        if self.datatype == "BYTES":
            return encode_bytes_elements([value.encode() for value in self.values])
        return np.asarray(self.values, dtype="<f4").tobytes()


def resolve(services: Services, name: str, version: str | None) -> ModelIdentity:
    """The serving model if ``name`` (and ``version``, when given) names it; else ``ModelNotFound``."""
    return named(services.runtime.identity, name, version)


def answered_as_asked(identity: ModelIdentity, name: str, version: str | None) -> None:
    """After classifying: ``ModelNotFound`` when a reload swapped the model the request named (its body still
    arriving, or its texts in the queue) and another one answered: its outputs (labels, shape) are not the ones
    asked for. The predictions are recorded as the model that made them; the request may be sent again."""
    try:
        named(identity, name, version)
    except ModelNotFound as error:
        raise ModelNotFound(f"the model was replaced while this request ran: {error}; send it again") from None


def named(identity: ModelIdentity, name: str, version: str | None) -> ModelIdentity:
    """``identity`` if ``name`` (and ``version``, when given) names it; else ``ModelNotFound``."""
    if name not in (identity.name, ALIAS):
        raise ModelNotFound(f"no model named {name[:100]!r}; this server serves {identity.name!r} (also as {ALIAS!r})")
    if version and version != identity.version:
        raise ModelNotFound(f"model {name[:100]!r} has no version {version[:100]!r}; version {identity.version!r} is "
                            "served")
    return identity


def server_metadata() -> dict:
    return {"name": "sentiment-analyzer-pro", "version": __version__, "extensions": EXTENSIONS}


def model_metadata(services: Services, identity: ModelIdentity) -> dict:
    labels = len(services.runtime.labels())
    return {
        "name": identity.name,
        "versions": [identity.version],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": name, "datatype": DATATYPES[name], "shape": [-1, labels] if name == "probabilities"
                     else [-1]} for name in OUTPUTS],
    }


def model_config(services: Services, identity: ModelIdentity) -> dict:
    """Triton's model configuration (JSON form): no batch dimension of Triton's, the tensors' shapes as given."""
    labels = len(services.runtime.labels())
    return {
        "name": identity.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "max_batch_size": 0,
        "input": [{"name": INPUT, "data_type": "TYPE_STRING", "dims": [-1]}],
        "output": [{"name": name, "data_type": CONFIG_TYPES[DATATYPES[name]],
                    "dims": [-1, labels] if name == "probabilities" else [-1]} for name in OUTPUTS],
    }


def texts_of(inputs: list[InputTensor], max_texts: int) -> list[str]:
    """The texts of the one ``text`` input, checked against its datatype and shape.

    A shape over ``max_texts`` (MAX_TEXTS_PER_REQUEST) is refused before any element is decoded, and the binary
    form is decoded no further than the shape's count: a body of many tiny elements cannot keep the loop busy.
    """
    if not inputs:
        raise InvalidInferRequest(f"the request has no inputs; {SHAPE_HINT}")
    for tensor in inputs:
        if tensor.name != INPUT:
            raise InvalidInferRequest(f"unknown input {tensor.name[:100]!r}; {SHAPE_HINT}")
    if len(inputs) > 1:
        raise InvalidInferRequest(f"input {INPUT!r} is sent {len(inputs)} times; {SHAPE_HINT}")
    tensor = inputs[0]
    if tensor.datatype != "BYTES":
        raise wrong_datatype(tensor.datatype)
    if len(tensor.shape) != 1 or tensor.shape[0] < 1:
        raise InvalidInferRequest(f"input {INPUT!r} has shape {tensor.shape[:8]}; {SHAPE_HINT}, N >= 1")
    if tensor.shape[0] > max_texts:
        raise too_many_texts(tensor.shape[0], max_texts)
    elements = (tensor.elements or []) if tensor.raw is None else \
        decode_bytes_elements(tensor.raw, f"input {INPUT!r}", at_most=tensor.shape[0])
    if tensor.shape[0] != len(elements):
        raise InvalidInferRequest(f"input {INPUT!r} has shape [{tensor.shape[0]}] but {len(elements)} elements; the "
                                  "shape must count the texts sent")
    return [element if isinstance(element, str) else utf8(element, index) for index, element in enumerate(elements)]


def wrong_datatype(datatype: str) -> InvalidInferRequest:
    return InvalidInferRequest(f"input {INPUT!r} has datatype {datatype[:20]!r}; {SHAPE_HINT}")


def utf8(element: bytes, index: int) -> str:
    try:
        return element.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInferRequest(f"{INPUT}[{index}] is not UTF-8 (byte 0x{element[error.start]:02x} at offset "
                                  f"{error.start}); send the text UTF-8 encoded") from None


def unsupported_output(parameters: Container[str]) -> None:
    """Refuse an output's parameters that ask for what is not served (HTTP and gRPC alike): an output written to
    a shared-memory region was answered inline with 200, the client reading its region for nothing."""
    if "classification" in parameters:
        raise InvalidInferRequest("the classification extension is not supported: request 'label', 'score' "
                                  "or 'probabilities'")
    if "shared_memory_region" in parameters:
        raise InvalidInferRequest("shared-memory tensors are not supported: leave out the output's "
                                  "shared_memory_region and read the answer from the response")


def requested_outputs(names: list[str] | None) -> list[str]:
    """The outputs to answer, in the order asked (all of them when none are named)."""
    if not names:
        return list(OUTPUTS)
    seen: list[str] = []
    for name in names:
        if name not in OUTPUTS:
            raise InvalidInferRequest(f"unknown output {name[:100]!r}; this model's outputs are "
                                      f"{', '.join(OUTPUTS)}")
        if name in seen:
            raise InvalidInferRequest(f"output {name[:100]!r} is requested twice")
        seen.append(name)
    return seen


def output_tensor(name: str, predictions: list[Prediction]) -> OutputTensor:
    n = len(predictions)
    if name == "label":
        return OutputTensor(name, "BYTES", [n], [p.label for p in predictions])
    if name == "score":
        return OutputTensor(name, "FP32", [n], [p.score for p in predictions])
    labels = list(predictions[0].probabilities)  # one model answered them all: one label order
    return OutputTensor(name, "FP32", [n, len(labels)],
                        [p.probabilities[label] for p in predictions for label in labels])


def outputs_bytes_at_most(names: list[str], texts: int, labels: list[str]) -> int:
    """The most the raw contents of the outputs ``names`` (``output_tensor``'s) take for ``texts`` texts of a model
    with ``labels``: known before the texts are classified."""
    per_text = {"label": LENGTH.size + max(len(label.encode()) for label in labels), "score": 4,
                "probabilities": 4 * len(labels)}
    return texts * sum(per_text[name] for name in names)


def decode_bytes_elements(raw: bytes | memoryview, where: str, at_most: int) -> list[bytes]:
    """A BYTES tensor's elements from the binary form (each a 4-byte little-endian length, then its bytes); more
    than ``at_most`` is refused as soon as it shows."""
    view = memoryview(raw)
    elements: list[bytes] = []
    offset = 0
    while offset < len(view):
        if len(elements) == at_most:
            raise InvalidInferRequest(f"{where} has more than the {at_most} elements its shape says; the shape must "
                                      "count the texts sent")
        if offset + LENGTH.size > len(view):
            raise InvalidInferRequest(f"{where}: element {len(elements)} is cut off in its 4-byte length prefix; "
                                      "each BYTES element is a 4-byte little-endian length, then that many bytes")
        (size,) = LENGTH.unpack_from(view, offset)
        offset += LENGTH.size
        if offset + size > len(view):
            raise InvalidInferRequest(f"{where}: element {len(elements)} declares {size} bytes but "
                                      f"{len(view) - offset} remain")
        elements.append(bytes(view[offset:offset + size]))
        offset += size
    return elements


def encode_bytes_elements(elements: list[bytes]) -> bytes:
    return b"".join(LENGTH.pack(len(element)) + element for element in elements)
