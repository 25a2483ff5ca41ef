"""Batch budgets: derived from the memory limit at start-up (``plan_memory``), lowered at run time (``TokenBudget``).

The plan. What the process holds at its peak is, measured or bounded term by term:

    base (the loaded model and the server, measured)  +  cache (CACHE_MAX_BYTES)
    +  queued texts (MAX_QUEUE x what one holds)  +  ENGINE_WORKERS x the largest batch (the cost model)

and ``plan_memory`` chooses the settings the user left unset so that this stays under MEMORY_HIGH_WATER x
the memory limit (the container's, ``server.cgroup``). The rest of the limit (15 % by default) is the margin
for what the plan does not count: request bodies still arriving, responses, the store's buffers, the
allocator's slack. Settings the user did set win, but are checked: a plan that cannot fit stops start-up with
one line naming the settings, the parts and the limit it needs (``MemoryDoesNotFit``, exit code 2). The
default of each setting is its upper bound: more memory never makes batches, queue or cache larger than
the defaults the server was tuned with.

* ``MAX_BATCH_TOKENS``: one padded-token budget for every batch, evaluated at the model's max length. A token
  of a shorter batch costs less (attention grows with the length), so a batch within the budget at any
  length peaks at most at ``budget x token_bytes(max_length)``; the batcher can pack to one number. A lone
  text longer than the budget still runs alone, and ``MAX_BATCH_SIZE`` caps a batch too, so the largest
  batch is ``min(max(budget, max_length), MAX_BATCH_SIZE x max_length)`` tokens (``batch_tokens_at_peak``).
* ``ENGINE_WORKERS``: batches that run at once, each with its own peak; the automatic 2 drops to 1 when two
  max-length texts at once would not fit.
* ``MAX_QUEUE``: each queued text holds its request's body bytes and its string (one byte per character
  each for ASCII and Latin-1 JSON, at most ``MAX_TEXT_CHARS``) and its token ids: ``queued_text_bytes``.
  Scripts of 2-4 bytes per character hold more than this charges; a queue full of 20,000-character such
  texts would eat into the margin (lower ``MAX_TEXT_CHARS`` or ``MAX_QUEUE`` for such traffic). Derived: up to
  ``QUEUE_SHARE`` of the room above the base, never below ``MAX_TEXTS_PER_REQUEST``.
* ``CACHE_MAX_BYTES``: derived up to ``CACHE_SHARE`` of the room above the base.
* If even one max-length text per worker does not fit, the derived queue drops to ``MAX_TEXTS_PER_REQUEST``
  and the cache to 0 before start-up gives up and says what limit it needs.

On CUDA the batches run in device memory: their plan is against the GPU's (``CUDA_MEM_LIMIT``, else what
was free on the device before the model loaded), while base, cache and queue stay in host memory.

At run time (``TokenBudget``): after an OOM the budget drops to half the batch that failed (the batcher packs
to the budget, so this halves it); it climbs back by a tenth of the base only after a run of successes, so a
budget that just caused an OOM is not retried at once. Under host memory pressure (``MemoryGuard``) the
effective budget is halved on top, and restored when it ends. ``reduce_after_oom`` and ``record_success`` are
called from the engine's worker thread while the batcher reads ``current`` on the event loop, hence the lock.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

from server.config import Settings
from server.exitcodes import ExitCode, StartupError
from server.memory_model import CostModel
from server.metrics import Metrics

CACHE_SHARE = 0.10  # of the room above the base, at most, for a derived CACHE_MAX_BYTES
QUEUE_SHARE = 0.15  # of the room above the base, at most, for a derived MAX_QUEUE
QUEUED_TEXT_OVERHEAD = 1024  # a queued text's objects besides its characters and ids (work item, array, list slots)
PLANNED = ("max_batch_tokens", "engine_workers", "max_queue", "cache_max_bytes")  # batches first, then host-only
MIB = 1 << 20


class MemoryDoesNotFit(StartupError):
    """The settings, or one max-length text, cannot stay under MEMORY_HIGH_WATER x the memory limit."""

    exit_code = ExitCode.CONFIG


@dataclass(frozen=True)
class Area:
    """Memory the plan must stay within: its limit and what the process already holds there (measured)."""

    name: str  # as a message names it: "the memory limit", "GPU 0's memory"
    limit: int
    base: int
    high_water: float

    @property
    def ceiling(self) -> int:
        return int(self.limit * self.high_water)


def queued_text_bytes(settings: Settings, max_length: int) -> int:
    """What one queued text holds at most, ASCII assumed (module docstring): body bytes, string, token ids."""
    chars = min(settings.max_text_chars, settings.max_request_bytes)
    return 2 * chars + 8 * max_length + QUEUED_TEXT_OVERHEAD


@dataclass(frozen=True)
class MemoryPlan:
    host: Area
    device: Area | None  # where the batches run, when not in host memory (CUDA)
    model: CostModel
    max_length: int
    max_batch_size: int
    engine_workers: int
    batch_tokens: int
    max_queue: int
    cache_max_bytes: int
    queued_text_bytes: int
    derived: tuple[str, ...]  # the PLANNED settings the plan chose (the others were set by the user)

    @property
    def batch_area(self) -> Area:
        return self.device or self.host

    @property
    def batch_tokens_at_peak(self) -> int:
        """Padded tokens of the costliest batch the batcher can form (module docstring)."""
        return min(max(self.batch_tokens, self.max_length), self.max_batch_size * self.max_length)

    @property
    def batch_bytes(self) -> int:
        """Peak of the costliest batch: its tokens at the cost of a max-length token."""
        return math.ceil(self.batch_tokens_at_peak * self.model.token_bytes(self.max_length))

    @property
    def queue_bytes(self) -> int:
        return self.max_queue * self.queued_text_bytes

    @property
    def host_peak(self) -> int:
        batches = 0 if self.device else self.engine_workers * self.batch_bytes
        return self.host.base + self.cache_max_bytes + self.queue_bytes + batches

    @property
    def device_peak(self) -> int | None:
        return self.device.base + self.engine_workers * self.batch_bytes if self.device else None

    def apply(self, settings: Settings) -> Settings:
        """``settings`` with the planned values in place of the user's or the defaults."""
        return settings.model_copy(update={"max_batch_tokens": self.batch_tokens, "engine_workers": self.engine_workers,
                                           "max_queue": self.max_queue, "cache_max_bytes": self.cache_max_bytes})

    def check(self) -> None:
        """``MemoryDoesNotFit`` when a planned peak is above its area's ceiling."""
        for area, peak in ((self.host, self.host_peak), (self.device, self.device_peak)):
            if area is not None and peak > area.ceiling:
                raise MemoryDoesNotFit(self._does_not_fit(area, peak))

    def describe(self) -> dict[str, Any]:
        plan = {
            "engine_workers": self.engine_workers,
            "batch_tokens": self.batch_tokens,
            "batch_texts_at_max_length": self.batch_tokens_at_peak // self.max_length,
            "max_length": self.max_length,
            "max_queue": self.max_queue,
            "cache_max_bytes": self.cache_max_bytes,
            "derived": [name.upper() for name in self.derived],
            "base_bytes": self.host.base,
            "queue_bytes": self.queue_bytes,
            "batch_bytes": self.batch_bytes,
            "peak_bytes": self.host_peak,
            "ceiling_bytes": self.host.ceiling,
            "cost_model": self.model.describe([n for n in (64, 128, 256) if n < self.max_length] + [self.max_length]),
        }
        if self.device is not None:
            plan["device"] = {"name": self.device.name, "limit_bytes": self.device.limit,
                              "base_bytes": self.device.base, "peak_bytes": self.device_peak,
                              "ceiling_bytes": self.device.ceiling}
        return plan

    def _does_not_fit(self, area: Area, peak: int) -> str:
        """One line: what does not fit, its parts, and the limit (or the settings) that would make it fit."""
        parts = [f"the model and server {mib(area.base)}"]
        if area is self.host:
            parts += [f"the cache {mib(self.cache_max_bytes)} (CACHE_MAX_BYTES)",
                      f"{self.max_queue} queued texts {mib(self.queue_bytes)} (MAX_QUEUE, MAX_TEXT_CHARS)"]
        if area is self.batch_area:
            texts = self.batch_tokens_at_peak // self.max_length
            parts.append(f"{self.engine_workers} engine worker(s) (ENGINE_WORKERS) x a batch of {texts} text(s) of "
                         f"{self.max_length} tokens (MAX_BATCH_TOKENS={self.batch_tokens}) at "
                         f"{mib(self.batch_bytes)} each")
        needed = math.ceil(peak / area.high_water / MIB)
        in_area = PLANNED if self.device is None else PLANNED[:2] if area is self.device else PLANNED[2:]
        user_set = [name.upper() for name in in_area if name not in self.derived]
        what = (f"this server with {', '.join(user_set)} as set" if user_set else
                f"one text of {self.max_length} tokens (the model's max_sequence_length) next to the model")
        if area is self.host:
            fix = f"give it at least {needed} MiB (docker run --memory {needed}m; Kubernetes: limits memory {needed}Mi)"
        else:
            fix = f"set CUDA_MEM_LIMIT to at least {needed * MIB} or use a GPU with {needed} MiB free"
        if user_set:
            them = "them" if len(user_set) > 1 else "it"
            fix += f", or lower {' / '.join(user_set)} or leave {them} unset to have {them} derived from the limit"
        return (f"{area.name} ({mib(area.limit)}) cannot hold {what}: {' + '.join(parts)} = {mib(peak)} at the "
                f"peak, above MEMORY_HIGH_WATER={area.high_water:g} of it ({mib(area.ceiling)}); {fix}")


