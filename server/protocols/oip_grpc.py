"""Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``) on GRPC_PORT, off when it is 0.

RPCs: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig, ModelInfer; any other
method of the full service is UNIMPLEMENTED. The model, its tensors and the checks are ``oip_model``'s, as over
HTTP; outputs always come back as ``raw_output_contents`` (as Triton sends them); inputs may come either way.

The server is grpcio's asyncio server on the app's own event loop, so ModelInfer goes through
``server.serving.classify`` like every HTTP route: the same admission, batcher, cache, store and drain.

- Lifecycle: the app's lifespan starts it once the model is warm and stops it when the lifespan ends, which is
  after the HTTP drain (``server.lifecycle``). From the drain signal on, ServerReady and ModelReady answer false
  and ModelInfer UNAVAILABLE; the listener closes when the lifespan ends, calls under way get until the drain
  deadline (DRAIN_GRACE_S + DRAIN_TIMEOUT_S after the signal), and those still unanswered then are abandoned as
  over HTTP: answered UNAVAILABLE, ``error-type: draining``, ``retry-after: 1``, and counted in the shutdown line
  (``Services.drain_abandoned``: the exit status is 1). A call is under way once grpcio has its whole message: one
  whose client stalls mid-message or stops reading its answer is not seen here, holds ``server.stop`` until the
  deadline and is then cut by grpcio, unanswered and uncounted. Outside a drain such a call is cut with its
  connection, which every connection is at GRPC_MAX_CONNECTION_AGE_S + REQUEST_TIMEOUT_S. A port that cannot be
  bound stops start-up with exit code 5, like PORT (``server.preflight`` checks it before the model loads).
- Auth: ModelInfer needs the ``predict`` role, its key in ``authorization: Bearer <key>`` or ``x-api-key``
  metadata (``server.auth.authorize``: the same key cache, messages and security log as HTTP); the other RPCs are
  open like ``/health``.
- Errors: the HTTP status the same failure has over HTTP, as a gRPC status (``STATUS_CODES``), the HTTP
  ``error`` message as details, and trailing metadata ``error-type`` (the HTTP ``type``) and, when retrying helps,
  ``retry-after`` (seconds).
- A message that is not a valid protobuf of the RPC's request type (a string field that is not UTF-8, a truncated
  message, bytes that are no protobuf at all) is the client's error, as JSON that is not JSON is over HTTP:
  INVALID_ARGUMENT, ``error-type: invalid_protobuf``, details naming the message type and what to send instead
  (the protobuf library does not say what is wrong), counted as a 400 and logged as one throttled WARNING.
  grpcio's own handling of an undecodable message (UNKNOWN, an ERROR with a traceback per call, before any
  handler: not counted) is never reached: each RPC's deserializer (``decoder``) hands the handler an
  ``Undecodable`` instead of raising, and ``InferenceService.observe`` refuses it, after the key check of an RPC
  that needs a key (ModelInfer): a caller without a valid key is answered UNAUTHENTICATED (or PERMISSION_DENIED)
  whatever its message, and learns nothing about it.
- Request id: ``x-request-id`` metadata or a new one, sent back as initial metadata; records are stored under
  it, every log line of the call carries it, and the request's OIP ``id`` is echoed in the answer.
- Metrics: ``sentiment_requests_total{endpoint="/inference.GRPCInferenceService/<RPC>", status="<HTTP status>"}``
  and the request latency histogram, as the HTTP middleware records them; a call the client cancelled (or whose
  deadline passed: the client gave up) counts as status 499, one abandoned at the drain deadline as 503. A call is
  counted when its handler answers; an answer grpcio then cannot send is one throttled WARNING (``UnsentAnswers``).
  A call of a method not served (UNIMPLEMENTED) counts as ``endpoint="unmatched"``, status 404 (``CountUnmatched``).
- Limits: a message over MAX_REQUEST_BYTES is refused by gRPC itself (RESOURCE_EXHAUSTED, before any handler: not
  in the metrics); concurrency is bounded by the batcher's queue (UNAVAILABLE when it is full), as for HTTP. One
  connection has at most GRPC_STREAMS calls open at once (HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS); a client's
  further calls on it wait in the client until one ends, then are served (every gRPC library does so). gRPC core's
  ``grpc.http.overload_protection`` (on by default) is off: it counted a call against that limit until Python had
  freed it, after its answer was sent, so the next call the client opened at once was refused (RST_STREAM
  REFUSED_STREAM, the client's UNAVAILABLE "Stream removed") before any handler saw it, in no metric and no log:
  of a red team's 400 calls at once over one connection, 158 were refused so (``tests/test_grpc_refusals.py``).
  What gRPC core still refuses unseen: streams past the limit from a client that ignores it (a protocol error).
- Memory: a call's message, and then its answer too, are held in the request bodies' budget
  (``server.budget.BodyBudget``, shared with HTTP) from when its handler starts until the call ends, its answer
  sent (``BodiesShare.release_when_sent``), so parsing, tokenizing, answering and unread answers stay within the
  plan as HTTP bodies do; beyond the budget, UNAVAILABLE with ``error-type: body_memory_full`` and
  ``retry-after: 1``, counted as HTTP's 503. ModelInfer takes its answer's share before it classifies, for the
  most its answer can take (``BodiesShare``): refused after, its predictions were recorded already, and a client
  retrying as told recorded them twice (red team helper-83). Not bounded: what gRPC reads before a handler runs.
  grpcio accepts calls without limit and reads each accepted call's whole message first, so a flood of large
  calls is held in memory before any can be refused (1,000 concurrent calls of ~1 MB raised the peak by 800-840 MiB,
  ``scripts/bench_grpc_memory.py``). Turning off HTTP/2's bandwidth-delay probe lowered that to 420-530 MiB but
  added a round trip to every call over 64 KiB from a distant client, and ``maximum_concurrent_rpcs=16`` barely
  lowered it (+706 MiB: refused calls' messages were read too), so neither is set: expose GRPC_PORT to clients
  you trust, or behind a proxy that limits concurrent streams.
- Left out: ModelStreamInfer, statistics, the repository, shared memory, TLS (terminate it in front, as for HTTP).

Generated code: ``oip_proto/`` (committed; the ``.proto`` says how to regenerate it). This module is imported
only when GRPC_PORT is set (server/app.py): the generated descriptors register the protocol's own names
(``inference.*``), as a client library's copy does (``tritonclient.grpc``), and two copies cannot share a process.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError
from grpc import aio

from server.auth import GRPC, Caller, authorize, client_for_log, credentials
from server.budget import BodyBudget
from server.exitcodes import ExitCode, StartupError
from server.http import REJECTED_BY_STATUS, STATUS_TYPES, UNMATCHED, BodyMemoryFull, bodies_full_message
from server.logging_setup import request_id_var
from server.metrics import Metrics
from server.primitives import Draining, ModelIdentity, ServerError, in_list, request_id_from
from server.protocols.oip_model import (
    INPUT,
    InputTensor,
    InvalidInferRequest,
    ModelNotFound,
    answered_as_asked,
    model_config,
    model_metadata,
    output_tensor,
    outputs_bytes_at_most,
    requested_outputs,
    resolve,
    server_metadata,
    texts_of,
    unsupported_output,
)
from server.protocols.oip_proto import grpc_service_pb2 as pb
from server.protocols.oip_proto.grpc_service_pb2_grpc import GRPCInferenceServiceServicer
from server.services import Services
from server.serving import classify
from server.store.throttle import Throttle

log = logging.getLogger(__name__)
SERVICE = "inference.GRPCInferenceService"
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT,  # a limit of this server's: retrying the same call cannot help
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.UNAVAILABLE,
    500: grpc.StatusCode.INTERNAL,  # model_output_invalid: the model's fault on this input
    503: grpc.StatusCode.UNAVAILABLE,
}
CLIENT_CANCELLED = 499  # the status a call the client gave up on is counted under
POLL_S = 0.05  # how often the drain looks at its deadline
ABANDON_S = 1.0  # after the drain deadline, how long the abandoned calls' answers get before the listener's hard stop
ABANDONED = Draining("the server shut down before this call was answered (DRAIN_TIMEOUT_S); retry on another replica",
                     retry_after=1)  # answered as any ServerError: UNAVAILABLE, error-type draining, retry-after 1


class UndecodableRequest(InvalidInferRequest):
    """The call's message is not a valid protobuf of the RPC's request type (``Undecodable``)."""

    error_type = "invalid_protobuf"


class Undecodable:
    """What ``decoder`` hands the handler for a message the protobuf library could not decode."""

    __slots__ = ("descriptor",)

    def __init__(self, descriptor: Descriptor) -> None:
        self.descriptor = descriptor

    def error(self) -> UndecodableRequest:
        return UndecodableRequest(f"the request is not a valid {self.descriptor.full_name} protobuf (corrupt or "
                                  "truncated, a string field that is not UTF-8, or another message): send the RPC's "
                                  "request message as a protobuf library serializes it")


def decoder(message_class: Any) -> Callable[[bytes], Any]:
    """The RPC's request deserializer: the message, or an ``Undecodable`` where grpcio's default (``FromString``)
    would raise, which grpcio answers UNKNOWN with an ERROR and a traceback in the log, before any handler."""
    parse, descriptor = message_class.FromString, message_class.DESCRIPTOR

    def decode(data: bytes) -> Any:
        try:  # free when nothing is raised (Python 3.11+): a valid message costs one more call than before
            return parse(data)
        except DecodeError:
            return Undecodable(descriptor)

    return decode


@dataclass(frozen=True)
class Call:
    """What a handler needs to know about its call besides the request message."""

    endpoint: str
    request_id: str
    metadata: dict[str, str]
    peer: str
    bodies: BodiesShare
    api_key_id: str | None = None  # the caller's key, for an RPC that needs one (None: keyless in open mode)


Handler = Callable[[Any, Any, Call], Awaitable[Any]]
Rpc = Callable[[Any, Any, aio.ServicerContext], Awaitable[Any]]


def observed(handler: Handler, role: str | None = None) -> Rpc:
    """The RPC with its request id, metrics and error translation (``InferenceService.observe``), and with
    ``role``, the key check before anything else about the call is answered."""
    endpoint = f"/{SERVICE}/{handler.__name__}"

    @functools.wraps(handler)
    async def rpc(self: InferenceService, request: Any, context: aio.ServicerContext) -> Any:
        return await self.observe(endpoint, handler, request, context, role)

    return rpc


def keyed(role: str) -> Callable[[Handler], Rpc]:
    """``observed``, for an RPC that needs an API key with ``role``."""
    return functools.partial(observed, role=role)


RAW_FRAMING = 11  # the most a ``raw_output_contents`` entry adds to its bytes: a tag and a length (a varint)


class BodiesShare:
    """A call's share of the bodies' budget: its message's bytes, then its answer's. The answer's are taken when it
    is built (``answer``), or by an RPC that records predictions before it computes them, for the most the answer
    can take (``answer_ahead``): a refusal then comes before anything is recorded, and ``answer`` only gives back
    what the answer did not need."""

    def __init__(self, bodies: BodyBudget, metrics: Metrics) -> None:
        self._bodies = bodies
        self._metrics = metrics
        self._ahead: int | None = None  # the answer's bytes taken ahead
        self.held = 0

    def take(self, size: int) -> None:
        """Hold ``size`` bytes more, or refuse the call (``BodyMemoryFull``, counted)."""
        if not self._bodies.reserve(size):
            self._metrics.rejected.labels("body_memory_full").inc()
            raise BodyMemoryFull(bodies_full_message(self._bodies))
        self.held += size

    def answer_ahead(self, at_most: int) -> None:
        self.take(at_most)
        self._ahead = at_most

    def answer(self, size: int) -> None:
        """Hold the answer's ``size`` bytes. Taken ahead, what it did not need goes back; should it need more (a
        reload changed the labels in between), the answer is sent whatever the budget says: its predictions are
        recorded."""
        if self._ahead is None:
            self.take(size)
        elif size <= self._ahead:
            self._bodies.release(self._ahead - size)
            self.held -= self._ahead - size
        elif self._bodies.reserve(size - self._ahead):
            self.held += size - self._ahead

    def release_when_sent(self, context: aio.ServicerContext) -> None:
        """Give the share back when the call ends, not when its handler returns: grpcio holds the message and the
        answer until the answer is sent, and a client that stops reading holds them until it goes (a red team's
        one connection of 400 such calls of 1 MB held 1.8 GB, outside the plan)."""
        held, self.held = self.held, 0
        if held and not context.done():
            context.add_done_callback(lambda _: self._bodies.release(held))
        else:
            self._bodies.release(held)


def answer_bytes_at_most(identity: ModelIdentity, request: pb.ModelInferRequest, outputs: list[str], texts: int,
                         labels: list[str]) -> int:
    """The most ModelInfer's answer to ``request`` can take: its frame, each output's header at its longest and its
    raw contents (``oip_model.outputs_bytes_at_most``)."""
    frame = pb.ModelInferResponse(model_name=identity.name, model_version=identity.version, id=request.id)
    for name in outputs:
        frame.outputs.add(name=name, datatype="BYTES", shape=[texts, len(labels)])
    return frame.ByteSize() + RAW_FRAMING * len(outputs) + outputs_bytes_at_most(outputs, texts, labels)


class InferenceService(GRPCInferenceServiceServicer):
    def __init__(self, services: Services) -> None:
        self.services = services
        self.under_way: set[asyncio.Task] = set()  # the tasks of the calls being answered
        self._abandoned: set[asyncio.Task] = set()  # those cancelled at the drain deadline (``abandon_under_way``)
        self._throttle = Throttle(log)

    async def observe(self, endpoint: str, handler: Handler, request: Any, context: aio.ServicerContext,
                      role: str | None = None) -> Any:
        sent = context.invocation_metadata() or ()
        metadata: dict[str, str] = {}
        for key, value in sent:
            if isinstance(value, str):  # a name sent twice: its first copy counts (a key's: ``credentials``)
                metadata.setdefault(key, value)
        metadata.update(credentials(sent))
        request_id = request_id_from(metadata.get("x-request-id", ""))
        token = request_id_var.set(request_id)
        started, status = time.perf_counter(), 500
        task = asyncio.current_task()
        self.under_way.add(task)
        bodies = BodiesShare(self.services.memory_guard.bodies, self.services.metrics)
        try:
            await context.send_initial_metadata((("x-request-id", request_id),))
            api_key_id = None
            if role is not None:  # first: a caller without a valid key learns nothing about its message
                api_key_id = await authorize(self.services, role, metadata,
                                             Caller(GRPC, endpoint, peer_address(context.peer())))
            if request.__class__ is Undecodable:  # refused before anything else but the key check
                error = request.error()
                self._throttle.log("undecodable", logging.WARNING, "gRPC %s from %s answered INVALID_ARGUMENT: %s",
                                   endpoint, client_for_log(peer_address(context.peer())), error.message)
                raise error
            bodies.take(request.ByteSize())
            response = await handler(self, request, Call(endpoint, request_id, metadata, context.peer(), bodies,
                                                         api_key_id))
            bodies.answer(response.ByteSize())  # it could be held unsent past the budget
            status = 200
            return response
        except ServerError as error:
            status = error.status_code
            if error.logged_per_request:
                log.error("request failed: %s", error.message)
            await context.abort(STATUS_CODES.get(status, grpc.StatusCode.UNKNOWN), error.message,
                                trailing_metadata=trailers(error))
        except asyncio.CancelledError:
            if task not in self._abandoned:  # by gRPC: the client cancelled, or its deadline passed
                status = CLIENT_CANCELLED
                raise
            status = 503
            self.services.drain_abandoned += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, ABANDONED.message, trailing_metadata=trailers(ABANDONED))
        except Exception:
            log.exception("unexpected error answering %s", endpoint)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal server error; it is logged under request id "
                                f"{request_id}: quote it when you report this")
        finally:
            bodies.release_when_sent(context)
            self.under_way.discard(task)
            if self.services.draining and status != CLIENT_CANCELLED and task not in self._abandoned:
                self.services.drain_answered += 1  # as over HTTP: every answer sent after the drain signal
            self._abandoned.discard(task)
            metrics = self.services.metrics
            metrics.count_request(endpoint, status, time.perf_counter() - started)
            if status in REJECTED_BY_STATUS:
                metrics.rejected.labels(REJECTED_BY_STATUS[status]).inc()
            request_id_var.reset(token)

    def abandon_under_way(self) -> int:
        """The drain's time is up: every call still under way is cancelled and answered UNAVAILABLE (``observe``)."""
        self._abandoned = set(self.under_way)
        for task in self._abandoned:
            task.cancel()
        return len(self._abandoned)

    @observed
    async def ServerLive(self, request: pb.ServerLiveRequest, call: Call) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @observed
    async def ServerReady(self, request: pb.ServerReadyRequest, call: Call) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.services.is_ready())

    @observed
    async def ModelReady(self, request: pb.ModelReadyRequest, call: Call) -> pb.ModelReadyResponse:
        """Not ready (rather than NOT_FOUND) for a model or version not served: a client asks "can I use it?"."""
        try:
            resolve(self.services, request.name, request.version)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.services.is_ready())

    @observed
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, call: Call) -> pb.ServerMetadataResponse:
        return json_format.ParseDict(server_metadata(), pb.ServerMetadataResponse())

    @observed
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, call: Call) -> pb.ModelMetadataResponse:
        identity = resolve(self.services, request.name, request.version)
        return json_format.ParseDict(model_metadata(self.services, identity), pb.ModelMetadataResponse())

    @observed
    async def ModelConfig(self, request: pb.ModelConfigRequest, call: Call) -> pb.ModelConfigResponse:
        identity = resolve(self.services, request.name, request.version)
        return pb.ModelConfigResponse(config=json_format.ParseDict(model_config(self.services, identity),
                                                                   pb.ModelConfig()))

    @keyed("predict")
    async def ModelInfer(self, request: pb.ModelInferRequest, call: Call) -> pb.ModelInferResponse:
        services, api_key_id = self.services, call.api_key_id
        identity = resolve(services, request.model_name, request.model_version)
        texts = texts_of(input_tensors(request), services.settings.max_texts_per_request)
        outputs = wanted_outputs(request)
        labels = services.runtime.labels()
        call.bodies.answer_ahead(answer_bytes_at_most(identity, request, outputs, len(texts), labels))
        classified = await classify(services, texts, call.request_id, api_key_id, in_list(INPUT))
        answered_as_asked(classified.identity, request.model_name, request.model_version)
        response = pb.ModelInferResponse(model_name=classified.identity.name,
                                         model_version=classified.identity.version, id=request.id)
        for name in outputs:
            tensor = output_tensor(name, classified.predictions)
            response.outputs.add(name=name, datatype=tensor.datatype, shape=tensor.shape)
            response.raw_output_contents.append(tensor.raw())
        return response


