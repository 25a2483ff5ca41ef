"""HTTP plumbing: one ASGI middleware, the one error format, its handlers, and the errors in the OpenAPI document.

Every error the server sends, the web framework's included, is JSON ``{"error": "<what to fix>", "type":
"<machine-readable>"}`` (``schemas.ErrorResponse``); shedding carries ``Retry-After``. The middleware is pure
ASGI rather than ``BaseHTTPMiddleware``: it adds microseconds, not a task per request. It

- gives each request an id (``X-Request-ID``, the client's if it sent one), on the response and every log line;
- refuses a ``Content-Encoding`` other than ``identity`` (415): the server does not decompress, and a compressed
  body would be parsed as garbage or slip past the size limit;
- refuses a ``Transfer-Encoding`` other than plain ``chunked`` (400, the connection closed) for the same reason;
- holds the body to ``MAX_REQUEST_BYTES`` whether its length is declared or it arrives chunked (413, then the
  connection is closed rather than read to the end);
- holds all the bodies in memory at once to the memory plan's ``body_bytes`` (``server.budget.BodyBudget``, from
  ``services.memory_guard.bodies``): a body is counted from its first byte until its request is answered (the
  body, its parse and its texts live that long), as its bytes arrive, and on until its answer is written out
  when more than the transport's high-water mark of it waits unsent (``server.connections.written_out``: its
  client is not reading; an answer is at most its body's size and a few tens of KB). Beyond it, 503
  ``body_memory_full`` + Retry-After: before the app runs for a declared length that cannot fit now, else from
  inside the body's reading; uvicorn reads the rest of the body and drops it, so a client still sending reads its
  answer, and the connection stays open;
- answers ``HEAD`` on every ``GET`` route as that ``GET`` without the body;
- turns any exception nothing else handled into a JSON 500 carrying the request id, and logs its traceback at
  ERROR: a client never sees a traceback or a plain-text body;
- counts every request by endpoint and status (499 when the client left before its answer was sent:
  ``server.connections.client_left``), and each refusal no other layer counts in
  ``sentiment_rejected_requests_total`` (``REJECTED_BY_STATUS``).

A body error is never answered to a caller without a valid key on a route that needs one: the handlers check the
key first when the framework refused the body before the route's key dependency ran (a body that is not JSON:
``server.auth.check_key_before_body``), so such a caller gets 401/403 whatever its body.

Choices the contract leaves open (also in the README's API section): a body that is not JSON at all (bad syntax,
not UTF-8, nested past Python's recursion limit, a number of more than 4,300 digits) is 422 ``invalid_json``, like
JSON of the wrong shape (422 ``invalid_input``); a JSON body must be sent as ``Content-Type: application/json`` (or
``*+json``), anything else or none is 415 (the framework would not parse it, and a browser can send text/plain
cross-site without a preflight); paths are exact: ``/predict/`` is a 404, never a redirect (the framework's
redirect built its ``Location`` from the client's ``Host`` header).
"""

from __future__ import annotations

import email.message
import email.utils
import logging
import math
import time
from collections.abc import Iterable, Iterator

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from server.auth import check_key_before_body, refusal_before_body
from server.budget import BodyBudget
from server.connections import client_left, written_out
from server.logging_setup import request_id_var
from server.metrics import Metrics
from server.primitives import ServerError, request_id_from
from server.schemas import AT, ERRORS_SHOWN, ErrorResponse, max_texts_var
from server.services import Services

log = logging.getLogger("server.http")

STATUS_TYPES = {  # an error's "type" when nothing more specific names it
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}
# sentiment_rejected_requests_total{reason} for the refusals counted here; 401/403 (server/auth.py) and 503
# (the batcher, routes, the store) are counted where they are decided.
CLIENT_LEFT = 499  # the status a request whose client left before its answer was sent is counted under
REJECTED_BY_STATUS = {400: "invalid", 404: "not_found", 405: "invalid", 413: "too_large",
                      415: "unsupported_media_type", 422: "invalid"}


