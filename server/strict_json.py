"""Request bodies read as JSON as RFC 8259 defines it, on every route the framework parses a body for.

The framework reads a JSON body with ``json.loads(bytes)``, which also takes UTF-16 and UTF-32 bodies, a UTF-8
byte-order mark, bytes that are not UTF-8 inside a string (decoded with ``surrogatepass``) and ``NaN`` or
``Infinity``: bodies the API refuses as not JSON (422 ``invalid_json``: README, API) and its fast path
(``server.fastpath``) and the v2 route (orjson) refused, so the same body was refused on one path and answered on
another. ``StrictJsonRoute`` has the framework read bodies with ``strict_json`` instead; what it refuses reaches
``server.http``'s handlers as a body the framework could not parse, which answer 422 ``invalid_json`` naming why.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

from fastapi import Request, Response
from fastapi.routing import APIRoute

BYTE_ORDER_MARK = b"\xef\xbb\xbf"


def strict_json(body: bytes) -> Any:
    """``body`` parsed as JSON: UTF-8 without a byte-order mark, and no ``NaN`` or ``Infinity``. Raises
    ``UnicodeDecodeError`` (``server.http.unparseable`` names the byte), ``json.JSONDecodeError`` or ``ValueError``."""
    if body.startswith(BYTE_ORDER_MARK):
        raise ValueError("it starts with a byte-order mark; send UTF-8 without one")
    return json.loads(body.decode("utf-8"), parse_constant=_no_constant)


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value (JSON has no NaN or Infinity); send a number or a string")


class StrictJsonRequest(Request):
    """A request whose ``json()`` is ``strict_json``."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_json(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    """A route whose body the framework reads with ``strict_json`` (``APIRouter(route_class=StrictJsonRoute)``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict
