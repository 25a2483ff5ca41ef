"""The writer: one task on the event loop that moves records into the database, in spool order.

It keeps one position, ``cursor``: every spool (WAL) record before it is in the database. What comes
after is taken from the cheapest place that holds it:

- the **tail** it holds in memory: groups committed while the database is up are handed over by the
  committer, so in steady state nothing is read back from disk. The tail is capped in rows (``cache_rows``)
  and in bytes (``cache_bytes``, its span of the spool: about what its texts hold in memory); past either,
  or when the database goes down, it is dropped (the records stay on disk). A commit larger than the byte cap
  is not held at all. Without the byte cap, a database slower than the answers let the tail hold 16,384
  records of up to MAX_TEXT_CHARS each (over 300 MB), outside the memory plan: a burst of 15,000-character
  texts raised the server's peak memory by ~200 MiB;
- the **backlog** on disk (records before the tail): read back in chunks of ``batch_rows``, about a
  second of work per flush, so a large backlog never stalls the writer or the records behind it;
- in async mode, records kept in memory only (``unlogged``, bounded: ``unlogged.UnloggedQueue``): written
  directly while the spool is empty and the database up, otherwise appended to the spool behind what is
  there, so order is kept, a chunk at a time (a queue larger than the spool still fills it). While a database
  call hangs (a lock, a stalled server: until its timeout) the queue is spooled as soon as it is half full, not
  at the next flush, which waits for the call (``_spill``): a 5 s lock on an async server's SQLite file dropped
  18,262 of 20,000 records with the spool empty (red team helper-89). What the spool refuses waits in memory up
  to the queue's bound; beyond it records are dropped and counted lost.

Segments whose records are all in the database are released (deleted) after each write. A flush runs
every ``flush_interval_s`` or as soon as ``batch_rows`` records wait, and back to back while a backlog
remains. When a database call fails the database is marked down and retried every
``retry_interval_s``, with a ping when there is nothing to write, so an idle server notices recovery; while
it is up, a ping after ``check_interval_s`` without a database call, so an idle server notices an outage too
(it said "up" for as long as no record came: red team helper-89).
The state lives in ``StoreState`` and is changed only here, on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.metrics import Metrics
from server.primitives import PredictionRecord
from server.store.committer import Commit, GroupCommitter
from server.store.db import describe
from server.store.rows import record_row
from server.store.sink import DatabaseSink, WriteOutcome
from server.store.state import StoreState
from server.store.throttle import Throttle
from server.store.unlogged import UnloggedQueue
from server.store.wal import RecordsTooLarge, SpoolUnavailable, WriteAheadLog
from server.store.worker import BlockingWorker

log = logging.getLogger(__name__)

CACHE_ROWS = 16_384  # the most committed records held in memory for the writer (beyond: read back from disk)
CACHE_BYTES = 32 << 20  # and the most spool bytes they may span (the memory plan's margin holds it)
REPLAY_BUDGET_S = 1.0  # disk backlog read back per flush, in seconds of work
QUEUE_BYTES = 32 << 20  # async mode: the most memory records held in memory only may take (estimated)
CHECK_INTERVAL_S = 5.0  # an idle writer asks the database this often whether it still takes writes


@dataclass
class ReplayProgress:
    cursor: int
    lines: int = 0
    wrote: bool = False  # a database call was made (and succeeded, unless error)
    outcome: WriteOutcome = field(default_factory=WriteOutcome)
    error: BaseException | None = None


class Writer:
    def __init__(self, *, state: StoreState, wal: WriteAheadLog, sink: DatabaseSink, committer: GroupCommitter,
                 metrics: Metrics, store_text: bool, batch_rows: int, flush_interval_s: float,
                 retry_interval_s: float, max_queue: int, on_rejected: Callable[[], None],
                 cache_rows: int = CACHE_ROWS, cache_bytes: int = CACHE_BYTES,
                 max_queue_bytes: int = QUEUE_BYTES, check_interval_s: float = CHECK_INTERVAL_S) -> None:
        self.state = state
        self._on_rejected = on_rejected  # rejected.jsonl changed: /health recounts it
        self._wal = wal
        self._sink = sink
        self._committer = committer
        self._metrics = metrics
        self._store_text = store_text
        self._batch_rows = batch_rows
        self._flush_interval_s = flush_interval_s
        self._retry_interval_s = retry_interval_s
        self._check_interval_s = check_interval_s
        self._answered_at = 0.0  # when the database last answered a call (monotonic)
        self._cache_rows = cache_rows
        self._cache_bytes = cache_bytes
        self._worker: BlockingWorker | None = None
        self.cursor = 0  # WAL position: every record before it is in the database
        self.wal_end = 0  # end of the last group committed (as the loop has heard)
        self._cache: deque[Commit] = deque()
        self._unlogged = UnloggedQueue(max_queue, max_queue_bytes)
        self._in_flight: list[dict[str, Any]] = []  # unlogged rows inside a database call right now
        self._spill: asyncio.Task | None = None  # spooling the queue while that call hangs (``queue``)
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._retry_at = 0.0
        self._release_at = 0.0
        self._bytes_at_refusal = 0  # the spool's size when it last refused an append
        self._throttle = Throttle(log)

    def begin(self, worker: BlockingWorker, start: int, end: int, rows: int) -> None:
        """Start from the spool a previous process left: ``rows`` records between LSN ``start`` and ``end``."""
        self._worker = worker
        self.cursor, self.wal_end = start, end
        self.state.pending_rows = rows

    # fed on the loop

    def committed(self, commit: Commit | None, error: SpoolUnavailable | None) -> None:
        """The committer's report (on the loop, in commit order): rows now durable, or why the spool refused."""
        state = self.state
        if isinstance(error, RecordsTooLarge):  # their size, not the spool's state: it takes the others
            if state.durability == "ack":  # (async mode counts such a record lost: ``_spool_unlogged``)
                self._throttle.log("too_large", logging.WARNING, "store: %s; that request was answered 413 (raise "
                                   "SPOOL_MAX_BYTES for requests this large)", error)
            return
        if error is not None:
            state.append_error = str(error)
            self._bytes_at_refusal = self._wal.bytes
            self._throttle.log("spool", logging.ERROR, "store: the spool refused %s: %s",
                               "records" if error.cause != "closed" else "records at shutdown", error)
            return
        if state.append_error:
            # Not a reset of the refusal's throttle: filling the last bytes of a full spool alternates refusals
            # and smaller appends that fit, which would log a pair of lines each.
            self._throttle.log("spool-ok", logging.INFO, "store: the spool takes records again")
            state.append_error = None
        state.pending_rows += len(commit.rows)
        self.wal_end = commit.end
        if state.database_up:
            if self._cache and (self._cache[-1].end != commit.start or commit.end - self._cache[0].start >
                                self._cache_bytes or state.cached_rows + len(commit.rows) > self._cache_rows):
                self._drop_cache()  # the older part is read back from disk
            if commit.end - commit.start <= self._cache_bytes:
                self._cache.append(commit)
                state.cached_rows += len(commit.rows)
            if state.cached_rows >= self._batch_rows or self.wal_end - self.cursor >= self._wal.max_bytes // 4:
                self._wakeup.set()  # by bytes too: a few large records had the spool refuse others until a flush

    def queue(self, records: list[PredictionRecord]) -> None:
        """Async mode: keep records in memory for the next flush (never blocks, never raises)."""
        for record in records:
            try:
                row = record_row(record, self._store_text)
            except Exception:
                self._metrics.store_write_errors.inc()
                log.exception("store: could not queue prediction %s", getattr(record, "id", "?"))
                continue
            if self._stopping:
                self.lose(1, "the store is closed")
            elif not self._unlogged.put(row):
                self.lose(1, f"the store's memory queue is full ({len(self._unlogged)} records, "
                             f"{self._unlogged.bytes >> 20} MiB): records come faster than the database or the spool "
                             f"take them")
        self.state.unlogged_rows = len(self._unlogged) + len(self._in_flight)
        if len(self._unlogged) >= self._batch_rows:
            self._wakeup.set()
        if self._in_flight and self._spill is None and self._unlogged.half_full() and not self._stopping:
            self._spill = asyncio.get_running_loop().create_task(self._spill_beside_the_call(), name="store-spill")

    async def _spill_beside_the_call(self) -> None:
        """The flush is held by a database call and the memory queue is half full: spool it now (module docstring).
        What it spools puts the records queued after it behind it, in the spool, as a backlog does."""
        try:
            await self._spool_unlogged()
        finally:
            self._spill = None

    # the task

    async def run(self) -> None:
        while not self._stopping:
            if not self._backlog_to_replay():
                try:
                    await asyncio.wait_for(self._wakeup.wait(), self._flush_interval_s)
                except TimeoutError:
                    pass
            self._wakeup.clear()
            if self._stopping:
                return
            try:
                await self._cycle()
            except Exception:
                log.exception("store: writer failed; retrying")
                await asyncio.sleep(self._flush_interval_s)
            await asyncio.sleep(0)

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()

    async def final_flush(self) -> None:
        """At shutdown, once everything is spooled: the tail held in memory goes to the database if it is up;
        the disk backlog stays for the next start (replaying it could take longer than the shutdown may)."""
        if not self.state.database_up or self._backlog_to_replay():
            return
        try:
            await self._write_tail(everything=True)
        except Exception as error:
            self.mark_down(error)

    async def spool_leftovers(self) -> None:
        """At shutdown: records in memory only (async mode, or a write still hanging) go to the spool, in chunks
        as at a flush, so a nearly full spool still takes what fits; the rest is lost, counted."""
        if self._spill is not None:
            await asyncio.wait({self._spill})
        if self._in_flight:
            self._put_back(self._in_flight, "the memory queue is full at shutdown")
            self._in_flight = []
        if self._unlogged:
            await self._spool_unlogged()
        self.drop_unlogged("the spool cannot take them at shutdown")

    def drop_unlogged(self, why: str) -> None:
        """At shutdown: what memory still holds is lost, counted (``lose``)."""
        left = len(self._unlogged.take_all())
        if left:
            self.lose(left, why)
        self.state.unlogged_rows = 0

    def forget_tail(self) -> None:
        """At shutdown: the tail in memory is on disk as well; count it as backlog for the next start."""
        self._drop_cache()

    # one flush

    async def _cycle(self) -> None:
        state = self.state
        if state.database_up or asyncio.get_running_loop().time() >= self._retry_at:
            try:
                await self._to_database()
            except Exception as error:
                self.mark_down(error)
        if self._unlogged and (not state.database_up or state.pending_rows):
            await self._spool_unlogged()
        if not state.pending_rows and self._wal.bytes and (state.append_error or time.monotonic() >= self._release_at):
            self._release_at = time.monotonic() + self._retry_interval_s
            # an idle server's last segment goes too; at once after a refusal, which /health reports until room is
            # made (the active segment was kept IDLE_RETIRE_S, the refusal reported that long with all written)
            await self._worker.call(self._release, self.cursor, state.append_error is not None)
        if state.append_error and self._wal.bytes < self._bytes_at_refusal:
            # Segments were freed since the refusal: /health must not go on saying the spool is full on a
            # server with no traffic to prove otherwise (the next append says so again if it still is). Not a
            # reset of the refusal's throttle either: a spool kept at its cap by a slow database frees a segment
            # and refuses the next append again, over and over.
            self._throttle.log("spool-ok", logging.INFO, "store: the spool has room again (%d bytes freed since "
                               "it refused records)", self._bytes_at_refusal - self._wal.bytes)
            state.append_error = None
        elif state.append_error and state.durability == "async" and state.database_up and not state.pending_rows:
            # Async mode appends only while the database is down or behind; with neither, records are written
            # directly: no append comes to clear the refusal, and no record is lost to it any more.
            log.info("store: every record reaches the database directly again; the spool's refusal no longer "
                     "loses records")
            state.append_error = None
            self._throttle.reset("spool")

    async def _to_database(self) -> None:
        if self._backlog_to_replay() or (self.state.spool_rows and not self.state.database_up):
            await self._replay_backlog()
        if self._cache and self._cache[0].start == self.cursor:
            await self._write_tail()
        if self._unlogged and not self.state.pending_rows:
            await self._write_unlogged()
        if not self.state.database_up or time.monotonic() - self._answered_at >= self._check_interval_s:
            await self._worker.call(self._sink.ping)  # idle: ask, so that recovery, or an outage, is seen
            self.mark_up()

    async def _replay_backlog(self) -> None:
        state = self.state
        stop = self._cache[0].start if self._cache else self.wal_end
        budget = REPLAY_BUDGET_S if state.database_up else 0.0  # after an outage: one batch, then report up
        progress: ReplayProgress = await self._worker.call(self._replay_chunk, self.cursor, stop, budget)
        self.cursor = progress.cursor
        state.pending_rows -= progress.lines
        state.replayed_rows += progress.lines
        self._count(progress.outcome, replayed=True)
        self._settle_backlog()
        if progress.error is not None:
            raise progress.error
        if progress.wrote:
            self.mark_up()

    def _replay_chunk(self, position: int, stop: int, budget_s: float) -> ReplayProgress:
        """On the database thread: batches from disk until ``stop`` or ``budget_s`` has passed (at least one)."""
        progress = ReplayProgress(position)
        deadline = time.monotonic() + budget_s
        try:
            while progress.cursor < stop:
                lines, after = self._wal.read(progress.cursor, stop, self._batch_rows)
                if not lines and after == progress.cursor:  # nothing on disk up to stop: the files are gone
                    log.error("store: the spool has no records between positions %d and %d (segments removed by "
                              "hand?); going on from %d", after, stop, stop)
                    after = stop
                if lines:
                    progress.outcome.add(self._sink.write_lines(lines))
                    progress.wrote = True
                progress.cursor, progress.lines = after, progress.lines + len(lines)
                if time.monotonic() >= deadline:
                    break
        except Exception as error:
            progress.error = error
        self._release(progress.cursor)
        return progress

    async def _write_tail(self, everything: bool = False) -> None:
        """Write the committed groups held in memory: those present when the flush began (or all of them)."""
        state = self.state
        budget = state.cached_rows
        while self._cache and self._cache[0].start == self.cursor and (everything or budget > 0):
            taken, rows = [], []
            for commit in self._cache:
                if taken and len(rows) + len(commit.rows) > self._batch_rows:
                    break
                taken.append(commit)
                rows.extend(commit.rows)
            outcome = await self._worker.call(self._write_and_release, rows, taken[-1].end)
            budget -= len(rows)
            for commit in taken:
                if self._cache and self._cache[0] is commit:  # unless the tail was dropped meanwhile
                    self._cache.popleft()
                    state.cached_rows -= len(commit.rows)
            self.cursor = taken[-1].end
            state.pending_rows -= len(rows)
            self._count(outcome, replayed=False)
            self._settle_backlog()
            self.mark_up()

    async def _write_unlogged(self) -> None:
        """Async mode: the records queued when the flush began, straight to the database."""
        state = self.state
        budget = len(self._unlogged)
        while self._unlogged and not state.pending_rows and budget > 0:
            rows = self._unlogged.take(self._batch_rows)
            budget -= len(rows)
            self._in_flight = rows
            try:
                outcome = await self._worker.call(self._sink.write, rows)
            except BaseException:
                self._put_back(rows, "the database failed and the memory queue is full")
                raise
            finally:
                self._in_flight = []
                state.unlogged_rows = len(self._unlogged)
            self._count(outcome, replayed=False)
            self.mark_up()

    async def _spool_unlogged(self) -> None:
        """Async mode, database down or a backlog in the spool: put the records queued when the flush began behind
        it, on disk, in chunks of at most ``batch_rows`` and an eighth of the spool's cap: one append of the whole
        queue could be larger than the spool itself and would never fit. A refused chunk is halved and tried
        again, so a nearly full spool (or disk) is filled up to its last record; while it stays full, each flush
        tries one record, not the halving from a whole chunk down. What the spool refuses stays in memory, up to
        the queue's bound."""
        still_full = self.state.append_error is not None and self._wal.bytes >= self._bytes_at_refusal
        budget, chunk = len(self._unlogged), 1 if still_full else self._batch_rows
        while self._unlogged and budget > 0:
            rows = self._unlogged.take(min(budget, chunk), max_bytes=self._wal.max_bytes // 8)
            try:
                await self._committer.append(rows, rows=True)
            except asyncio.CancelledError:
                # Shutdown gave up on the writer: the append may still land, and a record spooled twice is stored
                # once, where one taken out of memory and not spooled would be lost uncounted.
                self._put_back(rows, "the memory queue is full at shutdown")
                raise
            except RecordsTooLarge:
                if len(rows) == 1:  # it can never be spooled: waiting in front, it kept every record behind it out
                    self.lose(1, "a record larger than the whole spool (SPOOL_MAX_BYTES) while the database cannot "
                                 "take it")
                    budget -= 1
                    continue
                self._put_back(rows, "the spool refuses records and the memory queue is full")
                chunk = len(rows) // 2
                continue
            except SpoolUnavailable:
                self._put_back(rows, "the spool refuses records and the memory queue is full")
                if len(rows) == 1:
                    break
                chunk = len(rows) // 2
                continue
            budget -= len(rows)
            chunk = min(self._batch_rows, chunk * 2)
        self.state.unlogged_rows = len(self._unlogged)

    def _put_back(self, rows: list[dict[str, Any]], why: str) -> None:
        dropped = self._unlogged.put_back(rows)
        if dropped:
            self.lose(dropped, why)

    # on the database thread

    def _write_and_release(self, rows: list[dict[str, Any]], upto: int) -> WriteOutcome:
        outcome = self._sink.write(rows)
        self._release(upto)
        return outcome

    def _release(self, upto: int, force: bool = False) -> None:
        try:
            self._wal.release(upto, force=force)
        except OSError as error:  # the records are in the database; the file stays until the next release
            self._throttle.log("release", logging.ERROR, "store: could not delete a spooled segment: %s", error)

    # bookkeeping, on the loop

    def _backlog_to_replay(self) -> bool:
        return self.state.database_up and self.state.spool_rows > 0

    def _settle_backlog(self) -> None:
        """Once the cursor reaches the tail (or the end), no backlog is left: make the count say so exactly."""
        state = self.state
        reached = self.cursor >= (self._cache[0].start if self._cache else self.wal_end)
        if reached and state.pending_rows != state.cached_rows:
            if state.pending_rows > state.cached_rows:  # acknowledged, and now in no database and no spool
                self.lose(state.pending_rows - state.cached_rows, "spooled records were not found in the spool "
                          "(segments removed, moved or cut while the server ran, or another process writing "
                          "SPOOL_DIR); look for the files and replay them with `sentiment-analyzer spool replay "
                          "--spool-dir DIR`")
            state.pending_rows = state.cached_rows
        if reached:
            state.replayed_rows = 0

    def _count(self, outcome: WriteOutcome, *, replayed: bool) -> None:
        (self._metrics.store_replayed if replayed else self._metrics.store_written).inc(outcome.written)
        if outcome.rejected:
            self._on_rejected()
            self._metrics.store_rejected.inc(outcome.rejected)
            if all("line" in entry for entry in outcome.refused):  # damaged on disk: the database never saw them
                self._throttle.log("rejected", logging.ERROR, "store: %d spool lines are damaged, not records: set "
                                   "aside in %s to be looked at (no replay can write them)", outcome.rejected,
                                   self.state.rejected_path)
            else:
                self._throttle.log("rejected", logging.ERROR, "store: %d predictions could not be written (%s); kept "
                                   "in %s for `sentiment-analyzer spool replay-rejected`", outcome.rejected,
                                   outcome.refused[0]["error"], self.state.rejected_path)

    def _drop_cache(self) -> None:
        self._cache.clear()
        self.state.cached_rows = 0

    def mark_up(self) -> None:
        """After every successful step."""
        self._answered_at = time.monotonic()
        if self.state.mark_up():
            log.info("store: the %s database accepts writes%s", self.state.backend,
                     f"; replaying {self.state.spool_rows} spooled predictions" if self.state.spool_rows else "")
            self._throttle.reset("down")

    def mark_down(self, error: BaseException) -> None:
        self._metrics.store_write_errors.inc()
        self._retry_at = asyncio.get_running_loop().time() + self._retry_interval_s
        if self.state.mark_down(error):
            self._throttle.reset("down")
        self._drop_cache()  # its records stay on disk and are read back from there
        detail = describe(error)
        why = self.state.reason if self.state.reason in detail else f"{self.state.reason} ({detail})"
        self._throttle.log("down", logging.ERROR, "store: %s; spooling predictions to disk until it accepts writes, "
                           "retrying every %g s", why, self._retry_interval_s)

    def lose(self, count: int, why: str) -> None:
        """Records of answered predictions that will never reach the database: counted, on /health for a while
        (``StoreState.lost``), and logged with the total, as the line is throttled."""
        self.state.lost(count)
        self._metrics.store_write_errors.inc(count)
        self._metrics.store_lost.inc(count)
        self._throttle.log("lost", logging.ERROR, "store: %d prediction records lost (%d since start): %s", count,
                           self.state.lost_rows, why)
