"""API key checks as FastAPI dependencies, and the security log events they emit.

A key comes as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (over
gRPC, metadata of the same names: ``authorize``); when both are sent,
``Authorization`` decides. An ``Authorization`` header in any
other form is refused with 401 and told how to send the key: a bare key with
no scheme (it would work with one client and not the next, and proxies treat
such headers unpredictably), an empty ``Bearer``, or another scheme (Basic,
Digest, ...). Roles: ``predict`` (``/predict``, ``POST /feedback``) and
``admin`` (everything, including key management, reading predictions,
feedback export, model reload). AUTH_MODE=open lets requests without a key
through to ``predict`` endpoints (their predictions have no key id); a key
that *is* sent must still be valid, so bad keys surface before the switch to
AUTH_MODE=required. ``admin`` endpoints need an admin key in both modes.

The key is checked before anything about the body is answered: a caller without a valid key learns nothing
about the request's schema or its body's problems. The route's dependency does it before the body is validated;
a body that is not JSON at all is refused by the framework before its dependencies run, so its error handlers
(``server.http``) call ``check_key_before_body`` first. ``server.fastpath`` checks the key before classifying, and
gRPC before it refuses a message it cannot decode (``server.protocols.oip_grpc``).

Keys are checked against the in-process key cache (``server.store.keycache``):
no thread hop or database read for a key it knows, and keys it knows keep
working while the database is down.

Every refusal logs one WARNING containing ``security: 401`` or ``security: 403``
(the runbook greps ``401|403|security``) and counts
``sentiment_rejected_requests{reason="unauthorized"|"forbidden"}``. Logs name a
key by id when it is valid. An invalid Bearer or X-API-Key key is named by a
fingerprint: an HMAC-SHA256 under a secret made at start, so the same wrong
key repeated shows as one fingerprint and many fingerprints show guessing, but
a fingerprint cannot confirm a guessed key offline and differs between
processes. Credentials of another scheme or without a scheme get no
fingerprint at all: they may be passwords or keys meant for something else.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from server.logging_setup import one_line
from server.primitives import ServerError
from server.store.keycache import KeyCheckUnavailable
from server.store.keys import ROLES, ApiKey
from server.store.throttle import LineBudget

if TYPE_CHECKING:
    from server.services import Services

log = logging.getLogger(__name__)
REFUSAL_LINES_PER_MINUTE = 600  # 10 a second: a flood (27,000 a minute seen) is cut 45-fold
_refusal_lines = LineBudget(
    log, REFUSAL_LINES_PER_MINUTE,
    "security: %d refusals logged in this %.0f s: the rest are counted (sentiment_rejected_requests_total), not "
    "logged one by one",
    "security: %d more refusals in the last %.0f s were not logged one by one (at most %d a minute)")

HOW_TO_SEND = "send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
GRPC = "gRPC"  # the method a gRPC call's Caller names
HOW_TO_SEND_GRPC = ("send it as metadata 'authorization: Bearer <key>' or 'x-api-key: <key>' (lower-case names: gRPC "
                    "refuses others)")
SCHEME_SEPARATOR = re.compile(r"[ \t]+")  # RFC 9110 11.4 has spaces; a tab is taken too, not called "no scheme"
KNOWN_SCHEMES = frozenset({  # HTTP authentication schemes (IANA's registry and common others): safe to name back
    "basic", "digest", "hoba", "mutual", "negotiate", "ntlm", "oauth", "scram-sha-1", "scram-sha-256", "vapid",
    "dpop", "privatetoken", "concealed", "token", "apikey", "api-key", "aws4-hmac-sha256"})
_FINGERPRINT_SECRET = secrets.token_bytes(32)


class Unauthorized(ServerError):
    status_code = 401
    headers = {"WWW-Authenticate": 'Bearer realm="sentiment-analyzer"'}  # RFC 9110: a 401 names its scheme


class Forbidden(ServerError):
    status_code = 403


class MalformedCredentials(Exception):
    """An Authorization header that is not ``Bearer <key>``: what to tell the client and what to log."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


@dataclass(frozen=True)
class Caller:
    """Who asks for what, as the security log names it: ``POST /predict from 10.0.0.7``."""

    method: str
    path: str
    client: str

    @classmethod
    def of(cls, request: Request) -> Caller:
        """``request.url.path`` would drop a ``%0A`` or ``%0D`` from the path: the log names the one requested."""
        return cls(request.method, request.scope["path"], request.client.host if request.client else "-")


KEY_CHECKED = "api_key_checked"  # in the request's state once its route's key dependency has accepted the caller
ROLE_ATTRIBUTE = "api_key_role"  # on a key dependency: the role it demands (``route_role``)


def require_role(role: str) -> Callable[[Request], Awaitable[str | None]]:
    """A dependency returning the caller's key id, or None for a keyless request in open mode."""
    check_key = require_key(role)

    async def check(request: Request) -> str | None:
        found = await check_key(request)
        return found.id if found is not None else None

    setattr(check, ROLE_ATTRIBUTE, role)
    return check


