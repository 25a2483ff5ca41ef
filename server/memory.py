"""Memory limit, RSS, and MemoryGuard: give memory back before the kernel's OOM killer takes the pod.

The limit that matters in a container is the cgroup's, not the host's (``server.cgroup``). The batches, engine
workers, queue and cache are planned at start-up to peak under MEMORY_HIGH_WATER x that limit
(``server.budget``); the guard is the safety net for what the plan does not count.

Above the high-water ratio the guard sheds half the prediction cache and halves the token budget (smaller
batches, smaller activation peaks); below the low-water ratio it lifts the budget cut. The gap between the
two keeps it from flapping. Freed cache entries lower RSS only partly (the allocator keeps some arenas), so
shedding continues on every check while RSS stays above high water. A reload hands the guard the new
runtime's budget (``follow``), so it always drives the model being served.

Freed memory goes back to the system at once (``return_large_blocks``): glibc otherwise keeps the large blocks
ONNX Runtime's arena and the request path free in per-thread heaps, where they count against the limit
without being in use. Measured on the default model, three requests of 256 long texts at the 1g plan: the
server's peak went from 953 to 737 MiB and its RSS after the burst from 514 to 243 MiB, at the same speed.

It also holds the budget of request bodies in flight (``bodies``, a ``BodyBudget``: the HTTP middleware and the gRPC
handlers reserve from it) and gives it the serving plan's limit, so a reload's plan applies to the bodies too.

It also exports what the memory looks like: the headroom below high water on every check, and the serving
model's memory plan and cost model (``sentiment_memory_plan_bytes``, ``sentiment_memory_cost_*``) when it
starts to drive a budget; ``describe`` is the same for ``/health``.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import platform
from collections.abc import Callable
from typing import Any

import psutil

from server.budget import TEXT_WORK_BYTES, BodyBudget, MemoryPlan, TokenBudget
from server.cache import PredictionCache
from server.cgroup import OUT_OF_FILES, memory_limit_bytes, memory_peak_bytes
from server.config import Settings
from server.metrics import Metrics
from server.store.throttle import Throttle

log = logging.getLogger(__name__)
CHECK_FAILURES = Throttle(log)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
LARGE_BLOCK_BYTES = 1 << 20


def return_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Have glibc map every allocation of ``threshold`` bytes or more on its own, and unmap it when freed.

    By default the threshold grows with the blocks freed (up to 32 MiB), so after the first large batch its
    arena regions and the request path's buffers are carved from per-thread heaps that keep them when freed.
    Setting it fixes it, and may be done at any time. Returns False where the C library is not glibc.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, threshold))


def trim_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``), after a large load was dropped: a
    tokenizer's many small allocations stay with the process when freed (a red team's failed reload of a 42 MB one
    left RSS 300 MiB up, the server degraded and every later reload refused for want of memory; trimmed, it falls
    back: 277 to 20 MiB in 17 ms here). Returns False where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    ctypes.CDLL(None).malloc_trim(0)
    return True


class ProcessRss:
    """The process's RSS from ``/proc/self/statm``, kept open and read again from its start each time: a read
    needs no new file descriptor. With psutil each read opened ``/proc/<pid>/stat``; a flood of connections that
    used up the process's files made every read fail, so the guard went blind, and /health and /metrics answered
    500 (red team helper-86). psutil where there is no procfs."""

    def __init__(self, path: str = "/proc/self/statm") -> None:
        self._path = path
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._fd: int | None = None
        self._pid = 0  # whose statm ``_fd`` reads: a forked child reopens it (``/proc/self`` was its parent's)

    def __call__(self) -> int:
        if self._pid != os.getpid():
            self._reopen()
        if self._fd is None:
            return psutil.Process().memory_info().rss
        return int(os.pread(self._fd, 128, 0).split()[1]) * self._page

    def _reopen(self) -> None:
        try:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:  # no procfs: psutil's way; no file to spare: that too, and again next time
            self._fd = None
            if error.errno in OUT_OF_FILES:
                return
        self._pid = os.getpid()


process_rss_bytes = ProcessRss()


class MemoryGuard:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        cache: PredictionCache,
        budget: TokenBudget,
        rss_reader: Callable[[], int] = process_rss_bytes,
        limit_reader: Callable[[], int] = memory_limit_bytes,
        peak_reader: Callable[[], int | None] = memory_peak_bytes,
    ) -> None:
        self._high = settings.memory_high_water
        self._low = settings.memory_low_water
        self._metrics = metrics
        self._cache = cache
        self._rss_reader = rss_reader
        self._limit_reader = limit_reader
        self._peak_reader = peak_reader
        self.under_pressure = False
        self.bodies = BodyBudget()
        metrics.memory_pressure.set(0)
        self.follow(budget)

    def check(self) -> bool:
        """One step: export RSS and limit, shed or recover; returns whether memory is under pressure."""
        rss, limit = self._rss_reader(), self._limit_reader()
        self._metrics.rss.set(rss)
        self._metrics.memory_limit.set(limit)
        self._metrics.memory_headroom.set(int(self._high * limit) - rss)
        ratio = rss / limit
        if ratio >= self._high:
            freed = self._cache.shed(0.5)
            if not self.under_pressure:
                log.warning(
                    "memory pressure: RSS %d of %d bytes (%.0f%%, high water %.0f%%): shedding the cache "
                    "(%d bytes freed) and halving the batch token budget",
                    rss, limit, ratio * 100, self._high * 100, freed,
                )
                self._set_pressure(True)
        elif ratio < self._low and self.under_pressure:
            log.info("memory pressure over: RSS %d of %d bytes (%.0f%%)", rss, limit, ratio * 100)
            self._set_pressure(False)
        return self.under_pressure

    def follow(self, budget: TokenBudget) -> None:
        """Drive ``budget`` from now on (a reload swapped in a runtime with its own), in the present pressure state:
        a model swapped in under pressure starts with its budget halved, as the old one had it."""
        self._budget = budget
        budget.set_memory_pressure(self.under_pressure)
        if budget.plan is not None:
            self.bodies.limit = budget.plan.body_bytes
            self._export_plan(budget.plan)

    def plan_outgrown(self) -> str | None:
        """Why the serving model's memory plan no longer fits, if it does not: the limit fell below the one it was
        made for (``docker update --memory``, a cgroup changed by hand) and its peak is above the new high-water
        mark. The plan is made at start (and at a reload); /health said ``ok`` and the server was then OOM-killed
        by requests the plan admitted (red team helper-69)."""
        plan = self._budget.plan
        if plan is None:
            return None
        limit = self._limit_reader()
        high = int(self._high * limit)
        if limit >= plan.host.limit or plan.host_peak <= high:
            return None
        return (f"the memory limit fell from {plan.host.limit >> 20} MiB to {limit >> 20} MiB after the memory plan "
                f"was made; its peak of {plan.host_peak >> 20} MiB is above the new high-water mark of {high >> 20} "
                "MiB: restart the server (or reload the model) so that it plans for the new limit")

    def describe(self) -> dict[str, Any]:
        """For ``/health``: the memory now, its limit and headroom, and the serving model's plan and cost model; what
        failed instead of the figures when they cannot be read (``unreadable``: /health says it, never a 500)."""
        try:
            rss, limit = self._rss_reader(), self._limit_reader()
        except OSError as error:
            return {"unreadable": f"{type(error).__name__}: {error.strerror or error}", "pressure": self.under_pressure,
                    "bodies_in_flight_bytes": self.bodies.held}
        high = int(self._high * limit)
        figures: dict[str, Any] = {
            "limit_bytes": limit, "rss_bytes": rss, "high_water_bytes": high, "headroom_bytes": high - rss,
            "cgroup_peak_bytes": self._peak_reader(), "pressure": self.under_pressure,
            "bodies_in_flight_bytes": self.bodies.held,
        }
        if self._budget.plan is not None:
            figures["plan"] = self._budget.plan.describe()
        return figures

    def _export_plan(self, plan: MemoryPlan) -> None:
        m = self._metrics
        m.memory_plan.clear()
        m.memory_plan.labels("host", "base").set(plan.host.base)
        m.memory_plan.labels("host", "cache").set(plan.cache_max_bytes)
        m.memory_plan.labels("host", "bodies").set(plan.bodies_peak)
        m.memory_plan.labels("host", "tokenizer").set(TEXT_WORK_BYTES)
        m.memory_plan.labels("host", "queue").set(plan.queue_bytes)
        batches = plan.engine_workers * plan.batch_bytes
        if plan.device is None:
            m.memory_plan.labels("host", "batches").set(batches)
        else:
            m.memory_plan.labels("gpu", "base").set(plan.device.base)
            m.memory_plan.labels("gpu", "batches").set(batches)
        m.memory_cost_per_token.set(plan.model.per_token)
        m.memory_cost_per_token_length.set(plan.model.per_token_length)

    async def run(self, interval_s: float) -> None:
        """Check every ``interval_s`` until cancelled; a failed check is logged, never fatal."""
        while True:
            try:
                self.check()
            except OSError as error:  # out of file descriptors (a flood of connections): a line a minute, no trace
                CHECK_FAILURES.log("unreadable", logging.WARNING, "memory check failed: %s", error)
            except Exception:
                log.exception("memory check failed")
            await asyncio.sleep(interval_s)

    def _set_pressure(self, on: bool) -> None:
        self.under_pressure = on
        self._budget.set_memory_pressure(on)
        self._metrics.memory_pressure.set(1 if on else 0)