class BodyTooLarge(HTTPException):
    """Raised inside ``receive``: an ``HTTPException`` because FastAPI's body parsing re-raises those as they are
    (any other exception there becomes a 400 "There was an error parsing the body")."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds {limit} bytes (MAX_REQUEST_BYTES); send a smaller body (fewer or "
                         "shorter texts)", headers={"Connection": "close"})


BODY_RETRY_AFTER_S = 1  # bodies in flight are answered within a request's time: soon there is room again
SKIPPED_BODY_MAX_BYTES = 64 * 1024  # an unread body up to this (declared) is skipped, the connection kept


class BodiesFull(HTTPException):
    """Raised inside ``receive`` when a chunked body's next bytes would pass the bodies' budget (an
    ``HTTPException``, as ``BodyTooLarge`` is, for the same reason)."""

    error_type = "body_memory_full"

    def __init__(self, bodies: BodyBudget) -> None:
        super().__init__(503, bodies_full_message(bodies), headers={"Retry-After": str(BODY_RETRY_AFTER_S)})


class BodyMemoryFull(ServerError):
    """The bodies' budget is full for a body not yet read (its declared length) or a gRPC message: 503 +
    Retry-After."""

    status_code = 503
    error_type = "body_memory_full"
    retry_after = BODY_RETRY_AFTER_S


def bodies_full_message(bodies: BodyBudget) -> str:
    return (f"server busy: request bodies being received or answered already hold {bodies.held} of the "
            f"{bodies.limit} bytes its memory plan allows them (derived from the memory limit); retry after the "
            "Retry-After delay, or send smaller requests")


class ObservedASGI:
    def __init__(self, app, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    @staticmethod
    def services(scope) -> Services | None:
        """The app's services (None before they exist)."""
        return getattr(getattr(scope.get("app"), "state", None), "services", None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # a header sent twice counts by its first copy, as the key headers and gRPC metadata do
        sent_id = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"")
        request_id = request_id_from(sent_id.decode("latin-1"))
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        services = self.services(scope)
        # Lists of texts in the body are refused by their count before their items are read (server.schemas).
        limit_token = max_texts_var.set(services.settings.max_texts_per_request if services else None)
        head = scope["method"] == "HEAD"
        if head:  # RFC 9110 9.3.2: the GET without its body (the server still sends GET's Content-Length)
            scope = {**scope, "method": "GET"}
        started = time.perf_counter()
        response = {"status": 500, "started": False, "body_read": False}
        limit = self.max_body_bytes
        received = reserved = 0
        answered_at: float | None = None
        guard = getattr(services, "memory_guard", None)
        bodies: BodyBudget | None = None if guard is None else guard.bodies  # the memory plan's body budget

        async def limited_receive():
            nonlocal received, reserved
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                response["body_read"] = True  # all of it, or the client left
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                if bodies is not None and received > reserved:  # held as it arrives
                    if not bodies.reserve(received - reserved):
                        self.metrics.rejected.labels("body_memory_full").inc()
                        raise BodiesFull(bodies)
                    reserved = received
            return message

        async def observed_send(message):
            if message["type"] == "http.response.start":
                response.update(status=message["status"], started=True)
                headers = message.setdefault("headers", [])
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                if not response["body_read"] and unbounded_body(scope) and not closes(headers):
                    # Answered before its body was read (refused on its headers, a 404, a 401), and that body is
                    # not a small one the connection can skip: the connection goes. Kept, it read and discarded
                    # the body until the body deadline (a declared 10 GB; a chunked one that never ends, 105 GB in
                    # 30 s) or, when the client waited for ``100 Continue`` and so may never send it (RFC 9110
                    # 10.1.1), took the next request for it (red teams helper-79 to helper-81). A small declared
                    # body is skipped, as before: the requests pipelined behind it are answered. The close lingers
                    # while the body still arrives (``server.connections``), so the answer is read.
                    headers.append((b"connection", b"close"))
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        logged = False
        try:
            if scope["path"].endswith("\n"):  # the routes' patterns end in "$", which matches before a final "\n"
                return await not_found(scope["path"])(scope, receive, observed_send)
            if scope["path"] == "*":
                return await server_wide(scope)(scope, receive, observed_send)
            refusal = self.refusal(scope["headers"])
            if refusal is None and services is not None and sends_body(scope):
                refused = await refusal_before_body(services, scope, route_of)
                if refused is not None:  # its body is never read: the connection goes
                    refused.headers = {**(refused.headers or {}), "Connection": "close"}
                    refusal = server_error_response(refused)
            if refusal is None and bodies is not None:
                # A declared body that cannot fit now is refused before it is read; one that can is held as its
                # bytes arrive (``limited_receive``), not in full at once: a client that declares a large body and
                # sends nothing would otherwise hold its share until REQUEST_TIMEOUT_S, and a few such connections
                # (five at a 1g limit) refused every other body.
                declared = int(every_copy(scope["headers"], b"content-length").strip() or 0)  # refusal() checked
                if not bodies.has_room(declared):
                    self.metrics.rejected.labels("body_memory_full").inc()
                    refusal = server_error_response(BodyMemoryFull(bodies_full_message(bodies)))
            if refusal is not None:
                scope["route"] = route_of(scope)  # counted under the route it was sent to, not ``unmatched``
                return await refusal(scope, receive, observed_send)
            await self.app(scope, limited_receive, observed_send)
            if reserved:  # the body's share holds its answer too while that waits unsent in the process
                answered_at = time.perf_counter()
                await written_out(scope)
        except Exception:
            logged = True
            log.exception("unexpected error answering %s %s", scope["method"], scope["path"])
            if not response["started"]:  # else the server closes the connection mid-response
                await internal_error(request_id)(scope, receive, observed_send)
        finally:
            if bodies is not None:
                bodies.release(reserved)
            endpoint = endpoint_label(scope)
            elapsed = (answered_at or time.perf_counter()) - started  # not the client's reading of its answer
            status = CLIENT_LEFT if client_left(scope) else response["status"]
            self.metrics.count_request(endpoint, status, elapsed)
            if status in REJECTED_BY_STATUS:
                self.metrics.rejected.labels(REJECTED_BY_STATUS[status]).inc()
            if status >= 500 and status != 503 and not logged and not scope["state"].get("error_logged"):
                log.error("%s %s -> %d in %.1f ms", scope["method"], scope["path"], status, elapsed * 1000)
            request_id_var.reset(token)
            max_texts_var.reset(limit_token)

    def refusal(self, headers: list[tuple[bytes, bytes]]) -> Response | None:
        """The answer to a request refused on its headers alone, before the app sees it; None to go on. A coding
        header sent twice is read whole, every copy (RFC 9110 5.3: they make one list): by its last copy alone,
        ``gzip`` then ``identity`` was taken as an uncompressed body (red team helper-65). Content-Type holds one
        value, not a list: sent twice, the first copy was read here and a proxy in front may read the last, so the
        request is refused rather than guessed at (after the refusals of the body's framing and size, which end
        the connection)."""
        encodings = codings(every_copy(headers, b"content-encoding"))
        if any(coding != "identity" for coding in encodings):
            return error_response(415, f"Content-Encoding {', '.join(encodings)!r} is not supported: send the body "
                                       "uncompressed (identity)")
        transfer = codings(every_copy(headers, b"transfer-encoding"))
        if any(coding != "chunked" for coding in transfer):
            # RFC 9112 would have 501; a 400 keeps a client's coding out of the server-error rate operators alert on
            return error_response(400, f"Transfer-Encoding {', '.join(transfer)!r} is not supported: send the body "
                                       "with Content-Length or as plain chunked, uncompressed",
                                  headers={"Connection": "close"})
        declared = every_copy(headers, b"content-length").strip() or "0"  # two copies: refused by the parser
        if byte_count(declared) is None:
            return error_response(400, f"Content-Length {declared[:20]!r} is not a number of bytes")
        if int(declared) > self.max_body_bytes:
            return error_response(413, f"request body of {declared} bytes exceeds {self.max_body_bytes} "
                                       "(MAX_REQUEST_BYTES); send a smaller body (fewer or shorter texts)",
                                  headers={"Connection": "close"})
        types = sum(name == b"content-type" for name, _ in headers)
        if types > 1:
            return error_response(400, f"Content-Type sent {types} times: send it once, as "
                                       "'Content-Type: application/json'")
        if types and (transfer or int(declared)):  # a body comes: read as UTF-8 whatever it says
            return charset_refusal(every_copy(headers, b"content-type"))
        return None