def require_key(role: str) -> Callable[[Request], Awaitable[ApiKey | None]]:
    """A dependency returning the caller's key record (for routes that also need its role), or None as above."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")

    async def check(request: Request) -> ApiKey | None:
        found = await authenticate_caller(request.app.state.services, role, credentials(request.scope["headers"]),
                                          Caller.of(request))
        request.scope.setdefault("state", {})[KEY_CHECKED] = True
        return found

    setattr(check, ROLE_ATTRIBUTE, role)
    return check


def route_role(route: object) -> str | None:
    """The role the route's key dependency demands (``require_role``/``require_key``); None without one."""
    pending = [getattr(route, "dependant", None)]
    while pending:
        dependant = pending.pop()
        for dependency in getattr(dependant, "dependencies", ()):
            role = getattr(dependency.call, ROLE_ATTRIBUTE, None)
            if role is not None:
                return role
            pending.append(dependency)
    return None


CREDENTIAL_HEADERS = (b"authorization", b"x-api-key")


def credentials(headers: Iterable[tuple[bytes, bytes]] | Iterable[tuple[str, str]]) -> dict[str, str]:
    """The key headers of an ASGI scope (or gRPC metadata) as ``authorize`` reads them, decoded as the framework
    does. One sent more than once is its values joined by ", " (RFC 9110 5.3), which ``presented_key`` refuses: the
    first copy was taken, so a key a proxy appends was overridden by the client's own (red team helper-73)."""
    found: dict[str, str] = {}
    for name, value in headers:
        if isinstance(name, bytes):
            if name not in CREDENTIAL_HEADERS:
                continue
            name, value = name.decode(), value.decode("latin-1")
        elif name.encode() not in CREDENTIAL_HEADERS or not isinstance(value, str):
            continue
        found[name] = f"{found[name]}{SENT_TWICE}{value}" if name in found else value
    return found


SENT_TWICE = ", "  # between the values of a key header sent more than once: no key holds it


async def refusal_before_body(services: Services, scope: dict,
                              route_of: Callable[[dict], object | None]) -> ServerError | None:
    """For a request about to send a body (``server.http``): the 401 (or 503 ``key_check_unavailable``) its key
    gets, before a byte of the body is read; None to read it. Every route that takes a body needs a key with at
    least the predict role, which every key has; the route's own check still decides the role (403). A request
    without a key is refused naming the role its route (``route_of``) needs (an admin route's was told "predict"),
    and one no route takes is left to the router's 404.

    The bodies' memory budget is shared: 17 connections without a key, each declaring a 1 MB body and sending most
    of it, held all of it for REQUEST_TIMEOUT_S, and every keyed request got 503 ``body_memory_full`` meanwhile
    (red team helper-65). With no byte read, no ``100 Continue`` goes to a client that asked for one either."""
    sent = credentials(scope["headers"])
    if not sent and services.settings.auth_mode == "open":
        return None
    role = "predict"
    if not sent:
        role = route_role(route_of(scope))
        if role is None:  # no route, or none that needs a key: nothing the body could be refused for here
            return None
    client = scope.get("client")
    caller = Caller(scope["method"], scope["path"], client[0] if client else "-")
    try:
        await authenticate_caller(services, role, sent, caller)
    except (Unauthorized, KeyCheckUnavailable) as refused:
        return refused
    return None


async def check_key_before_body(request: Request) -> None:
    """The key check of the request's route, if the route needs a key and its dependency has not made it yet:
    raises 401/403 (or 503 ``key_check_unavailable``) as that dependency would.

    For the framework's error handlers, before they answer a body error: FastAPI reads a JSON body before it
    solves the route's dependencies, so a body that is not JSON (or not UTF-8, or nested too deeply) is refused
    before the key is checked; answered as it is, it would tell a caller without a valid key about the body. A
    body refused by validation comes after the dependency (``KEY_CHECKED``), and is not checked twice."""
    if request.scope.get("state", {}).get(KEY_CHECKED):
        return
    role = route_role(request.scope.get("route"))
    if role is not None:
        await require_key(role)(request)  # the dependency's own check, which marks the request (``KEY_CHECKED``)


async def authorize(services: Services, role: str, headers: Mapping[str, str], caller: Caller) -> str | None:
    """The key id for ``role`` from HTTP headers or gRPC metadata (lower-case names); raises 401/403 errors."""
    found = await authenticate_caller(services, role, headers, caller)
    return found.id if found is not None else None


