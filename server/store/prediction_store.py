"""PredictionStore: every prediction's record reaches the database, through a local write-ahead log.

The pieces, each with one job:
- ``spooldir.SpoolDirectory``: the SPOOL_DIR lock, the database the spool belongs to, foreign spools;
- ``wal.WriteAheadLog``: segments on disk, appended and released;
- ``committer.GroupCommitter``: its thread appends what requests hand it, one sync per group;
- ``writer.Writer``: a loop task moving records to the database in spool order;
- ``sink.DatabaseSink``: the inserts (idempotent, halving, rejected rows set aside);
- ``state.StoreState``: what /health and /metrics say, changed only on the event loop;
- ``worker.BlockingWorker``: the thread the database calls and spool reads run on.

Durability (STORE_DURABILITY):
- ``ack`` (default): ``await store.record(records)`` returns once the records are synced to the
  spool; /predict answers only then, so a SIGKILL at any instant loses no answered record. When the
  spool cannot take them (full at SPOOL_MAX_BYTES, ENOSPC, an I/O error) it raises ``SpoolUnavailable``
  and /predict answers 503 + Retry-After: never a 200 without a record.
- ``async``: ``record`` queues the records in memory and returns; they reach the database within
  ~``flush_interval_s`` (0.25 s), or as long as a database call hangs (PostgreSQL's statement timeout is
  30 s) before they are spooled. A crash in that window loses them. While the spool cannot take them
  (full, ENOSPC) and the database is down they wait in memory, up to ``max_queue`` records and
  ``max_queue_bytes`` (32 MiB) estimated; beyond that bound each new record is dropped and counted
  (``lost_rows``). A crash loses what waits in memory, uncounted.

Shutdown: ``close(timeout_s)`` stops the writer, writes what memory holds if the database is up, spools
the rest, and is bounded in time: a disk backlog is left for the next start rather than replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from server.config import Settings
from server.metrics import Metrics
from server.primitives import PredictionRecord
from server.store.committer import Commit, GroupCommitter
from server.store.db import make_engine
from server.store.migrate import SchemaBehind
from server.store.rejected import FILENAME as REJECTED_FILE
from server.store.rejected import TAKEN_PREFIX, RejectedFile
from server.store.sink import DatabaseSink
from server.store.spooldir import (
    LEGACY_SPOOL,
    ForeignSpool,
    SpoolDirectory,
    database_identity,
    describe_identity,
    regular_size,
)
from server.store.state import ForeignReport, StoreState, replay_command
from server.store.wal import SpoolUnavailable, WriteAheadLog, count_spool, is_segment
from server.store.worker import BlockingWorker
from server.store.writer import CACHE_BYTES, CHECK_INTERVAL_S, QUEUE_BYTES, Writer
from server.worker_threads import on_own_thread

log = logging.getLogger(__name__)
RECORD_LINE_BYTES_AT_LEAST = 256  # a record's spool line without its text: its keys, id, hash and time alone

CLOSE_TIMEOUT_S = 5.0
STALLED_AFTER_S = 5.0  # a database call running longer makes /health degraded until it ends
WATCH_INTERVAL_S = 5.0  # how often rejected rows, foreign spools and the lock on disk are looked at again


class PredictionStore:
    def __init__(self, settings: Settings, metrics: Metrics, *, batch_rows: int = 256, flush_interval_s: float = 0.25,
                 retry_interval_s: float = 2.0, max_queue: int = 100_000, max_queue_bytes: int = QUEUE_BYTES,
                 cache_bytes: int = CACHE_BYTES, stalled_after_s: float = STALLED_AFTER_S,
                 check_interval_s: float = CHECK_INTERVAL_S) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine = make_engine(settings)
        self.backend = self.engine.dialect.name
        self.ack = settings.store_durability == "ack"
        self._promised = 0  # spool bytes promised to requests under way (``room_for``; on the loop only)
        self._directory = SpoolDirectory(settings.spool_dir)
        self._identity = database_identity(settings.database_url)  # the database its records are bound for
        self._wal = WriteAheadLog(settings.spool_dir, settings.spool_max_bytes)
        self._rejected = RejectedFile(settings.spool_dir)
        self._sink = DatabaseSink(self.engine, settings, self._rejected)
        self.state = StoreState(metrics, backend=self.backend, durability=settings.store_durability,
                                spool_limit=settings.spool_max_bytes, rejected_path=self._rejected.path,
                                spool_bytes=lambda: self._wal.bytes, call_age_s=self._call_age_s,
                                stalled_after_s=stalled_after_s)
        self._committer = GroupCommitter(self._wal, settings.store_text, self._on_commit)
        self._writer = Writer(state=self.state, wal=self._wal, sink=self._sink, committer=self._committer,
                              metrics=metrics, store_text=settings.store_text, batch_rows=batch_rows,
                              flush_interval_s=flush_interval_s, retry_interval_s=retry_interval_s,
                              max_queue=max_queue, max_queue_bytes=max_queue_bytes, cache_bytes=cache_bytes,
                              check_interval_s=check_interval_s,
                              on_rejected=lambda: self._disk_changed.set())
        self._worker: BlockingWorker | None = None
        self._tasks: list[asyncio.Task] = []
        self._rejected_seen: tuple = ()
        self._foreign_counted: dict[Path, tuple[tuple, ForeignReport]] = {}  # path -> (files and sizes, report)
        self._disk_changed = asyncio.Event()
        self._closed = False

    async def start(self) -> None:
        """Lock SPOOL_DIR, set a foreign spool aside, open the spool, check the schema, start the writer.

        Raises ``SpoolLocked`` / ``SpoolDirUnusable`` / ``SchemaBehind`` (StartupErrors: the server must not
        start); an unreachable database only makes the store degraded.
        """
        try:
            rows = await asyncio.to_thread(self._open_spool)
        except BaseException:
            self.engine.dispose()
            raise
        loop = asyncio.get_running_loop()
        self._worker = BlockingWorker("store-database")
        self.metrics.store_call_age.set_function(self._call_age_s)
        self._committer.start(loop)
        self._writer.begin(self._worker, self._wal.start, self._wal.end, rows)
        if rows:
            log.warning("store: %d predictions spooled by a previous process in %s; replaying them (some may be in "
                        "the database already, from segments not yet deleted when it stopped: each is stored once)",
                        rows, self.settings.spool_dir)
        try:
            await self._worker.call(self._sink.ping)
            self._writer.mark_up()
        except SchemaBehind:
            self._closed = True
            await self._shut(CLOSE_TIMEOUT_S)
            raise
        except Exception as error:
            self._writer.mark_down(error)
        self._tasks = [loop.create_task(self._writer.run(), name="prediction-store-writer"),
                       loop.create_task(self._watch_disk(), name="prediction-store-disk-watch")]

    def _call_age_s(self) -> float:
        return self._worker.call_age_s() if self._worker is not None else 0.0

    async def record(self, records: list[PredictionRecord]) -> None:
        """Record predictions. Ack mode: returns once they are synced to the spool, or raises
        ``SpoolUnavailable`` (answer 503). Async mode: queued in memory, returns at once."""
        if not self.ack:
            self._writer.queue(records)
            return
        started = time.perf_counter()
        await self._committer.append(records)
        self.metrics.store_ack_latency.observe(time.perf_counter() - started)

    def room_for(self, texts: list[str]) -> contextlib.AbstractContextManager:
        """Ack mode: the spool's room for the records of ``texts``, promised until the block ends; raises the
        spool's ``full`` now, before anything is computed, when the spool cannot hold them beside the records of
        the requests under way (``WriteAheadLog.bytes_kept``, what ``append`` finds once every segment the database
        took is deleted, and their promises). With the spool full, requests of many cached texts were each answered
        503 only after their records were built, encoded and refused one by one, all at once: 256 such clients
        OOM-killed a server at 800 MiB within seconds (red team helper-87). A record is promised the least its line
        can take (``RECORD_LINE_BYTES_AT_LEAST`` and its text), so the append still decides at the margin."""
        if not self.ack:
            return contextlib.nullcontext()
        need = len(texts) * RECORD_LINE_BYTES_AT_LEAST + (sum(map(len, texts)) if self.settings.store_text else 0)
        if need > self._wal.max_bytes:  # never fits, whatever is under way: the append says so (413, RecordsTooLarge)
            return contextlib.nullcontext()
        kept = self._wal.bytes_kept()
        if kept + self._promised + need > self._wal.max_bytes:
            error = SpoolUnavailable("full", f"the prediction spool is full ({kept} bytes of SPOOL_MAX_BYTES="
                                             f"{self._wal.max_bytes}, and records of requests under way)")
            self._writer.committed(None, error)  # /health and the log say it as for a refused append
            raise error
        self._promised += need
        return _Promise(self, need)

    def record_here(self, records: list[PredictionRecord]) -> None:
        """Ack mode, on a thread other than the loop that has the records ready (an engine worker,
        ``server.records``): sync them to the spool now, in log order with the committer's groups; raises
        ``SpoolUnavailable``. Saves the hand-offs to the committer thread and back. Whatever the outcome, the
        caller then has ``deliver_here`` run on the loop, with its own hand-off there (``GroupCommitter.deliver``).
        """
        started = time.perf_counter()
        self._committer.commit_here(records)
        self.metrics.store_ack_latency.observe(time.perf_counter() - started)

    def deliver_here(self) -> None:
        """On the loop, after ``record_here``: the writer hears of what it appended."""
        self._committer.deliver()

    def submit(self, record: PredictionRecord) -> None:
        """Record one prediction without waiting (the caller answers regardless); never blocks, never raises."""
        if not self.ack:
            self._writer.queue([record])
            return
        try:
            self._committer.append([record]).add_done_callback(self._count_unrecorded)
        except SpoolUnavailable as error:
            self._writer.lose(1, str(error))

    def health(self) -> dict:
        return self.state.health()

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Stop within ``timeout_s``: write what memory holds if the database is up, spool the rest."""
        if self._closed or self._worker is None:
            return
        self._closed = True
        await self._shut(timeout_s)

    # internals

    def _on_commit(self, commit: Commit | None, error: SpoolUnavailable | None) -> None:
        self._writer.committed(commit, error)

    def _count_unrecorded(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is not None:
            self._writer.lose(1, str(future.exception()))

    def _open_spool(self) -> int:
        """Blocking: lock, identity, foreign spools, WAL; returns the records left by a previous process."""
        directory = self._directory
        directory.lock()
        try:
            self._set_aside_foreign(directory.read_identity(), self._identity)
            rows = self._wal.open()
            self.state.gaps = self._wal.gaps
            self.state.rejected_rows = self._rejected.count()
            self._rejected_seen = self._rejected.signature()
            self.state.foreign = self._foreign_reports()
            return rows
        except OSError as error:
            directory.unlock()
            raise directory.cannot_use(error) from error
        except BaseException:
            directory.unlock()
            raise

    def _set_aside_foreign(self, recorded: dict | None, identity: dict) -> None:
        """Move records bound for another database (or an unknown one) out of the way, untouched."""
        directory = self._directory
        legacy = directory.path / LEGACY_SPOOL  # an earlier release's spool: its database is unknown
        if legacy.exists():
            if regular_size(legacy):  # a FIFO or device there is refused (NotRegularFile), not deleted as empty
                self._report_set_aside(directory.set_aside([LEGACY_SPOOL], None), None, identity)
            else:
                legacy.unlink()
        if recorded == identity:
            return
        names = sorted(entry.name for entry in directory.path.iterdir() if entry.is_file() and entry.stat().st_size
                       and (is_segment(entry.name) or entry.name == REJECTED_FILE
                            or entry.name.startswith(TAKEN_PREFIX)))
        if names:
            self._report_set_aside(directory.set_aside(names, recorded), recorded, identity)
        directory.write_identity(identity)

    def _report_set_aside(self, foreign: ForeignSpool, recorded: dict | None, identity: dict) -> None:
        log.error("store: SPOOL_DIR holds predictions for %s, not for this DATABASE_URL (%s); they are kept, "
                  "untouched, in %s and will not be replayed here. To replay them into the database they belong "
                  "to, with its URL: %s", describe_identity(recorded), describe_identity(identity), foreign.path,
                  replay_command(foreign.path))

    def _foreign_reports(self) -> list[ForeignReport]:
        """Set-aside spools that still hold records (or rejected rows) bound for another database.

        Counting streams the files, so a spool is counted again only when its files changed (the CLI
        replaying it), not at every look: a large foreign spool costs one read, not one every few seconds.
        """
        reports = []
        for foreign in self._directory.foreign_spools():
            signature = tuple(sorted((p.name, p.stat().st_size) for p in foreign.path.iterdir() if p.is_file()))
            known = self._foreign_counted.get(foreign.path)
            if known is None or known[0] != signature:
                rows, size = count_spool(foreign.path)
                known = (signature, ForeignReport(foreign.path, rows, size, RejectedFile(foreign.path).count(),
                                                  describe_identity(foreign.identity)))
                self._foreign_counted[foreign.path] = known
            if known[1].rows or known[1].rejected_rows:
                reports.append(known[1])
        return reports

    async def _watch_disk(self) -> None:
        """Keep /health's rejected and foreign counts true: counted from the files (the one source), again when the
        writer sets rows aside and every ``WATCH_INTERVAL_S`` (the CLI works on them beside the server); and keep
        SPOOL_DIR's lock (``SpoolDirectory.keep_lock``)."""
        while not self._closed:
            try:
                await asyncio.wait_for(self._disk_changed.wait(), WATCH_INTERVAL_S)
            except TimeoutError:
                pass
            self._disk_changed.clear()
            if self._closed:
                return
            try:
                seen = await asyncio.to_thread(self._rejected.signature)
                if seen != self._rejected_seen:
                    self.state.rejected_rows = await asyncio.to_thread(self._rejected.count)
                    self._rejected_seen = seen
                if self.state.foreign:
                    self.state.foreign = await asyncio.to_thread(self._foreign_reports)
                self.state.lock_problem = await asyncio.to_thread(self._directory.keep_lock)
                await asyncio.to_thread(self._directory.keep_identity, self._identity)
            except OSError as error:
                log.warning("store: could not look at SPOOL_DIR: %s", error)

    async def _shut(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s

        def left(reserve: float = 0.0) -> float:
            return max(0.0, deadline - loop.time() - reserve)

        writer_free = True
        if self._tasks:  # asked to stop, not cancelled: asyncio.wait_for can swallow a cancellation (Python 3.11)
            self._writer.stop()
            self._disk_changed.set()
            done, pending = await asyncio.wait(self._tasks, timeout=left() / 2)
            writer_free = self._tasks[0] in done
            for task in pending:  # a database call hangs: stop waiting; its records are spooled below
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=min(1.0, left()))
        try:  # everything held in memory goes to the spool first: the fast, local, bounded part
            await asyncio.wait_for(self._writer.spool_leftovers(), left())
        except TimeoutError:  # they went uncounted (red team helper-75)
            self._writer.drop_unlogged("they could not be spooled within the shutdown deadline")
        # its own threads, not the loop's executor, whose workers may all be held by database calls that hang
        committer_stopped = await on_own_thread(self._committer.stop, left(), name="store-close")
        self._committer.deliver()  # an engine worker's last appends, should their batch's hand-off not have come
        if not committer_stopped:
            log.error("store: the spool's committer (or an append on an engine worker) did not finish within the "
                      "shutdown deadline")
        if writer_free:  # then, if the database is up, what the writer holds of the spool's tail
            try:
                await asyncio.wait_for(self._writer.final_flush(), left(reserve=0.5))
            except TimeoutError:
                writer_free = False
        self._writer.forget_tail()
        if writer_free:
            try:
                cursor = self._writer.cursor
                await asyncio.wait_for(self._worker.call(lambda: self._wal.release(cursor, force=True)), left())
            except (TimeoutError, OSError) as error:
                log.warning("store: spool segments not released at shutdown: %r", error)
        self._worker.stop()
        if not writer_free:
            log.error("store: a database call was still hanging at the shutdown deadline; its records are in "
                      "the spool and will be offered again at the next start (duplicates are ignored)")
        await on_own_thread(self._finish, writer_free, committer_stopped, name="store-close")
        spooled = self.state.spool_rows
        log.info("store closed: %s", f"{spooled} predictions left in the spool for the next start" if spooled
                 else "every prediction is in the database")

    def _finish(self, dispose: bool, close_wal: bool) -> None:
        """Release what can be released without waiting on a thread that may hang."""
        if close_wal:
            self._wal.close()
        if dispose:
            self.engine.dispose()
        self._directory.unlock()


class _Promise:
    """``PredictionStore.room_for``'s promise, given back when the request's block ends."""

    def __init__(self, store: PredictionStore, size: int) -> None:
        self._store, self._size = store, size

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self._store._promised -= self._size
