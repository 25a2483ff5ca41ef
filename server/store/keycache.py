"""The in-process API key cache: keyed requests are checked without a thread hop or a database read.

Why: each keyed request used to read its key from the database, so with
AUTH_MODE=required a database outage was a full outage. What it promises
(the README's "Prediction store and API keys" states the same):

- Every key, revoked ones included, is loaded at start and reloaded by a
  background task every ``KEY_CACHE_TTL_S / 2``. An entry read from the
  database less than ``KEY_CACHE_TTL_S`` ago decides on its own, so a
  revocation made anywhere else (another replica, the CLI) takes effect here
  within ``KEY_CACHE_TTL_S`` while the database can be read. A create or a
  revocation made through this object (``POST``/``DELETE /admin/keys`` on this
  replica) updates the cache at once.
- A key the cache does not know (created a moment ago elsewhere) is read from
  the database once and cached. A key the database does not know either is
  remembered as unknown for ``KEY_CACHE_TTL_S`` (at most ``MAX_UNKNOWN``
  digests, oldest dropped first), and at most ``LOOKUP_CONCURRENCY`` reads run
  at once, so a flood of bad keys costs the database little. A read that gets
  no answer within ``LOOKUP_TIMEOUT_S`` counts as the database being down.
- A start while the database cannot be read takes the keys of the snapshot
  a previous run left in ``SPOOL_DIR`` (``server.store.keysnapshot``).
- While the database cannot be read, a key the cache knows is judged by the
  state last read (counted in ``sentiment_auth_key_cache_fallbacks_total``, one
  WARNING a minute); a key it does not know can be neither accepted nor
  refused and is answered 503 + Retry-After (``KeyCheckUnavailable``). A
  revocation made elsewhere during the outage takes effect when this replica
  can read the database again. The refresher retries every second meanwhile.
- ``last_used_at`` is collected in memory and written by the refresher, one
  batch per cycle: it lags by up to ``KEY_CACHE_TTL_S / 2`` (plus the outage),
  and the uses since the last batch are lost if the process is killed.

Threads: the request path, the refresher and the outage state live on the
event loop; ``create``/``revoke`` run in worker threads (the routes call them
through ``run_db``) and change the cache under ``_lock``. Their changes are
also kept until the next reload that started after them, so a reload that read
the database just before a revocation cannot bring the key back.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from server.metrics import Metrics
from server.primitives import ServerError
from server.store.db import DATABASE_FAILED, describe
from server.store.keys import ApiKey, KeyStore, key_digest
from server.store.keysnapshot import KeySnapshot
from server.store.throttle import Throttle
from server.worker_threads import UnjoinedExecutor

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_UNKNOWN = 10_000
LOOKUP_CONCURRENCY = 2
SNAPSHOT_EVERY_S = 3600.0  # the key snapshot is rewritten this often even when no key changed
LOOKUP_TIMEOUT_S = 5.0  # a key read from the database that takes longer: the database is taken as down
DOWN_RETRY_S = 1.0
MIN_RELOAD_S = 0.1  # a tiny KEY_CACHE_TTL_S means "read the database per request", not "reload in a busy loop"
WARNING_EVERY_S = 60.0
CLOSE_WRITE_TIMEOUT_S = 2.0


class KeyCheckUnavailable(ServerError):
    """A key the cache does not know, while the database that could say is unavailable."""

    status_code = 503
    error_type = "key_check_unavailable"
    retry_after = 5.0


@dataclass(frozen=True)
class _Entry:
    key: ApiKey
    read_at: float  # time.monotonic() when this state was read from the database (or changed here)


class _Miss:
    """The cache cannot decide: read the database."""


MISS = _Miss()


class KeyCache:
    """Checks keys from memory; create/list/revoke go to the ``KeyStore`` and keep the cache in step."""

    def __init__(self, store: KeyStore, metrics: Metrics, ttl_s: float,
                 lookup_timeout_s: float = LOOKUP_TIMEOUT_S, snapshot: KeySnapshot | None = None) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.lookup_timeout_s = lookup_timeout_s
        self._snapshot = snapshot  # for a start during an outage (``server.store.keysnapshot``)
        self._kept: tuple[frozenset, float] | None = None  # what the snapshot holds, and when it was written
        self._snapshot_lock = threading.Lock()  # reloads (a thread of the loop's) and key changes (``run_db``) write it
        self._snapshot_read = -math.inf  # when the keys the snapshot holds were read (time.monotonic())
        self.snapshot_trouble: str | None = None  # why the last snapshot write failed (for /health), till one passes
        self._metrics = metrics
        self._known: dict[str, _Entry] = {}  # sha256 of the key -> its record as last read
        self._unknown: OrderedDict[str, float] = OrderedDict()  # sha256 -> monotonic time the verdict expires
        self._changes: list[tuple[str, _Entry]] = []  # made here; re-applied over reloads read before them
        self._lock = threading.Lock()
        self._lookups = asyncio.Semaphore(LOOKUP_CONCURRENCY)
        self._used: dict[str, float] = {}  # key id -> time.time() of its last use, not yet written
        self._down: str | None = None  # the database error while keys cannot be read, else None
        self.loaded = False  # keys read once, from the database or the snapshot: until then none can be judged
        self._throttle = Throttle(log, WARNING_EVERY_S)
        # Threads of its own, not the loop's default executor: slow admin listings there (``run_db``) held every
        # thread, and key lookups queued behind them timed out, a valid new key refused 503 as if the database were
        # down (red team helper-106). Not joined at exit, as the default one is not (``UnjoinedExecutor``).
        self._threads = UnjoinedExecutor(max_workers=LOOKUP_CONCURRENCY + 2, thread_name_prefix="key-cache")

    # the request path

    async def authenticate(self, key: str) -> ApiKey | None:
        """The key's record (revoked ones too), or None if no such key exists.

        Raises ``KeyCheckUnavailable`` for a key the cache does not know while the database is unavailable.
        """
        digest = key_digest(key)
        found = self._cached(digest)
        if found is not MISS:
            return found
        async with self._lookups:
            found = self._cached(digest)  # another request may have read it while this one waited
            if found is not MISS:
                return found
            return await self._read(digest)

    def _cached(self, digest: str) -> ApiKey | None | _Miss:
        now = time.monotonic()
        entry = self._known.get(digest)
        if entry is not None:
            if now - entry.read_at < self.ttl_s:
                return self._use(entry.key)
            return self._fallback(entry, now) if self._down else MISS
        expires = self._unknown.get(digest)
        if expires is not None:
            if now < expires:
                return None
            del self._unknown[digest]
        if self._down:
            raise self._unavailable()
        return MISS

    async def _read(self, digest: str) -> ApiKey | None:
        started = time.monotonic()
        try:  # bounded: a connection to a server that stopped answering held its request for good (helper-68)
            found = await asyncio.wait_for(self._in_thread(self.store.find, digest), self.lookup_timeout_s)
        except (*DATABASE_FAILED, TimeoutError) as error:
            self._mark_down(describe(error) if isinstance(error, DATABASE_FAILED) else
                            f"a key lookup got no answer within {self.lookup_timeout_s:.0f} s")
            entry = self._known.get(digest)
            if entry is not None:
                return self._fallback(entry, time.monotonic())
            raise self._unavailable() from error
        now = time.monotonic()
        if found is None:
            with self._lock:
                self._known.pop(digest, None)  # a row deleted by hand
            self._unknown[digest] = now + self.ttl_s
            while len(self._unknown) > MAX_UNKNOWN:
                self._unknown.popitem(last=False)
            return None
        with self._lock:
            current = self._known.get(digest)
            if current is None or current.read_at < started:  # else changed here (revoked) during the read
                self._known[digest] = current = _Entry(found, now)
        return self._use(current.key)

    def _use(self, key: ApiKey) -> ApiKey:
        if key.revoked_at is None:
            self._used[key.id] = time.time()
        return key

    def _fallback(self, entry: _Entry, now: float) -> ApiKey:
        self._metrics.key_cache_fallbacks.inc()
        self._throttle.log("fallback", logging.WARNING, "API keys cannot be read from the database (%s): key id=%s "
                           "judged by its state read %.1f s ago", self._down, entry.key.id, now - entry.read_at)
        return self._use(entry.key)

    def _unavailable(self) -> KeyCheckUnavailable:
        self._throttle.log("unavailable", logging.WARNING, "API keys cannot be read from the database (%s): "
                           "answered 503 to a key this server does not know", self._down)
        return KeyCheckUnavailable("this API key cannot be checked: this server does not know it yet and the "
                                   "database that holds API keys is unavailable; retry in a few seconds "
                                   "(see /health)")

    # the database side: create / list / revoke (blocking, called in a thread) and the refresher

    def create(self, name: str, role: str) -> tuple[ApiKey, str]:
        record, key = self.store.create(name, role)
        self._change(key_digest(key), record)
        self._snapshot_now()
        return record, key

    def list(self) -> list[ApiKey]:
        return self.store.list()

    def revoke(self, key_id: str) -> ApiKey | None:
        """Revoke in the database, and in this cache at once, cached before or not: a check that read the key
        just before the revocation committed would otherwise cache it unrevoked until the next reload (a key
        created elsewhere since the last one was accepted for 13 s after its DELETE answered, red team
        helper-65)."""
        revoked = self.store.revoke_with_digest(key_id)
        if revoked is None:
            return None
        record, digest = revoked
        self._change(digest, record)
        self._snapshot_now()
        return record

    def _change(self, digest: str, record: ApiKey) -> None:
        entry = _Entry(record, time.monotonic())
        with self._lock:
            self._known[digest] = entry
            self._changes.append((digest, entry))

    def _snapshot_now(self) -> None:
        """Blocking, after a key changed through this server: the snapshot written at once, not at the next reload. A
        key revoked here (``DELETE /admin/keys``) was accepted again by a restart during an outage that began before
        that reload (red team helper-104: a SIGKILL and the database stopped within 15 s of the revoke)."""
        if self._snapshot is None:
            return
        read, read_at = time.monotonic(), time.time()
        try:
            keys = self.store.all_by_digest()
        except DATABASE_FAILED as error:
            log.warning("API key snapshot %s not rewritten after a key change (the keys cannot be read: %s); the next "
                        "reload writes it", self._snapshot.path, describe(error))
            return
        self._write_snapshot(keys, read, read_at)

    def _write_snapshot(self, keys: dict[str, ApiKey], read: float, read_at: float) -> bool:
        """Blocking: ``keys``, read at ``read`` (``time.monotonic()``; ``read_at``: ``time.time()``, for the file),
        into the snapshot, unless it holds a later reading already (a reload that read the keys before a revocation
        must not write the key back unrevoked after it). False when the file cannot be written (logged)."""
        with self._snapshot_lock:
            if read < self._snapshot_read:
                return True
            try:
                self._snapshot.write(keys, read_at)
            except OSError as error:
                self.snapshot_trouble = (f"the API key snapshot {self._snapshot.path} cannot be written ({error}): a "
                                         "start while the database is down would know only the keys of an older "
                                         "snapshot, or none")
                self._throttle.log("snapshot", logging.WARNING, "%s", self.snapshot_trouble)
                return False
            self._snapshot_read, self.snapshot_trouble = read, None
            return True

    async def start(self) -> None:
        """The first load; a database that cannot be read leaves the cache with the snapshot's keys (or empty:
        logged) until it can."""
        if await self.refresh():
            return
        kept = await self._in_thread(self._snapshot.read) if self._snapshot is not None else None
        if kept is None:
            log.warning("API keys could not be loaded (%s): keyed requests get 503 until the database can be "
                        "read; the key cache retries every %.0f s", self._down, DOWN_RETRY_S)
            return
        keys, read_at = kept
        age_s = max(0.0, time.time() - read_at)
        with self._lock:
            self._known = {digest: _Entry(key, time.monotonic() - age_s) for digest, key in keys.items()}
        self.loaded = True
        log.warning("API keys could not be loaded (%s): the %d keys of %s, read from the database %.0f s ago, "
                    "judge keyed requests until it can be read (a key revoked since is accepted meanwhile); the "
                    "key cache retries every %.0f s", self._down, len(keys), self._snapshot.path, age_s, DOWN_RETRY_S)

    async def run(self) -> None:
        """Reload every KEY_CACHE_TTL_S / 2 (every second while the database is down) and write key uses."""
        while True:
            interval = min(self.ttl_s / 2, DOWN_RETRY_S) if self._down else self.ttl_s / 2
            await asyncio.sleep(max(interval, MIN_RELOAD_S))
            try:
                if await self.refresh():
                    await self.write_uses()
            except Exception:  # the refresher must outlive any one failure
                log.exception("API key cache refresh failed")

    async def refresh(self) -> bool:
        """Reload every key from the database; False (and the cache kept as it was) if it cannot be read."""
        started, read_at = time.monotonic(), time.time()
        try:
            stored = await self._in_thread(self.store.all_by_digest)
        except DATABASE_FAILED as error:
            self._mark_down(describe(error))
            return False
        with self._lock:
            self._changes = [(d, entry) for d, entry in self._changes if entry.read_at >= started]
            known = {digest: _Entry(record, started) for digest, record in stored.items()}
            known.update(self._changes)
            self._known = known
        self.loaded = True
        for digest in known.keys() & self._unknown.keys():
            del self._unknown[digest]
        if self._down:
            log.info("API keys can be read from the database again: %d keys loaded", len(known))
            self._down = None
        await self._keep(stored, started, read_at)
        return True

    async def _keep(self, keys: dict[str, ApiKey], read: float, read_at: float) -> None:
        """Write the snapshot when the keys changed (their use times aside), and hourly, so that its age is what a
        start in an outage reports."""
        if self._snapshot is None:
            return
        held = frozenset((digest, key.id, key.role, key.revoked_at) for digest, key in keys.items())
        if self._kept is not None and self._kept[0] == held and time.monotonic() - self._kept[1] < SNAPSHOT_EVERY_S:
            return
        if await self._in_thread(self._write_snapshot, keys, read, read_at):
            self._kept = (held, time.monotonic())

    async def write_uses(self) -> None:
        """Write the uses collected since the last call; kept for the next call if the database fails."""
        used, self._used = self._used, {}
        if not used:
            return
        try:
            await self._in_thread(self.store.record_use, {key_id: datetime.fromtimestamp(at, UTC)
                                                             for key_id, at in used.items()})
        except DATABASE_FAILED as error:
            log.debug("could not record API key use, will retry: %s", describe(error))
            for key_id, at in used.items():
                self._used[key_id] = max(at, self._used.get(key_id, at))

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the key cache's threads (``asyncio.to_thread`` on them: the caller's context goes too)."""
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._threads, call)

    async def close(self) -> None:
        """Write the last uses, unless the database is known to be down or slow: shutdown must not wait on it."""
        if not self._down:
            try:
                await asyncio.wait_for(self.write_uses(), CLOSE_WRITE_TIMEOUT_S)
            except TimeoutError:
                log.warning("API key uses since the last reload not recorded: the database did not answer within "
                            "%.0f s", CLOSE_WRITE_TIMEOUT_S)
        self._threads.shutdown(wait=False)  # idle threads end now; one hung on the database is not waited for

    @property
    def cannot_read(self) -> bool:
        """The key table could not be read last time it was tried (``_mark_down``): /health says so."""
        return self._down is not None

    def _mark_down(self, reason: str) -> None:
        if not self._down:
            log.warning("API keys cannot be read from the database: %s; keys this server knows are judged from "
                        "its cache until it can", reason)
        self._down = reason
