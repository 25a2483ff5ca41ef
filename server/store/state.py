"""``StoreState``: what the store reports on /health and /metrics, owned by the event loop.

Worker threads never write it: their results come back to the loop (futures resolved with
``call_soon_threadsafe``) and the loop applies them here. /health, the metrics and the writer therefore
read one consistent picture: the state and ``spool_rows`` change in the same step, so /health cannot say
"degraded" about a backlog it reports as 0 (the race behind tests/test_outage.py's rare failure). The
gauges are set from it when /metrics is scraped (``publish``, on the loop too), not at each change: a lone
request's commit set seven of them, ~30 us of the loop's time per request on a 2-core VM.

States of the database (``state``):
- ``up``: the last database call succeeded and no spooled record waits on disk;
- ``replaying``: writes succeed and spooled records are being read back from disk (``replay`` gives the
  progress); the store is up (``sentiment_store_up`` 1) but /health says degraded until the backlog is in;
- ``down``: the last call failed; it is retried every retry interval, with or without traffic.

Counts: ``queue_depth`` is records held in memory waiting for the database (in ack mode they are also
in the spool already); ``spool_rows`` is records on disk that must be read back (the backlog);
``spool_bytes`` is the spool's size on disk, capped by ``SPOOL_MAX_BYTES``; ``lost_rows`` is records dropped, each
counted, and /health says degraded for ``LOST_SHOWN_S`` after the last one (it said ok while an async server dropped
thousands: red team helper-89); ``lost_bytes`` is acknowledged records found missing from the spool at start (a
segment cut short or removed on disk, ``wal.SpoolGap``): their bytes are gone, so they can only be estimated
(``spool_damage``), and /health stays degraded for the life of the process, saying what to do. The database section
never shows connection details or a driver's error text (those go to the log).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.metrics import Metrics
from server.store.migrate import SchemaBehind
from server.store.sink import DatabaseRefuses
from server.store.sqlite_file import SqliteFileChanged
from server.store.trouble import trouble_kind
from server.store.wal import GAP_ADVICE, SpoolGap

LOST_SHOWN_S = 600.0  # /health says records were lost this long after the last one (the counter keeps them all)


@dataclass(frozen=True)
class ForeignReport:
    path: Path
    rows: int  # records in its write-ahead log
    bytes: int
    rejected_rows: int  # rows its database had refused
    database: str  # the database it was written for, as ``describe_identity`` names it (no password)


class StoreState:
    def __init__(self, metrics: Metrics, *, backend: str, durability: str, spool_limit: int,
                 rejected_path: Path, spool_bytes: Callable[[], int], call_age_s: Callable[[], float],
                 stalled_after_s: float) -> None:
        self._metrics = metrics
        self.backend = backend
        self.durability = durability
        self.spool_limit = spool_limit
        self.rejected_path = rejected_path
        self._spool_bytes = spool_bytes  # sampled from the WAL, which owns its size
        self._call_age_s = call_age_s  # how long the store's database call under way has run
        self.stalled_after_s = stalled_after_s  # a call running longer reads as a database not answering
        self.database_up = False
        self.reason: str | None = "not started"
        self.pending_rows = 0  # records in the spool not yet in the database
        self.cached_rows = 0  # of those, records the writer also holds in memory
        self.unlogged_rows = 0  # async mode: records in memory only
        self.replayed_rows = 0  # read back from disk since the current backlog began
        self.rejected_rows = 0
        self.lost_rows = 0
        self.lost_at: float | None = None  # when the last record was lost (monotonic)
        self.gaps: list[SpoolGap] = []  # acknowledged records found missing from the spool at start
        self.append_error: str | None = None  # the spool refused the last append (cleared by the next success)
        self.foreign: list[ForeignReport] = []
        self.lock_problem: str | None = None  # SPOOL_DIR's lock is no longer this process's (``keep_lock``)
        metrics.store_spool_limit.set(spool_limit)

    @property
    def spool_rows(self) -> int:
        return max(0, self.pending_rows - self.cached_rows)

    @property
    def state(self) -> str:
        if not self.database_up:
            return "down"
        return "replaying" if self.spool_rows else "up"

    def mark_up(self) -> bool:
        """True when this changes the state."""
        changed = not self.database_up
        self.database_up, self.reason = True, None
        return changed

    def mark_down(self, error: BaseException) -> bool:
        changed = self.database_up
        self.database_up, self.reason = False, public_reason(error)
        return changed

    def lost(self, count: int) -> None:
        self.lost_rows += count
        self.lost_at = time.monotonic()

    def publish(self) -> None:
        """Set the store's gauges from the state (at scrape time: ``Services.refresh_gauges``)."""
        metrics = self._metrics
        state = self.state
        metrics.store_up.set(1 if self.database_up else 0)
        metrics.store_replaying.set(1 if state == "replaying" else 0)
        metrics.store_spool_rows.set(self.spool_rows)
        metrics.store_foreign_spool_rows.set(sum(foreign.rows for foreign in self.foreign))
        metrics.store_spool_bytes.set(self._spool_bytes())
        metrics.store_spool_lost_bytes.set(self.lost_bytes)
        metrics.store_queue_depth.set(self.cached_rows + self.unlogged_rows)

    @property
    def lost_bytes(self) -> int:
        return sum(gap.lost_bytes for gap in self.gaps)

    def health(self) -> dict[str, Any]:
        state, spooled = self.state, self.spool_rows
        reasons = []
        if state == "down":
            reasons.append(f"{self.reason}; {spooled} predictions spooled to disk until it accepts writes")
        elif state == "replaying":
            reasons.append(f"replaying spooled predictions into the database: {self.replayed_rows} written, "
                           f"{spooled} to go")
        waited = self._call_age_s()
        if state != "down" and waited >= self.stalled_after_s:
            kept = ("records are kept in the spool meanwhile" if self.durability == "ack" else
                    "records wait in memory meanwhile (a crash would lose them), and in the spool once it fails")
            reasons.append(f"the database has not answered for {waited:.0f} s (a lock, or a stalled server or "
                           f"network; the call fails at its timeout): {kept}")
        if self.append_error:
            consequence = ("/predict answers 503 until it can" if self.durability == "ack"
                           else "predictions are served but their records are lost")
            reasons.append(f"the spool cannot take records ({self.append_error}): {consequence}")
        if self.lost_at is not None and time.monotonic() - self.lost_at < LOST_SHOWN_S:
            reasons.append(f"{self.lost_rows} answered predictions' records lost since start, the last "
                           f"{time.monotonic() - self.lost_at:.0f} s ago: in no database and no spool (the log's "
                           "'records lost' lines say why)")
        if self.lock_problem:
            reasons.append(self.lock_problem)
        lost = [gap for gap in self.gaps if not gap.overlap_bytes]
        if lost:
            reasons.append(f"acknowledged predictions were missing from the spool at start, {self.lost_bytes} bytes "
                           f"({damage(lost)}): lost to damage on disk, not replayed. {GAP_ADVICE}")
        reasons.extend(f"the spool was written by something else: {gap.describe()}" for gap in self.gaps
                       if gap.overlap_bytes)
        for foreign in self.foreign:
            reasons.append(f"a spool of {foreign.rows} predictions for another database ({foreign.database}) was set "
                           f"aside in {foreign.path}: replay it there with `{replay_command(foreign.path)}`")
        return {
            "status": "degraded" if reasons else "ok",
            "state": state,
            "reason": "; ".join(reasons) or None,
            "backend": self.backend,
            "durability": self.durability,
            "queue_depth": self.cached_rows + self.unlogged_rows,
            "spool_rows": spooled,
            "spool_bytes": self._spool_bytes(),
            "spool_limit_bytes": self.spool_limit,
            "replay": {"rows_done": self.replayed_rows, "rows_left": spooled} if state == "replaying" else None,
            "rejected_rows": self.rejected_rows,
            "rejected_path": str(self.rejected_path),
            "lost_rows": self.lost_rows,
            "lost_bytes": self.lost_bytes,
            "spool_damage": [{"path": str(gap.path), "lost_bytes": gap.lost_bytes, "estimated_rows": gap.estimated_rows,
                              "overlap_bytes": gap.overlap_bytes} for gap in self.gaps],
            "foreign_spools": [{"path": str(f.path), "rows": f.rows, "bytes": f.bytes, "rejected_rows": f.rejected_rows,
                                "database": f.database, "command": replay_command(f.path)} for f in self.foreign],
        }