def unbounded_body(scope) -> bool:
    """Whether a request's body, left unread, could not be skipped in bounded time and memory: chunked, declared
    over ``SKIPPED_BODY_MAX_BYTES``, or awaited by a client that waits for ``100 Continue`` (it may never come)."""
    chunked = waits = False
    declared: int | None = 0
    for name, value in scope["headers"]:
        if name == b"transfer-encoding":
            chunked = True
        elif name == b"expect" and b"100-continue" in value.lower():
            waits = True
        elif name == b"content-length":  # a count ``byte_count`` cannot read (4,301 zeros and a 5) is not skipped
            declared = byte_count(value.decode("latin-1").strip())
    return chunked or declared is None or declared > SKIPPED_BODY_MAX_BYTES or (waits and declared > 0)


def closes(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a response's headers already end its connection."""
    return any(name.lower() == b"connection" and b"close" in value.lower() for name, value in headers)


def sends_body(scope) -> bool:
    """Whether a request other than GET or HEAD declares a body (a Content-Length over 0, or chunked)."""
    if scope["method"] in ("GET", "HEAD"):
        return False
    return any(name == b"transfer-encoding" or (name == b"content-length" and value.strip(b" \t0"))
               for name, value in scope["headers"])


def every_copy(headers: list[tuple[bytes, bytes]], name: bytes) -> str:
    """Every copy of header ``name``, joined as one list (``a, b``), as text."""
    return ", ".join(value.decode("latin-1") for field, value in headers if field == name)


UTF8_NAMES = ("utf-8", "utf8", "us-ascii", "ascii")  # charsets a UTF-8 reader reads as sent (ASCII is within it)


def charset_refusal(content_type: str) -> Response | None:
    """The answer to a JSON or text body declared in a charset other than UTF-8 (415), or with its charset named
    more than once (400, as a Content-Type sent twice: a reader of the other copy would read other text); None to
    go on. Such a body was read as UTF-8 whatever it said: UTF-16 refused as "not UTF-8", and in a charset whose
    ASCII bytes agree, read as other text than the client sent (red team helper-100). A binary body
    (``application/octet-stream``: v2's binary-data extension) and a request without a body are not judged by it
    (red team helper-102: ``GET /ready`` with a charset was refused)."""
    if "charset" not in content_type.lower():  # the usual request: no parameter to parse
        return None
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "text" and not is_json(content_type):
        return None  # binary, or a type the routes refuse for itself
    charsets = [str(email.utils.collapse_rfc2231_value(value)).strip().lower()
                for name, value in message.get_params()[1:] if name.lower() == "charset"]
    if len(charsets) > 1:
        return error_response(400, f"Content-Type names a charset {len(charsets)} times: name it once (a reader "
                                   "of another copy would read the body as other text)")
    if charsets and charsets[0] not in UTF8_NAMES:
        return error_response(415, f"Content-Type says charset={charsets[0][:40]!r}, but bodies are read as UTF-8 "
                                   "(RFC 8259): send the body in UTF-8, with charset=utf-8 or no charset")
    return None


def codings(value: str) -> list[str]:
    """The codings a Content-Encoding or Transfer-Encoding list names, lowercased."""
    return [coding.strip().lower() for coding in value.split(",") if coding.strip()]


def byte_count(text: str) -> int | None:
    """A header's byte count, or None unless it is ASCII digits that fit 64 bits: ``str.isdigit`` also takes '²',
    which ``int`` refuses (a 500), and ``int`` refuses more than 4300 digits."""
    return int(text) if len(text) <= 19 and text.isascii() and text.isdigit() else None


def route_of(scope) -> object | None:
    """The API route the app would take the request to (None: none takes it), for a request refused before it."""
    return next((route for route in api_routes(scope["app"].router.routes) if route.matches(scope)[0] == Match.FULL),
                None)


ROOT_LIVENESS = "GET /"  # KServe v1's liveness probe, on the path of TEI's inference (``POST /``)
UNMATCHED = "unmatched"  # the endpoint of a request no route (no gRPC method) serves


def endpoint_label(scope) -> str:
    """The request metrics' ``endpoint``: the matched route's path as documented (without convertors); the path
    itself for the framework's own routes without parameters (``/openapi.json``, ``/docs``: matched, but their
    scope names no route); ``unmatched`` for anything else, so a client cannot add label values. The one path two
    routes share, ``/``, is told apart by method: counted together, KServe's liveness probes (``GET /``) diluted the
    inference alerts' ratios of TEI's predictions (``POST /``): a probe at 2/s hid 10 % of clients giving up."""
    route = scope.get("route")
    if route is not None:
        path = getattr(route, "path_format", UNMATCHED)
        return ROOT_LIVENESS if path == "/" and "POST" not in getattr(route, "methods", ()) else path
    return scope["path"] if "endpoint" in scope and not scope.get("path_params") else UNMATCHED


def json_response(content: object, status: int = 200, headers: dict[str, str] | None = None,
                  response_class: type[Response] = Response) -> Response:
    """orjson-encoded JSON: the hot path skips response-model validation."""
    return response_class(orjson.dumps(content), status_code=status, headers=headers, media_type="application/json")


class LoggedError(Response):
    """A 5xx whose cause is logged already (by ``server_error_response``, or throttled where it was raised):
    ``ObservedASGI`` adds no ``-> 500`` ERROR line of its own for the request."""

    async def __call__(self, scope, receive, send) -> None:
        scope.setdefault("state", {})["error_logged"] = True
        await super().__call__(scope, receive, send)


def error_response(status: int, message: str, retry_after: float | None = None,
                   headers: dict[str, str] | None = None, *, error_type: str | None = None,
                   response_class: type[Response] = Response, **extra) -> Response:
    """The one error body: ``error`` says what to fix, ``type`` (default: the status's) lets a program branch."""
    headers = dict(headers or {})
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    body = {"error": message, "type": error_type or STATUS_TYPES.get(status, f"http_{status}"), **extra}
    return json_response(body, status, headers or None, response_class)


def not_ready_response(refusal: ServerError, **extra) -> Response:
    """A readiness probe's 503 (``Services.not_ready``), with the probe's own fields."""
    return error_response(refusal.status_code, refusal.message, refusal.retry_after, error_type=refusal.error_type,
                          **extra)


def internal_error(request_id: str) -> Response:
    return error_response(500, f"internal server error; it is logged under request id {request_id}: quote it "
                               "when you report this", request_id=request_id)


def server_error_response(exc: ServerError) -> Response:
    """The answer to a ``ServerError`` (its status, message, type, Retry-After and headers); a 5xx that is not
    shedding (no Retry-After) is logged."""
    if exc.logged_per_request:
        log.error("request failed: %s", exc.message)
    return error_response(exc.status_code, exc.message, exc.retry_after, exc.headers, error_type=exc.error_type,
                          response_class=LoggedError if exc.status_code >= 500 else Response)


def let_go(error: BaseException) -> None:
    """Drop the tracebacks of an error being answered, and of the errors it came from.

    A traceback holds the frames the error passed through, and a frame that holds the error makes a reference
    cycle (FastAPI's ``raise validation_error from e``: every body that is not JSON). The cycle held the request's
    body (``JSONDecodeError.doc`` is all of it) until the cyclic garbage collector ran, which the server runs
    seldom (``server.heap``): 1,400 refused 40-400 KB bodies held ~40 MB. The answer never shows a traceback."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        error.__traceback__ = None
        error = error.__cause__ or error.__context__


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    async def _server_error(request: Request, exc: ServerError):
        let_go(exc)
        return server_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        let_go(exc)
        refused = await key_refusal(request)
        if refused is not None:
            return refused
        errors = exc.errors()
        content_type = request.headers.get("content-type")
        if any(err.get("loc", ())[:1] == ("body",) for err in errors) and has_body(request) \
                and not is_json(content_type):
            sent = f"not {content_type!r}" if content_type else "none was sent"
            return error_response(415, f"send the body as JSON with 'Content-Type: application/json' ({sent})")
        for err in errors:
            if err.get("type") == "json_invalid":
                where = err.get("loc", ("body", "?"))[-1]
                # Python's own message may end in "at" already ("Invalid control character at")
                said = str(err.get("ctx", {}).get("error")).removesuffix(" at")
                return error_response(422, f"the body is not valid JSON: {said} at character {where}",
                                      error_type="invalid_json")
        shown = errors[:ERRORS_SHOWN]  # a body of 100,000 unknown keys has as many errors: a 14 MB answer
        problems = [f"{location(error_place(err))}: {problem_message(err)}" for err in shown]
        if len(errors) > len(shown):
            problems.append(f"and {len(errors) - len(shown)} more problems")
        detail = [{"loc": error_place(e), "msg": problem_message(e), "type": e.get("type")} for e in shown]
        return error_response(422, "invalid request: " + "; ".join(problems), detail=detail)

    @app.exception_handler(HTTPException)
    async def _framework_error(request: Request, exc: HTTPException):
        """The framework's own errors (404, 405, a body it could not parse) in the one format."""
        let_go(exc)
        cause = exc.__cause__
        if exc.status_code == 400 and cause is not None:  # FastAPI: "There was an error parsing the body"
            if isinstance(cause, ServerError):  # raised while the body was read: it says what went wrong itself
                return await _server_error(request, cause)
            if isinstance(cause, ClientDisconnect):
                return error_response(400, "the client closed the connection before the body ended")
            refused = await key_refusal(request)
            if refused is not None:
                return refused
            return error_response(422, f"the body is not valid JSON: {unparseable(cause)}", error_type="invalid_json")
        if exc.status_code == 404:
            return not_found(request.url.path)
        if exc.status_code == 405:
            allowed = allowed_methods(request)
            return error_response(405, f"{request.method} is not allowed on {request.url.path}; use "
                                       f"one of {', '.join(allowed)}", headers={"Allow": ", ".join(allowed)})
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers,
                              error_type=getattr(exc, "error_type", None))