def peer_address(peer: str) -> str:
    """grpcio's peer (``ipv4:127.0.0.1:5000``, ``ipv6:%5B::1%5D:5000``) as the client address HTTP's log lines give:
    the security lines of gRPC calls said ``"ipv4:127.0.0.1:5000" (not an address)``, which no grep by address
    found. Another kind of peer (a Unix socket) is given as it is."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    return urllib.parse.unquote(rest).rpartition(":")[0].strip("[]") or peer


def input_tensors(request: pb.ModelInferRequest) -> list[InputTensor]:
    """The inputs with their BYTES elements, from ``raw_input_contents`` (one per input) or ``bytes_contents``."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInferRequest(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: send one per "
                                  "input, in input order")
    tensors = []
    for index, tensor in enumerate(request.inputs):
        if "shared_memory_region" in tensor.parameters:
            raise InvalidInferRequest("shared-memory tensors are not supported: send the data in the request")
        if raw and tensor.contents.bytes_contents:
            raise InvalidInferRequest(f"input {tensor.name[:100]!r} has both contents and raw_input_contents: "
                                      "send one")
        tensors.append(InputTensor(tensor.name, tensor.datatype, list(tensor.shape), raw=raw[index]) if raw else
                       InputTensor(tensor.name, tensor.datatype, list(tensor.shape),
                                   elements=list(tensor.contents.bytes_contents)))
    return tensors


