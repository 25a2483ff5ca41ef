"""HTTP plumbing: one ASGI middleware (request id, body limit, metrics, error logs) and error handlers.

Pure ASGI rather than ``BaseHTTPMiddleware``: it adds microseconds, not a task per request.
Errors are JSON ``{"error": "<what to fix>"}``; shedding carries ``Retry-After``.
"""

from __future__ import annotations

import logging
import math
import time
import uuid

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from server.logging_setup import request_id_var
from server.metrics import Metrics
from server.primitives import ServerError

log = logging.getLogger("server.http")


class PayloadTooLarge(ServerError):
    status_code = 413


class ObservedASGI:
    def __init__(self, app, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = {"code": 500}
        limit = self.max_body_bytes
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"request body exceeds {limit} bytes (MAX_REQUEST_BYTES); send fewer texts")
            return message

        async def observed_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode("latin-1")))
            await send(message)

        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
            if declared > limit:
                response = error_response(413, f"request body of {declared} bytes exceeds {limit} "
                                               "(MAX_REQUEST_BYTES); send fewer or shorter texts")
                self.metrics.rejected.labels("too_large").inc()
                return await response(scope, receive, observed_send)
            return await self.app(scope, limited_receive, observed_send)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.request_latency.labels(endpoint).observe(elapsed)
            if status["code"] >= 500 and status["code"] != 503:
                log.error("%s %s -> %d in %.1f ms", scope["method"], scope["path"], status["code"], elapsed * 1000)
            request_id_var.reset(token)


def json_response(content: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """orjson-encoded JSON: the hot path skips response-model validation."""
    return Response(orjson.dumps(content), status_code=status, headers=headers, media_type="application/json")


def error_response(status: int, message: str, retry_after: float | None = None,
                   headers: dict[str, str] | None = None, **extra) -> Response:
    headers = dict(headers or {})
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return json_response({"error": message, **extra}, status, headers or None)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(ServerError)
    async def _server_error(request: Request, exc: ServerError):
        if exc.status_code == 413:
            metrics.rejected.labels("too_large").inc()
        elif exc.status_code >= 500 and exc.retry_after is None:
            log.error("request failed: %s", exc.message)
        return error_response(exc.status_code, exc.message, exc.retry_after, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        metrics.rejected.labels("invalid").inc()
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {err.get('msg')}")
        detail = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return error_response(422, "invalid request: " + "; ".join(problems), detail=detail)