async def key_refusal(request: Request) -> Response | None:
    """The answer to a request whose body is refused before its route's key was checked (``server.auth
    .check_key_before_body``) and whose key is not valid (401/403, or 503 when it cannot be checked); None when
    the body's error is the answer."""
    try:
        await check_key_before_body(request)
    except ServerError as refused:
        let_go(refused)
        return server_error_response(refused)
    return None


def not_found(path: str) -> Response:
    return error_response(404, f"no such path {path!r}; the API is described at /docs")


def server_wide(scope: dict) -> Response:
    """The answer to the request target ``*`` (RFC 9112 3.2.4, asterisk-form: the server as a whole, not a path):
    to OPTIONS, 204 with every method some operation of the API accepts (read from its OpenAPI document, built at
    start-up);
    any other method has nothing to act on, so 400 (both were a 404 naming the path '/*')."""
    operations = scope["app"].openapi()["paths"].values()
    methods = sorted({method.upper() for path in operations for method in path} | {"HEAD"})  # HEAD: any GET's
    if scope["method"] == "OPTIONS":
        return Response(status_code=204, headers={"Allow": ", ".join(methods)})
    return error_response(400, f"the request target '*' names no resource: it is for OPTIONS only (which methods "
                               f"this server accepts: {', '.join(methods)}); send {scope['method']} to a path such "
                               "as /predict")


