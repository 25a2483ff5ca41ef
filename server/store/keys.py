"""API keys: random, shown once, stored only as a sha256 hash.

Every check reads the database (one indexed lookup), so a revocation takes
effect on the next request; there is no cache to go stale. ``last_used_at``
is written at most once per ``last_used_interval_s`` per key, so busy keys
cost an UPDATE a minute, not one per request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, insert, select, update

from server.store.db import UNAVAILABLE, describe
from server.store.tables import API_KEYS

log = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("predict", "admin")
KEY_PREFIX = "sap_"


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    role: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    def allows(self, role: str) -> bool:
        """admin may do everything predict may."""
        return self.role == "admin" or self.role == role

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "role": self.role,
                "created_at": self.created_at.isoformat(),
                "last_used_at": self.last_used_at.isoformat() if self.last_used_at else None,
                "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None}


class KeyStore:
    """Blocking methods: call them from a thread (``server.store.db.run_db``) or the CLI."""

    def __init__(self, engine: Engine, *, last_used_interval_s: float = 60.0) -> None:
        self.engine = engine
        self._last_used_interval_s = last_used_interval_s
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()

    def create(self, name: str, role: str) -> tuple[ApiKey, str]:
        """A new key: its record and the key itself, which is not stored and cannot be shown again."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if not name.strip():
            raise ValueError("name must not be empty: say who or what uses the key")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        record = ApiKey(id=secrets.token_hex(8), name=name.strip(), role=role, created_at=_now(),
                        last_used_at=None, revoked_at=None)
        with self.engine.begin() as connection:
            connection.execute(insert(API_KEYS).values(
                id=record.id, name=record.name, role=role, key_sha256=key_digest(key), created_at=record.created_at))
        return record, key

    def list(self) -> list[ApiKey]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(API_KEYS).order_by(API_KEYS.c.created_at, API_KEYS.c.id))
            return [_api_key(row) for row in rows]

    def revoke(self, key_id: str) -> ApiKey | None:
        """Revoke now (idempotent: a second call keeps the first time); None if there is no such key."""
        with self.engine.begin() as connection:
            connection.execute(update(API_KEYS).where(API_KEYS.c.id == key_id, API_KEYS.c.revoked_at.is_(None))
                               .values(revoked_at=_now()))
            row = connection.execute(select(API_KEYS).where(API_KEYS.c.id == key_id)).first()
        return _api_key(row) if row else None

    def lookup(self, key: str) -> ApiKey | None:
        """The key's record (revoked ones too, so callers can say so), or None for an unknown key."""
        digest = key_digest(key)
        with self.engine.connect() as connection:
            row = connection.execute(select(API_KEYS).where(API_KEYS.c.key_sha256 == digest)).first()
            # The lookup finds the row; the decision is a constant-time comparison of the digests.
            if row is None or not hmac.compare_digest(row.key_sha256, digest):
                return None
            found = _api_key(row)
            if found.revoked_at is None and self._due(found.id):
                try:
                    connection.execute(update(API_KEYS).where(API_KEYS.c.id == found.id).values(last_used_at=_now()))
                    connection.commit()
                except UNAVAILABLE as error:  # bookkeeping only: the key was checked, let the request through
                    log.warning("could not record the use of API key %s: %s", found.id, describe(error))
        return found

    def _due(self, key_id: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._touched.get(key_id, -self._last_used_interval_s) < self._last_used_interval_s:
                return False
            self._touched[key_id] = now
            return True


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _api_key(row) -> ApiKey:
    return ApiKey(id=row.id, name=row.name, role=row.role, created_at=row.created_at,
                  last_used_at=row.last_used_at, revoked_at=row.revoked_at)