async def authenticate_caller(services: Services, role: str, headers: Mapping[str, str],
                              caller: Caller) -> ApiKey | None:
    """The key record for ``role``, or None for a keyless request in open mode; raises 401/403 errors."""
    try:
        key = presented_key(headers)
    except MalformedCredentials as bad:
        raise _refuse(services, caller, Unauthorized(bad.message), bad.detail) from None
    if key is None:
        if role == "predict" and services.settings.auth_mode == "open":
            return None
        raise _refuse(services, caller, Unauthorized(f"an API key with role {role} is required: {HOW_TO_SEND}"),
                      "missing API key")
    try:
        found = await services.keys.authenticate(key)
    except KeyCheckUnavailable:
        services.metrics.rejected.labels("key_unverifiable").inc()
        raise
    if found is None:
        raise _refuse(services, caller, Unauthorized("invalid API key: check it, or ask an administrator for a new "
                                                     "one"), f"invalid API key (fingerprint {fingerprint(key)})")
    if found.revoked_at is not None:
        raise _refuse(services, caller, Unauthorized("this API key has been revoked: ask an administrator for a new "
                                                     "one"), f"revoked API key id={found.id} name={found.name!r}")
    if not found.allows(role):
        message = f"this API key has role {found.role}; {caller.path} needs role {role}"
        detail = f"API key id={found.id} name={found.name!r} role={found.role} lacks role {role}"
        raise _refuse(services, caller, Forbidden(message), detail)
    return found


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key from ``Authorization: Bearer <key>`` or ``X-API-Key``; None when neither is sent.

    Raises ``MalformedCredentials`` for an ``Authorization`` header in any other form, and for either sent twice
    (``credentials``).
    """
    for name in ("authorization", "x-api-key"):
        if SENT_TWICE in headers.get(name, ""):
            raise MalformedCredentials(f"send one key, in one header: {HOW_TO_SEND}",
                                       f"{name} sent more than once (not checked, not fingerprinted)")
    authorization = headers.get("authorization", "").strip()
    if not authorization:
        return headers.get("x-api-key", "").strip() or None
    scheme, *rest = SCHEME_SEPARATOR.split(authorization, maxsplit=1)
    credentials = rest[0].strip() if rest else ""
    if scheme.lower() == "bearer":
        if not credentials:
            raise MalformedCredentials(f"the Authorization header has no key after 'Bearer': {HOW_TO_SEND}",
                                       "Authorization: Bearer without a key")
        return credentials
    if not credentials:
        raise MalformedCredentials(f"the Authorization header has no scheme: {HOW_TO_SEND}",
                                   "Authorization header without a scheme (not checked, not fingerprinted)")
    # A scheme is named back only when it is a known one: what stands there may be the key itself, sent without
    # 'Bearer ' and followed by something else (its first 20 characters were echoed and logged, helper-65).
    named = repr(scheme) if scheme.lower() in KNOWN_SCHEMES else "(not a known scheme, not repeated)"
    raise MalformedCredentials(f"the Authorization scheme {named} is not accepted: {HOW_TO_SEND}",
                               f"Authorization scheme {named} (not checked, not fingerprinted)")


def fingerprint(key: str) -> str:
    """12 hex digits that tell repeated invalid keys apart within one process, and nothing else."""
    return hmac.new(_FINGERPRINT_SECRET, key.encode(), hashlib.sha256).hexdigest()[:12]


def _refuse(services: Services, caller: Caller, error: Unauthorized | Forbidden, detail: str) -> ServerError:
    """Count and log a refusal; over gRPC its advice names metadata as gRPC spells it (a client that followed
    'Authorization: Bearer <key>' to the letter had grpcio refuse its own call: "Invalid metadata")."""
    if caller.method == GRPC and HOW_TO_SEND in error.message:
        error = type(error)(error.message.replace(HOW_TO_SEND, HOW_TO_SEND_GRPC))
    reason = "unauthorized" if error.status_code == 401 else "forbidden"
    services.metrics.rejected.labels(reason).inc()
    log_refusal(error.status_code, detail, caller)
    return error


def log_refusal(status: int, detail: str, caller: Caller) -> None:
    """The one WARNING every security refusal writes, in the form the runbook greps (up to
    ``REFUSAL_LINES_PER_MINUTE``; every refusal is counted in ``sentiment_rejected_requests_total`` regardless)."""
    _refusal_lines.log(logging.WARNING, "security: %d %s: %s %s from %s", status, detail, caller.method,
                       printable(caller.path), client_for_log(caller.client))


def client_for_log(client: str) -> str:
    """The client's address as a refusal's line shows it: an IP address as it is, anything else quoted and escaped.
    Behind a proxy on this host uvicorn takes the client from ``X-Forwarded-For`` (``FORWARDED_ALLOW_IPS``, loopback
    by default), whatever text it holds: ``forged<TAB> security: 401 ...`` read as part of the line."""
    if client == "-":  # none known (``Caller.of``)
        return client
    try:
        ipaddress.ip_address(client)
    except ValueError:
        escaped = printable(client, 64).replace('"', '\\"')
        return f'"{escaped}" (not an address)'
    return client


def printable(text: str, most: int = 200) -> str:
    """``text`` as a log line may hold it: unprintable characters escaped (a path cannot start a line of its own,
    or colour a terminal, ``\x1b[31m``), at most ``most`` of them (a 60 KB path in every refusal's line)."""
    shown = one_line(text)
    return shown if len(shown) <= most else f"{shown[:most]}…"
