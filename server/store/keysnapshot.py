"""The API keys as last read from the database, kept in ``SPOOL_DIR/keys.json`` for a start during an outage.

Why: the key cache (``server.store.keycache``) judges keyed requests from memory while the database cannot be
read, but a server that started during an outage (a pod rescheduled, an OOM kill's restart) had nothing in memory
and answered every keyed request 503 until the database came back (red team helper-68), against the contract's
"the database being down never stops predictions (keyed ones included)".

What it holds: each key's sha256 digest, id, name, role and times, revoked ones included (what the ``api_keys``
table holds; never a key itself), and the database they were read from. It is written (atomically, mode 0600)
when a reload finds the keys changed and at once when a key is created or revoked through this server
(``KeyCache._snapshot_now``), and read only at a start whose first load fails, and only when it names
the same database. The keys it holds are then judged as the cache judges them in an outage: by their state when
it was written, each such request counted as a fallback; a key revoked since is accepted until the database can
be read again. ``SPOOL_DIR`` is the volume that outlives the process, and it already holds prediction texts.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from server.regular_file import open_regular
from server.store.keys import ROLES, ApiKey
from server.store.spooldir import write_json_atomically

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "keys.json"


class KeySnapshot:
    def __init__(self, directory: Path, identity: dict[str, Any]) -> None:
        self.path = Path(directory) / SNAPSHOT_FILE
        self.identity = identity  # the database the keys are read from (``spooldir.database_identity``)

    def write(self, keys: dict[str, ApiKey], read_at: float) -> None:
        """Blocking: ``keys`` by digest, read at ``read_at`` (``time.time()``), replacing the file atomically."""
        write_json_atomically(self.path, {"database": self.identity, "read_at": read_at,
                                          "keys": {digest: key.as_dict() for digest, key in keys.items()}}, 0o600)

    def read(self) -> tuple[dict[str, ApiKey], float] | None:
        """Blocking: the keys by digest and when they were read, or None (no snapshot, another database's, or one
        that cannot be read: logged)."""
        try:
            with open(open_regular(self.path), encoding="utf-8") as handle:
                body = json.load(handle)
            if body["database"] != self.identity:
                log.warning("API key snapshot %s was read from another database; not used", self.path)
                return None
            return {digest: _api_key(fields) for digest, fields in body["keys"].items()}, float(body["read_at"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
            log.warning("API key snapshot %s cannot be read (%s: %s); not used", self.path, type(error).__name__,
                        error)
            return None


def _api_key(fields: dict[str, Any]) -> ApiKey:
    """A key as the snapshot holds it; ``TypeError`` or ``ValueError`` for fields of another type or value (a file
    edited by hand: a list for an id was taken, and every request with that key answered 500)."""
    def when(name: str) -> datetime | None:
        return datetime.fromisoformat(fields[name]) if fields[name] is not None else None

    if not all(isinstance(fields[name], str) for name in ("id", "name", "role")):
        raise TypeError("a key's id, name and role must be strings")
    if fields["role"] not in ROLES:
        raise ValueError(f"a key's role must be one of {', '.join(ROLES)}, not {fields['role']!r}")
    return ApiKey(id=fields["id"], name=fields["name"], role=fields["role"],
                  created_at=datetime.fromisoformat(fields["created_at"]), last_used_at=when("last_used_at"),
                  revoked_at=when("revoked_at"))
