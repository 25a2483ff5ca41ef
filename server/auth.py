"""API key checks as FastAPI dependencies, and the security log events they emit.

A key comes as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
Roles: ``predict`` (``/predict``, ``POST /feedback``) and ``admin`` (everything,
including key management, reading predictions, feedback export, model reload).
AUTH_MODE=open lets requests without a key through to ``predict`` endpoints
(their predictions have no key id); a key that *is* sent must still be valid,
so bad keys surface before the switch to AUTH_MODE=required. ``admin``
endpoints need an admin key in both modes.

Every refusal logs one WARNING containing ``security: 401`` or ``security: 403``
(the runbook greps ``401|403|security``) and counts
``sentiment_rejected_requests{reason="unauthorized"|"forbidden"}``. Logs name a
key by id or by a short fingerprint of its hash, never by the key itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import Request

from server.primitives import ServerError
from server.store.db import run_db
from server.store.keys import ROLES, key_digest

log = logging.getLogger(__name__)

HOW_TO_SEND = "send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"


class Unauthorized(ServerError):
    status_code = 401
    headers = {"WWW-Authenticate": 'Bearer realm="sentiment-analyzer"'}  # RFC 9110: a 401 names its scheme


class Forbidden(ServerError):
    status_code = 403


def require_role(role: str) -> Callable[[Request], Awaitable[str | None]]:
    """A dependency returning the caller's key id, or None for a keyless request in open mode."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")

    async def check(request: Request) -> str | None:
        services = request.app.state.services
        key = presented_key(request)
        if key is None:
            if role == "predict" and services.settings.auth_mode == "open":
                return None
            raise _refuse(request, Unauthorized(f"an API key with role {role} is required: {HOW_TO_SEND}"),
                          "missing API key")
        found = await run_db(services.keys.lookup, key)
        if found is None:
            raise _refuse(request, Unauthorized("invalid API key: check it, or ask an administrator for a new one"),
                          f"invalid API key (sha256 {key_digest(key)[:12]})")
        if found.revoked_at is not None:
            raise _refuse(request, Unauthorized("this API key has been revoked: ask an administrator for a new one"),
                          f"revoked API key id={found.id} name={found.name!r}")
        if not found.allows(role):
            message = f"this API key has role {found.role}; {request.url.path} needs role {role}"
            detail = f"API key id={found.id} name={found.name!r} role={found.role} lacks role {role}"
            raise _refuse(request, Forbidden(message), detail)
        return found.id

    return check


def presented_key(request: Request) -> str | None:
    """The key from ``Authorization: Bearer`` or ``X-API-Key``; another Authorization scheme counts as a wrong key."""
    authorization = request.headers.get("authorization")
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        return credentials.strip() if scheme.lower() == "bearer" else authorization
    return request.headers.get("x-api-key") or None


def _refuse(request: Request, error: Unauthorized | Forbidden, detail: str) -> ServerError:
    reason = "unauthorized" if error.status_code == 401 else "forbidden"
    request.app.state.services.metrics.rejected.labels(reason).inc()
    client = request.client.host if request.client else "-"
    log.warning("security: %d %s: %s %s from %s", error.status_code, detail, request.method, request.url.path, client)
    return error