def error_place(error: dict) -> list[object]:
    """A validation error's place: its ``loc``, and inside that field the index of the item at fault when the
    field's own validator names one (``schemas.AT``: TEI's ``inputs`` is one field holding every text)."""
    loc = list(error.get("loc", ()))
    at = (error.get("ctx") or {}).get(AT)
    return loc if at is None else [*loc, at]


def problem_message(error: dict) -> str:
    """A validation error's words, pydantic's unless they do not say what to fix: a string holding an unpaired
    surrogate escape where no validator of ours looks (an object's key, a label, an option's value) is
    "Input should be a valid string, unable to parse raw data as a unicode string"."""
    if error.get("type") == "string_unicode":
        return UNPAIRED_SURROGATE
    return str(error.get("msg"))


UNPAIRED_SURROGATE = ("contains an unpaired surrogate (a JSON \\uD800-\\uDFFF escape must be half of a pair, in a "
                      "name as in a value); send valid Unicode")


def location(loc: Iterable[object]) -> str:
    """``("body", "texts", 3)`` -> ``texts[3]``: where in the request a problem is, as the client spelled it."""
    parts = list(loc)
    if parts[:1] in (["body"], ["query"], ["path"], ["header"], ["cookie"]) and len(parts) > 1:
        parts = parts[1:]
    where = ""
    for part in parts:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    return where or "body"


