"""API keys: random, shown once, stored only as a sha256 hash.

``KeyStore`` is the database side only: create, list, revoke, and the reads
and batched writes the in-process key cache (``server.store.keycache``) makes.
The server checks keys against that cache, not against this class; the CLI
uses this class directly.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, bindparam, insert, or_, select, update

from server.store.tables import API_KEYS

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


NAME_MAX_CHARS = 128  # the column's width
_LINE = "\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029"  # control characters and line breaks
NAME_PATTERN = f"^[^{_LINE}]*[^\\s{_LINE}][^{_LINE}]*$"  # for the OpenAPI document: one line, not blank
_BREAKS_A_LINE = re.compile(f"[{_LINE}]")


def check_key_name(name: str) -> str:
    """The name as stored (outer whitespace removed); ``ValueError`` saying what to fix. One line of text:
    ``keys list`` prints a row per key, and a line break or tab in a name forged rows and columns there."""
    name = name.strip()
    if not name:
        raise ValueError("name must not be empty: say who or what uses the key")
    if len(name) > NAME_MAX_CHARS:
        raise ValueError(f"name has {len(name)} characters; at most {NAME_MAX_CHARS}")
    if _BREAKS_A_LINE.search(name):
        raise ValueError("name must be one line of text: no line breaks, tabs or other control characters")
    if invisible(name):
        raise ValueError("name must not hold invisible formatting characters (zero-width or direction marks such "
                         "as U+200B or U+202E): a name must read as what it is")
    return name


def invisible(text: str) -> bool:
    """Whether ``text`` holds a format character (Unicode category Cf): zero-width, or one that reorders the text
    around it, so that ``ops-\u202etpircs\u202c-bot`` was listed as "ops-script-bot" (red team helper-65)."""
    return not text.isascii() and any(unicodedata.category(c) == "Cf" for c in text)


def one_line(text: str) -> str:
    """``text`` as is, or quoted when it holds a character ``check_key_name`` refuses (a name stored before it)."""
    return repr(text) if _BREAKS_A_LINE.search(text) or invisible(text) else text


class KeyStore:
    """Blocking methods: call them from a thread (``asyncio.to_thread``, ``run_db``) or the CLI."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, name: str, role: str) -> tuple[ApiKey, str]:
        """A new key: its record and the key itself, which is not stored and cannot be shown again."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        name = check_key_name(name)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        record = ApiKey(id=secrets.token_hex(8), name=name, role=role, created_at=_now(),
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
        """Revoke (idempotent: a second call keeps the first time); None if there is no such key.

        Running servers see it within KEY_CACHE_TTL_S; the server that revokes through its own
        ``DELETE /admin/keys/{id}`` at once (its key cache is updated by the same call).
        """
        revoked = self.revoke_with_digest(key_id)
        return revoked[0] if revoked else None

    def revoke_with_digest(self, key_id: str) -> tuple[ApiKey, str] | None:
        """``revoke``, with the sha256 of the key: what a key cache needs to refuse it at once."""
        with self.engine.begin() as connection:
            connection.execute(update(API_KEYS).where(API_KEYS.c.id == key_id, API_KEYS.c.revoked_at.is_(None))
                               .values(revoked_at=_now()))
            row = connection.execute(select(API_KEYS).where(API_KEYS.c.id == key_id)).first()
        return (_api_key(row), row.key_sha256) if row else None

    def find(self, digest: str) -> ApiKey | None:
        """The record of the key with this sha256 (revoked ones too, so callers can say so), or None."""
        with self.engine.connect() as connection:
            row = connection.execute(select(API_KEYS).where(API_KEYS.c.key_sha256 == digest)).first()
        # The index finds the row; the decision is a constant-time comparison of the digests.
        if row is None or not hmac.compare_digest(row.key_sha256, digest):
            return None
        return _api_key(row)

    def all_by_digest(self) -> dict[str, ApiKey]:
        """Every key, revoked ones included, by the sha256 of the key: what the key cache loads."""
        with self.engine.connect() as connection:
            return {row.key_sha256: _api_key(row) for row in connection.execute(select(API_KEYS))}

    def record_use(self, last_used: dict[str, datetime]) -> None:
        """Write many keys' ``last_used_at`` in one transaction; never moves a time backwards
        (several servers write it)."""
        if not last_used:
            return
        statement = (update(API_KEYS)
                     .where(API_KEYS.c.id == bindparam("key_id"),
                            or_(API_KEYS.c.last_used_at.is_(None), API_KEYS.c.last_used_at < bindparam("used_at")))
                     .values(last_used_at=bindparam("used_at")))
        with self.engine.begin() as connection:
            connection.execute(statement, [{"key_id": key_id, "used_at": at} for key_id, at in last_used.items()])


def _now() -> datetime:
    return datetime.now(UTC)


def _api_key(row) -> ApiKey:
    return ApiKey(id=row.id, name=row.name, role=row.role, created_at=row.created_at,
                  last_used_at=row.last_used_at, revoked_at=row.revoked_at)