def wanted_outputs(request: pb.ModelInferRequest) -> list[str]:
    for output in request.outputs:
        unsupported_output(output.parameters)
    return requested_outputs([output.name for output in request.outputs])


def trailers(error: ServerError) -> tuple[tuple[str, str], ...]:
    pairs = [("error-type", error.error_type or STATUS_TYPES.get(error.status_code, f"http_{error.status_code}"))]
    if error.retry_after is not None:
        pairs.append(("retry-after", str(max(1, round(error.retry_after)))))
    return tuple(pairs)


def add_service(service: InferenceService, server: aio.Server) -> None:
    """The generated ``add_GRPCInferenceServiceServicer_to_server``, but with each request deserialized by
    ``decoder``: every RPC of the ``.proto``'s service (all unary), answered by the servicer's method of its name."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(service, method.name), request_deserializer=decoder(request),
            response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class UnsentAnswers(logging.Filter):
    """grpcio's ERROR, with a Cython traceback, for each answer it could not send after its handler returned (the
    client went away, or stopped reading until the stream was cut), as one throttled WARNING of ours. The call was
    counted when its handler answered: nothing of grpcio's tells the server later (a done callback runs at the
    handler's return, the call not cancelled)."""

    MESSAGE = "ExecuteBatchError raised in core by servicer method"

    def __init__(self) -> None:
        super().__init__()
        self._throttle = Throttle(log)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.MESSAGE):
            return True
        self._throttle.log("unsent", logging.WARNING, "gRPC: an answer to %s could not be sent: its client went away "
                           "or stopped reading (the call is counted as answered)",
                           message[len(self.MESSAGE):].strip(" []") or "a call")
        return False