def unparseable(cause: BaseException) -> str:
    if isinstance(cause, UnicodeDecodeError):
        return f"it is not UTF-8 (byte 0x{cause.object[cause.start]:02x} at offset {cause.start})"
    if isinstance(cause, RecursionError):
        return "it is nested too deeply"
    return str(cause).split(";")[0]  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"


def has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    return "transfer-encoding" in request.headers or (length is not None and length.strip() not in ("", "0"))


def is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route accepts on this path (the router's 405 names only the first route's)."""
    def accepts(method: str) -> bool:
        scope = {"type": "http", "path": request.url.path, "root_path": "", "method": method, "headers": []}
        return any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes)

    methods = {method for method in METHODS if accepts(method)}
    return sorted(methods | {"HEAD"} if "GET" in methods else methods)


ERROR_DESCRIPTIONS = {
    401: "No API key, or an invalid or revoked one",
    403: "The API key lacks the role this operation needs",
    404: "Not found",
    409: "Conflict",
    413: "Body over MAX_REQUEST_BYTES, or too many or too long texts",
    415: "The body is not sent as application/json, is compressed, or is declared in a charset other than UTF-8",
    422: "The body or a parameter is not what the operation accepts",
    500: "Unexpected server error, logged under the request id in the body",
    503: "Unavailable: draining, overloaded, or the database is down; retry after Retry-After",
}
ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """``responses=`` for a route's own error statuses (e.g. a 404), in the one error format."""
    return {status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS.get(status, "Error")}
            for status in statuses}


