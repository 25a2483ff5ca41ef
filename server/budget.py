"""TokenBudget: the padded-token budget the batcher packs batches to, lowered by OOM and memory pressure.

Activation memory grows with batch x padded length, so the budget is counted in padded tokens. After an
OOM the budget drops to half the batch that failed (the batcher packs to the budget, so this halves it);
it climbs back by a tenth of the base only after a run of successes, so a budget that just caused an OOM
is not retried at once. Under host memory pressure (``MemoryGuard``) the effective budget is halved on
top, and restored when it ends.

``reduce_after_oom`` and ``record_success`` are called from the engine's worker thread while the batcher
reads ``current`` on the event loop, hence the lock.
"""

from __future__ import annotations

import threading

from server.metrics import Metrics


class TokenBudget:
    def __init__(
        self,
        base_tokens: int,
        metrics: Metrics,
        min_tokens: int = 64,
        recover_after: int = 20,
        recover_fraction: float = 0.1,
    ) -> None:
        if base_tokens < 1:
            raise ValueError(f"base_tokens must be >= 1, got {base_tokens}")
        self.base_tokens = base_tokens
        self.min_tokens = min(max(min_tokens, 1), base_tokens)
        self._metrics = metrics
        self._recover_after = recover_after
        self._step = max(1, int(base_tokens * recover_fraction))
        self._limit = base_tokens  # lowered by OOMs, recovered by successes
        self._pressure = False
        self._streak = 0
        self._lock = threading.Lock()
        self._export()

    @property
    def current(self) -> int:
        """Padded tokens the next batch may hold (a single text longer than this still runs alone)."""
        with self._lock:
            return max(self.min_tokens, self._limit // 2) if self._pressure else self._limit

    @property
    def memory_pressure(self) -> bool:
        return self._pressure

    def reduce_after_oom(self, failed_batch_tokens: int) -> None:
        """A batch of ``failed_batch_tokens`` padded tokens ran out of memory: keep to half of it (not below min).

        The halves of a split batch that fail again lower it no further than their own size says.
        """
        with self._lock:
            self._limit = max(self.min_tokens, min(self._limit, failed_batch_tokens // 2))
            self._streak = 0
        self._export()

    def record_success(self) -> None:
        """A batch ran; after ``recover_after`` in a row, raise the budget by a step towards base."""
        with self._lock:
            if self._limit >= self.base_tokens:
                return
            self._streak += 1
            if self._streak < self._recover_after:
                return
            self._streak = 0
            self._limit = min(self.base_tokens, self._limit + self._step)
        self._export()

    def set_memory_pressure(self, on: bool) -> None:
        with self._lock:
            self._pressure = on
        self._export()

    def _export(self) -> None:
        self._metrics.token_budget.set(self.current)