GRPC_CORE_LOG = logging.getLogger("grpc._cython.cygrpc")
GRPC_IDLE_MS = 5 * 60 * 1000  # a gRPC connection without a call for this long is closed (gracefully, GOAWAY)
GRPC_STREAMS = 100  # calls one gRPC connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS)


class CountUnmatched(aio.ServerInterceptor):
    """A call of a method this server does not serve (another RPC of the full service, another service: a gRPC
    health probe, reflection, a scanner) is answered UNIMPLEMENTED by grpcio before any handler runs, and was in no
    metric: counted as HTTP counts a path no route matches, ``sentiment_requests_total{endpoint="unmatched",
    status="404"}`` (one label value, so a client cannot add any)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        started = time.perf_counter()
        handler = await continuation(handler_call_details)
        if handler is None:
            self._metrics.count_request(UNMATCHED, 404, time.perf_counter() - started)
        return handler


class GrpcServer:
    """The gRPC listener of one app: started by its lifespan, stopped within the drain."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.service = InferenceService(services)
        self._unsent = UnsentAnswers()
        settings = services.settings
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        self.address = f"{host}:{settings.grpc_port}"
        self.server = aio.server(interceptors=[CountUnmatched(services.metrics)], options=[
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.so_reuseport", 0),  # else a second server binds a port in use, and they share its calls
            # Connections as for HTTP: idle ones that had sent nothing but the HTTP/2 preface took every file
            # descriptor the process had (HTTP, the spool and the database then failed: red team helper-63).
            ("grpc.max_allowed_incoming_connections", settings.max_connections),  # refused before the handshake
            ("grpc.server_handshake_timeout_ms", max(1, int(settings.header_timeout_s * 1000))),
            ("grpc.max_connection_idle_ms", GRPC_IDLE_MS),  # no call for that long: GOAWAY (clients reconnect)
            # A client that stalls mid-message, or stops reading its answers, held its connection (and the answers'
            # memory) for good: 20 such connections took every slot (red team helper-66). Every connection now gets
            # GOAWAY at GRPC_MAX_CONNECTION_AGE_S (clients reconnect for their next call) and is closed once its
            # calls have had REQUEST_TIMEOUT_S more to finish; and one connection opens at most GRPC_STREAMS calls.
            ("grpc.max_connection_age_ms", max(1, int(settings.grpc_max_connection_age_s * 1000))),
            ("grpc.max_connection_age_grace_ms", max(1, int(settings.request_timeout_s * 1000))),
            ("grpc.max_concurrent_streams", GRPC_STREAMS),
            # Counted as HTTP/2 counts them (open streams), not until Python frees each call after its answer: else
            # the call a client opens as one ends was refused unseen (REFUSED_STREAM; module docstring, "Limits").
            ("grpc.http.overload_protection", 0),
        ])
        add_service(self.service, self.server)

    async def start(self) -> None:
        """Listen on GRPC_PORT; ``StartupError`` (exit code 5) when it cannot be bound."""
        try:
            self.server.add_insecure_port(self.address)
        except RuntimeError:
            raise StartupError(f"GRPC_PORT: {self.address} could not be bound (in use, or not an address of this "
                               "machine); stop the other process, set GRPC_PORT to a free port, or 0 to turn gRPC "
                               "off", ExitCode.PORT) from None
        await self.server.start()
        GRPC_CORE_LOG.addFilter(self._unsent)
        log.info("gRPC (Open Inference Protocol v2) listening on %s", self.address)

    async def stop(self) -> None:
        """Close the listener; calls under way get until the drain deadline, then are abandoned (module docstring)."""
        services = self.services
        if services.drain_deadline is None:
            services.drain_deadline = time.monotonic() + services.settings.drain_timeout_s
        grace = max(0.0, services.drain_deadline - time.monotonic())
        under_way = len(self.service.under_way)
        closing = asyncio.ensure_future(self.server.stop(grace + ABANDON_S))  # the listener closes at once
        while not closing.done() and time.monotonic() < services.drain_deadline:  # a second signal brings it closer
            await asyncio.wait({closing}, timeout=POLL_S)
        if not closing.done():
            abandoned = self.service.abandon_under_way()
            if abandoned:
                log.warning("gRPC: %d calls not answered by the drain deadline: answered UNAVAILABLE", abandoned)
            await closing
        GRPC_CORE_LOG.removeFilter(self._unsent)
        log.info("gRPC: stopped (%d calls were under way when the listener closed)", under_way)