def document_errors(app: FastAPI) -> None:
    """List each operation's error responses in the OpenAPI document, every one as ``ErrorResponse``.

    Inferred from the route: 500 for all; 413, 415 and 422 with a request body; 422 with parameters (replacing
    FastAPI's own 422 schema, which is not what the server sends); 401, 403 and 503 (a key check needs the
    database) with an API-key dependency. A route declares any other error itself with ``error_responses()``.

    The lifespan builds the document at start-up: built on first use, it held the event loop ~48 ms (~100 ms on a
    slower VM) inside the first ``GET /openapi.json`` or ``OPTIONS *``, and every request in flight waited.
    """
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            _add_error_responses(generate(), app.routes)
        return app.openapi_schema

    app.openapi = openapi


def _add_error_responses(document: dict, routes: Iterable[object]) -> None:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    for route in api_routes(routes):
        if not route.include_in_schema:
            continue
        statuses = {500}
        if route.body_field is not None:
            statuses |= {413, 415, 422}
        if _needs_api_key(route.dependant):
            statuses |= {401, 403, 503}
        for method in route.methods:
            responses = document["paths"][route.path_format][method.lower()]["responses"]  # routers have no prefix
            if "422" in responses:
                responses["422"] = {"description": ERROR_DESCRIPTIONS[422], "content": ERROR_CONTENT}
            for status in sorted(statuses):
                responses.setdefault(str(status), {"description": ERROR_DESCRIPTIONS[status],
                                                   "content": ERROR_CONTENT})
    for unused in ("HTTPValidationError", "ValidationError"):
        if f'"#/components/schemas/{unused}"' not in orjson.dumps(document.get("paths", {})).decode():
            schemas.pop(unused, None)


def api_routes(routes: Iterable[object]) -> Iterator[APIRoute]:
    """The app's API routes: newer FastAPI (0.165 here) keeps an included router's routes in it, not in
    ``app.routes``; older versions copy them there."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        yield from api_routes(getattr(getattr(route, "original_router", None), "routes", ()))


def _needs_api_key(dependant) -> bool:
    """Whether a dependency of the route checks an API key (``server.auth.require_role``)."""
    return any(getattr(dep.call, "__module__", None) == "server.auth" or _needs_api_key(dep)
               for dep in dependant.dependencies)
