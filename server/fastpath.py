"""``POST /predict`` answered without the web framework's per-request layers, whenever that changes nothing.

Profiled at 64 clients (py-spy on the server, 2-core VM): about a quarter of the event loop's CPU per request went
to FastAPI and Starlette around the route's own work: their middleware stack, matching the path against every
route, solving the dependencies, the request object, the response class. The loop's CPU is the server's share of
the two cores, so it bounds both throughput and a lone request's latency.

This ASGI layer sits inside ``ObservedASGI`` (request id, body limits, the bodies' memory budget, request
metrics, JSON 500s all still apply) and answers the common request itself: a body sent as ``application/json``
that ``PredictRequest`` accepts, holding ``text`` or ``texts``. It checks the key and
classifies exactly as the route does (``server.auth.authorize``, ``server.serving.classify``, the same answer from
``server.routes.predict_answer``, errors from ``server.http.server_error_response``).

Anything else goes to the framework with the body replayed (its bytes in one message), the error or disconnect
that ended its reading included: TEI's ``inputs``, a body ``PredictRequest`` refuses (its 4xx, that answer's
wording and its order against the key check stay the framework's handlers'), another content type, a client that
disconnected. The errors ``authorize`` and ``classify`` raise here (401/403, 413, 422 for a blank or too long text,
503) are answered by the ``server_error_response`` the framework's handler uses; the tests compare both paths. A
body taken here means what it would there (``_parsed``). The route in ``server.routes`` stays the OpenAPI
document's operation and the fallback.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson

from server.auth import Caller, authorize, credentials
from server.connections import cancel_when_client_leaves
from server.http import server_error_response
from server.primitives import ServerError
from server.routes import predict_answer
from server.schemas import PredictRequest
from server.services import Services
from server.serving import classify
from server.strict_json import writes_more_keys

PATH = "/predict"


class PredictFastPath:
    """ASGI middleware: ``POST /predict`` with a plain body answered here, the rest passed to ``app``."""

    def __init__(self, app, services: Callable[[], Services], route: object) -> None:
        self.app = app
        self._services = services
        self._route = route  # the framework's route, for the request metrics' endpoint label

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        body, end, error = await _read_body(receive)
        if end is None and error is None and is_plain_json(scope["headers"]):
            request = _parsed(body)
            if request is not None:
                body.clear()  # the body's bytes are not needed any more: only the texts are held from here on
                scope["route"] = self._route
                return await self._answer(scope, receive, request, send)
        return await self.app(scope, _replay(body, end, error, receive), send)

    async def _answer(self, scope, receive, request: PredictRequest, send) -> None:
        cancel_when_client_leaves(scope)  # as the route does: a client that leaves drops its texts still queued
        services = self._services()
        request_id = scope["state"]["request_id"]
        client = scope.get("client")
        caller = Caller("POST", PATH, client[0] if client else "-")
        try:
            api_key_id = await authorize(services, "predict", credentials(scope["headers"]), caller)
            answer = await classify(services, request.items(), request_id, api_key_id, request.text_name())
        except ServerError as error:
            return await server_error_response(error)(scope, receive, send)
        body = orjson.dumps(predict_answer(answer, request_id))
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


async def _read_body(receive) -> tuple[bytearray, dict | None, Exception | None]:
    """The body's bytes, the message that ended it when that is not its last part (a disconnect), and the
    exception that ended reading, if any (``ObservedASGI`` refuses a body over its limits from inside ``receive``).

    The bytes are gathered in one buffer, not kept as the messages they came in: a body trickled in a byte per
    message held a message per byte (140 bytes per byte of body, where the bodies' memory budget charges 16)."""
    body = bytearray()
    try:
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return body, message, None
            body += message.get("body", b"")
            if not message.get("more_body", False):
                return body, None, None
    except Exception as error:  # the framework answers it, as it would have without this layer
        return body, None, error


def _replay(body: bytearray, end: dict | None, error: Exception | None, receive):
    """A ``receive`` that gives the framework the bytes already read (in one message, emptying ``body``), then the
    message or the error that ended them, then the connection's."""
    complete = end is None and error is None
    pending = [{"type": "http.request", "body": bytes(body), "more_body": not complete}] if body or complete else []
    body.clear()
    if end is not None:
        pending.append(end)

    async def replayed() -> dict:
        if pending:
            return pending.pop(0)
        if error is not None:
            raise error
        return await receive()

    return replayed


def _parsed(body: bytearray) -> PredictRequest | None:
    """The request, or None for anything the framework should judge (and word the error for) or answer (TEI).

    Parsed by pydantic-core's own JSON reader: at its peak it holds 4 bytes per byte of a body of emoji-laden texts,
    against 8 for ``json.loads`` and 16 for ``orjson.loads`` (tracemalloc, a 1 MiB body), and the bodies' memory
    budget charges 16 in all (``server.budget``). Every body it accepts, the framework's reader
    (``server.strict_json``) reads to the same values (escapes, surrogate pairs, whitespace); what it refuses (a
    byte-order mark, bytes that are not UTF-8, trailing garbage) goes to the framework, which refuses it too, in its
    words. So does a body that writes a key twice, which pydantic-core reads by its last copy and the framework
    refuses (``server.strict_json.writes_more_keys``: a colon count; outside strings only for texts that hold
    colons). That check also covers what pydantic-core reads and the framework does not: ``NaN``, ``Infinity``, and
    integers longer than Python's limit (``PYTHONINTMAXSTRDIGITS``) are no text, so a body the request model accepts
    holds one only as a key's overridden copy (``{"text": NaN, "text": "ok"}`` was answered before either check).
    """
    if b'"inputs"' in body:  # TEI's body (the key's quotes cannot be unescaped inside a string): the route's
        return None
    try:
        request = PredictRequest.model_validate_json(body)
    except Exception:  # not JSON, or not a valid request: the framework's handlers answer it
        return None
    if request.inputs is not None or writes_more_keys(body, len(request.model_fields_set)):
        return None  # TEI's body (its parse is not held while the route's runs), or a key sent twice (refused there)
    return request


def is_plain_json(headers: list[tuple[bytes, bytes]]) -> bool:
    """Content-Type ``application/json`` (any parameters); other spellings the framework also accepts (``*+json``)
    take its path."""
    for name, value in headers:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False
