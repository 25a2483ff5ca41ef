"""PredictionStore: predictions reach the database off the request path and survive its outages.

``submit`` appends to an in-memory queue. One writer task drains it every
``flush_interval_s``, or as soon as ``batch_rows`` are waiting, one INSERT per
batch. When a write fails, that batch and every later one go to the spool file
until the database accepts writes again (retried every ``retry_interval_s``);
then the spool is replayed first, so rows arrive in the order they were
submitted. Inserts are ``INSERT ... ON CONFLICT (id) DO NOTHING``, so offering
a row twice (a write whose commit was not acknowledged, a crash before the
spool was deleted) is harmless. A row the database refuses by content
(constraint or data error) is set aside in ``rejected.jsonl`` rather than
blocking the rows behind it. Call ``submit`` from the event loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, exc
from sqlalchemy.dialects import postgresql, sqlite

from server.config import Settings
from server.metrics import Metrics
from server.primitives import PredictionRecord
from server.store.db import UNAVAILABLE, describe, make_engine
from server.store.migrate import SchemaBehind, prepare_schema
from server.store.spool import Spool, quarantine
from server.store.tables import PREDICTIONS

log = logging.getLogger(__name__)

COMPLAIN_EVERY_S = 60.0


class PredictionStore:
    def __init__(self, settings: Settings, metrics: Metrics, *, batch_rows: int = 256, flush_interval_s: float = 0.25,
                 retry_interval_s: float = 2.0, max_queue: int = 100_000) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine: Engine = make_engine(settings)
        self.backend = self.engine.dialect.name
        self._batch_rows = batch_rows
        self._flush_interval_s = flush_interval_s
        self._retry_interval_s = retry_interval_s
        self._max_queue = max_queue
        self._insert = _idempotent_insert(self.engine)
        self._spool = Spool(settings.spool_dir)
        self._queue: deque[dict[str, Any]] = deque()  # rows, in submission order
        self._in_flight = 0  # rows taken from the queue, not yet written or spooled
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._schema_ok = False
        self._up = False
        self._reason = "not started"
        self._retry_at = 0.0
        self._complained: dict[str, float] = {}

    async def start(self) -> None:
        """Count a spool left by a previous process, migrate or check the schema, start the writer task.

        Raises ``SchemaBehind`` (the server must not start); an unreachable
        database only makes the store degraded.
        """
        leftover = await asyncio.to_thread(self._spool.open)
        self.metrics.store_spool_rows.set(leftover)
        if leftover:
            log.warning("store: %d predictions spooled by a previous process in %s; replaying them",
                        leftover, self._spool.path)
        try:
            await self._call(self._ensure_schema)
            self._mark_up()
        except SchemaBehind:
            await asyncio.to_thread(self._shutdown_db)
            raise
        except UNAVAILABLE as error:
            self._mark_down(error)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="prediction-store-writer")

    def submit(self, record: PredictionRecord) -> None:
        """Queue a record for writing; never blocks, never raises."""
        try:
            if len(self._queue) >= self._max_queue:
                self.metrics.store_write_errors.inc()
                self._complain("overflow", logging.ERROR, "store: %d predictions already waiting; dropping new "
                               "ones until the writer catches up (database and spool both failing?)", len(self._queue))
                return
            self._queue.append(record_row(record, self.settings.store_text))
            self.metrics.store_queue_depth.set(len(self._queue))
            if len(self._queue) >= self._batch_rows:
                self._wakeup.set()
        except Exception:
            self.metrics.store_write_errors.inc()
            log.exception("store: could not queue prediction %s", getattr(record, "id", "?"))

    def health(self) -> dict[str, Any]:
        spooled = self._spool.rows
        if self._up and not spooled:
            status, reason = "ok", None
        elif self._up:
            status, reason = "degraded", f"database is back; {spooled} spooled predictions waiting for replay"
        else:
            status, reason = "degraded", f"{self._reason}; {spooled} predictions spooled to {self._spool.path}"
        return {"status": status, "reason": reason, "backend": self.backend,
                "queue_depth": len(self._queue) + self._in_flight, "spool_rows": spooled}

    async def close(self) -> None:
        """Write what is queued, or spool it when the database is down; then release the pool."""
        if self._task is not None:
            self._closing = True
            self._wakeup.set()
            await self._task
        if self._queue:
            log.error("store: %d predictions could be neither written nor spooled and are lost", len(self._queue))
        await asyncio.to_thread(self._shutdown_db)

    # writer task

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), self._flush_interval_s)
            except asyncio.TimeoutError:
                pass
            self._wakeup.clear()
            closing = self._closing
            try:
                await self._flush()
            except Exception:
                log.exception("store: writer failed; retrying")
            if closing:
                return

    async def _flush(self) -> None:
        if self._spool.rows and self._due():
            await self._replay()
        # Only what was queued when the flush began (all of it when closing): rows that arrive while it
        # writes wait for the next flush. Chasing them wrote steady traffic one or two rows per
        # transaction, at ~100 us of CPU a row.
        pending = len(self._queue)
        while self._queue and (pending > 0 or self._closing):
            rows = [self._queue.popleft() for _ in range(min(len(self._queue), self._batch_rows))]
            pending -= len(rows)
            self._in_flight = len(rows)
            try:
                if not self._spool.rows and (self._up or self._due()) and await self._write(rows):
                    continue
                if not await self._to_spool(rows):
                    self._queue.extendleft(reversed(rows))
                    break
            finally:
                self._in_flight = 0
        self.metrics.store_queue_depth.set(len(self._queue))
        self.metrics.store_spool_rows.set(self._spool.rows)

    async def _write(self, rows: list[dict[str, Any]]) -> bool:
        try:
            await self._call(self._insert_rows, rows)
        except Exception as error:
            self.metrics.store_write_errors.inc()
            self._mark_down(error)
            return False
        self.metrics.store_written.inc(len(rows))
        self._mark_up()
        return True

    async def _replay(self) -> None:
        def insert(rows: list[dict[str, Any]]) -> None:
            self._insert_rows(rows)
            self.metrics.store_replayed.inc(len(rows))

        try:
            replayed = await self._call(self._spool.replay, insert, self._batch_rows)
        except Exception as error:
            self.metrics.store_write_errors.inc()
            self._mark_down(error)
            return
        finally:
            self.metrics.store_spool_rows.set(self._spool.rows)
        self._mark_up()
        log.info("store: replayed %d spooled predictions into the database", replayed)

    async def _to_spool(self, rows: list[dict[str, Any]]) -> bool:
        try:
            await asyncio.to_thread(self._spool.append, rows)
        except OSError as error:
            self._complain("spool", logging.ERROR, "store: cannot write the spool %s (%s); %d predictions held "
                           "in memory", self._spool.path, error, len(self._queue) + len(rows))
            return False
        return True

    # blocking parts, on the writer thread

    def _ensure_schema(self) -> None:
        if not self._schema_ok:
            prepare_schema(self.engine, self.settings)
            self._schema_ok = True

    def _insert_rows(self, rows: list[dict[str, Any]]) -> None:
        self._ensure_schema()
        try:
            self._execute(rows)
        except Exception as error:
            if not _row_error(error):
                raise
            for row in rows:  # find the rows the database refuses and keep the others
                try:
                    self._execute([row])
                except Exception as row_error:
                    if not _row_error(row_error):
                        raise
                    self._reject(row, row_error)

    def _execute(self, rows: list[dict[str, Any]]) -> None:
        with self.engine.begin() as connection:
            connection.execute(self._insert, [{**row, "created_at": datetime.fromisoformat(row["created_at"])}
                                              for row in rows])

    def _reject(self, row: dict[str, Any], error: Exception) -> None:
        self.metrics.store_write_errors.inc()
        path = quarantine(self.settings.spool_dir, row, describe(error))
        log.error("store: the database refuses prediction %s (%s); kept it in %s", row.get("id"), describe(error),
                  path)

    def _shutdown_db(self) -> None:
        self._db.shutdown(wait=True)
        self.engine.dispose()

    # state

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)

    def _due(self) -> bool:
        return time.monotonic() >= self._retry_at

    def _mark_up(self) -> None:
        if not self._up:
            log.info("store: %s database accepts writes", self.backend)
        self._up = True
        self._reason = ""
        self._complained.pop("down", None)
        self.metrics.store_up.set(1)

    def _mark_down(self, error: BaseException) -> None:
        reason = str(error) if isinstance(error, SchemaBehind) else f"database unavailable: {describe(error)}"
        if self._up:
            self._complained.pop("down", None)
        self._up = False
        self._reason = reason
        self._retry_at = time.monotonic() + self._retry_interval_s
        self.metrics.store_up.set(0)
        self._complain("down", logging.ERROR, "store: %s; spooling predictions to %s until it accepts writes",
                       reason, self._spool.path)

    def _complain(self, kind: str, level: int, message: str, *args: Any) -> None:
        """Log at most once a minute per kind of trouble."""
        now = time.monotonic()
        if now - self._complained.get(kind, -COMPLAIN_EVERY_S) >= COMPLAIN_EVERY_S:
            self._complained[kind] = now
            log.log(level, message, *args)


def record_row(record: PredictionRecord, store_text: bool) -> dict[str, Any]:
    """A record as a JSON-ready row (the spool's line format; numpy scalars become floats).

    Made at ``submit``, so the queue holds a snapshot; STORE_TEXT=false drops the text here.
    """
    return {
        "id": record.id, "created_at": record.created_at.isoformat(), "request_id": record.request_id,
        "text": record.text if store_text else None, "text_sha256": record.text_sha256,
        "label": record.label, "score": float(record.score),
        "probabilities": {str(label): float(p) for label, p in record.probabilities.items()},
        "model_name": record.model_name, "model_version": record.model_version, "device": record.device,
        "latency_ms": float(record.latency_ms), "cached": bool(record.cached), "api_key_id": record.api_key_id,
    }


def _row_error(error: BaseException) -> bool:
    """Caused by the row's content (a constraint, a value a column refuses, a malformed spool line), so
    retrying would fail the same way; any other database error is the database's trouble: spool and retry."""
    if isinstance(error, (exc.DataError, exc.IntegrityError)):
        return True
    return not isinstance(error, exc.DBAPIError) and isinstance(error, (exc.StatementError, KeyError, TypeError,
                                                                         ValueError))


def _idempotent_insert(engine: Engine):
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    return dialect.insert(PREDICTIONS).on_conflict_do_nothing(index_elements=["id"])