def plan_memory(settings: Settings, host: Area, model: CostModel, max_length: int, auto_workers: int,
                device: Area | None = None) -> MemoryPlan:
    """The plan for ``settings`` (module docstring); ``MemoryDoesNotFit`` when it cannot fit.

    ``host``: the memory limit and the measured base; ``device``: the GPU's, when the batches run there;
    ``auto_workers``: what ENGINE_WORKERS=0 means on this device and CPU (``server.engine.engine_workers``).
    """
    defaults = Settings.model_fields

    def user_set(name: str) -> bool:
        return name in settings.model_fields_set and not (name == "engine_workers" and settings.engine_workers == 0)

    derived = [name for name in PLANNED if not user_set(name)]
    per_text = queued_text_bytes(settings, max_length)
    room = host.ceiling - host.base
    if not settings.enable_model_caching:
        cache = 0
    elif user_set("cache_max_bytes"):
        cache = settings.cache_max_bytes
    else:
        cache = min(defaults["cache_max_bytes"].default, max(0, int(CACHE_SHARE * room)))
    if user_set("max_queue"):
        queue = settings.max_queue
    else:
        queue = max(settings.max_texts_per_request,
                    min(defaults["max_queue"].default, max(0, int(QUEUE_SHARE * room)) // per_text))
    workers = settings.engine_workers if user_set("engine_workers") else auto_workers
    token_bytes = model.token_bytes(max_length)
    one_text = max_length * token_bytes

    def batch_room() -> float:
        return device.ceiling - device.base if device else room - cache - queue * per_text

    if "engine_workers" in derived and batch_room() < workers * one_text:
        workers = 1
    if device is None and batch_room() < workers * one_text:  # squeeze what was derived before giving up
        cache = 0 if "cache_max_bytes" in derived else cache
        queue = settings.max_texts_per_request if "max_queue" in derived else queue
    if user_set("max_batch_tokens"):
        tokens = settings.max_batch_tokens
    else:
        fit = batch_room() / workers / token_bytes if token_bytes > 0 else math.inf
        tokens = max(1, int(min(defaults["max_batch_tokens"].default, fit)))
    plan = MemoryPlan(host=host, device=device, model=model, max_length=max_length,
                      max_batch_size=settings.max_batch_size, engine_workers=workers, batch_tokens=tokens,
                      max_queue=queue, cache_max_bytes=cache, queued_text_bytes=per_text, derived=tuple(derived))
    plan.check()
    return plan


def mib(n: float) -> str:
    return f"{n / MIB:,.0f} MiB"


class TokenBudget:
    """The padded-token budget of one model's batches; ``plan`` is the memory plan its base came from (None when
    built without one, in tests), which ``MemoryGuard`` exports for the model being served."""

    def __init__(
        self,
        base_tokens: int,
        metrics: Metrics,
        min_tokens: int = 64,
        recover_after: int = 20,
        recover_fraction: float = 0.1,
        plan: MemoryPlan | None = None,
    ) -> None:
        if base_tokens < 1:
            raise ValueError(f"base_tokens must be >= 1, got {base_tokens}")
        self.base_tokens = base_tokens
        self.plan = plan
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