def damage(gaps: list[SpoolGap]) -> str:
    """Where the spool lost records and about how many: "after wal-….jsonl, about 228 records (estimated)"."""
    return "; ".join(f"after {gap.path.name}, " + (f"about {gap.estimated_rows} records (estimated from the average "
                     "record size)" if gap.estimated_rows else "records that cannot be counted") for gap in gaps)


def replay_command(path: Path) -> str:
    """Said the same in /health, the log and `spool status`, each beside the database the spool was written for,
    whose URL is the one to give: it said DATABASE_URL in /health, which names this server's, the wrong one."""
    return f"sentiment-analyzer spool replay --spool-dir {path} --into URL"


def public_reason(error: BaseException) -> str:
    """Why the database is down, for /health: the kind of trouble, never hosts, users or a driver's text."""
    if isinstance(error, SchemaBehind):
        return str(error)  # names revisions and the command to run, nothing about the connection
    if isinstance(error, DatabaseRefuses):
        return f"the database refuses every row ({error.error_type}; details in the log)"
    if isinstance(error, OSError) and not hasattr(error, "orig"):
        return f"the spool cannot be read ({type(error).__name__}; details in the log)"
    inner = getattr(error, "orig", None) or error
    if isinstance(inner, SqliteFileChanged):
        return str(inner)  # names the local file and what to do, nothing about a connection
    kind = trouble_kind(inner)
    return f"database unavailable ({type(inner).__name__}" + (f": {kind})" if kind else ")")
