"""Request bodies read as JSON as RFC 8259 defines it, on every route the framework parses a body for.

The framework reads a JSON body with ``json.loads(bytes)``, which also takes UTF-16 and UTF-32 bodies, a UTF-8
byte-order mark, bytes that are not UTF-8 inside a string (decoded with ``surrogatepass``) and ``NaN`` or
``Infinity``: bodies the API refuses as not JSON (422 ``invalid_json``: README, API) and its fast path
(``server.fastpath``) and the v2 route (orjson) refused, so the same body was refused on one path and answered on
another. ``StrictJsonRoute`` has the framework read bodies with ``strict_json`` instead; what it refuses reaches
``server.http``'s handlers as a body the framework could not parse, which answer 422 ``invalid_json`` naming why.

An object that holds a key twice is refused too (I-JSON, RFC 7493: names MUST be unique). Every reader here kept
the last copy, so ``{"text": "a", "text": "b"}`` classified "b", where a proxy or firewall in front that reads the
first copy judged another request than the one answered (red team helper-100). The readers that take a body
without ``strict_json`` (the fast path's pydantic-core, v2's orjson) ask ``repeats_a_key`` after their parse.
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
    return json.loads(body.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=_unique_keys)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """An object's members as a dict, or ``ValueError`` naming a key it holds twice."""
    document = dict(pairs)
    if len(document) < len(pairs):
        seen: set[str] = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"the key {repeated[:100]!r} is sent twice in one object (send each key once: a reader of "
                         "either copy would see another request)")
    return document


def repeats_a_key(body: bytes | bytearray | memoryview, keys_read: int) -> bool:
    """Whether JSON ``body``, which a reader took as holding ``keys_read`` keys in all its objects, writes more: a
    key repeated in an object, of which the reader kept one copy. Each key written is followed by a colon outside
    any string, so no more colons than keys read answers at once (the usual body: its texts hold no colon);
    otherwise the colons outside strings are counted (``colons_outside_strings``)."""
    body = body.tobytes() if isinstance(body, memoryview) else body
    return body.count(b":") > keys_read and colons_outside_strings(body) > keys_read


def colons_outside_strings(body: bytes | bytearray) -> int:
    """The colons of valid JSON ``body`` that are not inside a string. A backslash occurs only in a string, where
    it escapes the next character: with the escaped backslashes taken out (pairs from the left, as a reader pairs
    them) and then the escaped quotes, every quote left opens or closes a string, and what lies between a closing
    and the next opening quote is outside. 3.5 ms for 0.8 MiB of escaped texts on the 2-core VM, where a regex over
    the strings took 12.6."""
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    return sum(part.count(b":") for part in unescaped.split(b'"')[::2])


def keys_in(document: Any) -> int:
    """How many keys the objects of a parsed JSON ``document`` hold, nested ones included."""
    if isinstance(document, dict):
        return len(document) + sum(keys_in(value) for value in document.values() if isinstance(value, dict | list))
    if isinstance(document, list):
        return sum(keys_in(value) for value in document if isinstance(value, dict | list))
    return 0


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
