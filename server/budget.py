"""Batch budgets: derived from the memory limit at start-up (``plan_memory``), lowered at run time (``TokenBudget``).

The plan. What the process holds at its peak is, measured or bounded term by term:

    base (the loaded model and the server, measured)  +  cache (CACHE_MAX_BYTES)
    +  request bodies in flight (``body_bytes`` x what a byte of body costs once parsed)
    +  the tokenizer's peak (``TEXT_WORK_BYTES``, whatever the requests' size: it takes a bounded number of
       characters at a time, ``server.tokenizer.ENCODE_CHARS_AT_ONCE``)
    +  queued texts (MAX_QUEUE x what one holds)  +  ENGINE_WORKERS x the largest batch (the cost model)

and ``plan_memory`` chooses the settings the user left unset so that this stays under MEMORY_HIGH_WATER x
the memory limit (the container's, ``server.cgroup``). The rest of the limit (15 % by default) is the margin
for what the plan does not count: gRPC messages before their handler takes them, the store's background
buffers, the allocator's slack.
Settings the user did set win, but are checked: a plan that cannot fit stops start-up with one line naming
the settings, the parts and the limit it needs (``MemoryDoesNotFit``, exit code 2). The default of each
setting is its upper bound: more memory never makes batches (in bytes: the default MAX_BATCH_TOKENS at the
max length), queue or cache larger than the defaults the server was tuned with.

* ``MAX_BATCH_TOKENS``: the padded tokens of a batch at the model's max length; what each engine worker's batch
  may cost is ``batch_tokens x token_bytes(max_length)`` bytes. A token of a shorter batch costs less
  (attention grows with the length), so a batch padded to ``width`` may hold as many tokens as cost the same
  bytes: ``batch_tokens x token_bytes(max_length) / token_bytes(width)`` (``batch_tokens_at``; at 128 tokens
  on the default model, 2.2 times as many). Derived, it is that function of the width; set by the user, it is
  also a flat cap at every width (the batches never hold more padded tokens than the user asked for), and
  checked at the max length, where a token costs most. A lone text longer than the budget still runs alone,
  and ``MAX_BATCH_SIZE`` caps a batch too, so the costliest batch costs what
  ``min(max(budget, max_length), MAX_BATCH_SIZE x max_length)`` tokens at the max length do
  (``batch_tokens_at_peak``), whatever its width.
* ``ENGINE_WORKERS``: batches that run at once, each with its own peak; the automatic 2 drops to 1 when two
  max-length texts at once would not fit, or two batches of a MAX_BATCH_TOKENS the user set.
* ``MAX_QUEUE``: each queued text holds its request's body bytes and its string (one byte per character
  each for ASCII and Latin-1 JSON, at most ``MAX_TEXT_CHARS``) and its token ids: ``queued_text_bytes``.
  Scripts of 2-4 bytes per character hold more than this charges; a queue full of 20,000-character such
  texts would eat into the margin (lower ``MAX_TEXT_CHARS`` or ``MAX_QUEUE`` for such traffic). Derived: up to
  ``QUEUE_SHARE`` of the room above the base, never below ``MAX_TEXTS_PER_REQUEST``.
* ``CACHE_MAX_BYTES``: derived up to ``CACHE_SHARE`` of the room above the base.
* ``body_bytes``: request bodies the HTTP server holds at once, from their first byte until they are answered
  (``BodyBudget``, enforced in ``server.http``; beyond it 503 + Retry-After). Each byte of body is charged
  ``BODY_COST_PER_BYTE``, what a request holds per byte of its body at its peak: the body, its chunks being
  joined, the parsed JSON and the validated texts (Python objects, measured with tracemalloc through the real
  app on a max-size request of 256 texts: 3.1 bytes per byte for ASCII, 4.1 for CJK, 9.1-10.0 when each text
  holds one character outside the BMP, so that Python stores each of its characters in 4 bytes;
  ``tests/test_memory_bodies.py`` holds it to ``BODY_PARSED_PER_BYTE``), plus the tokenizer's transient
  memory (about 2, resident memory) and the store's encoding of the records (1.7-2.9, resident memory).
  Up to ``BODY_SHARE`` of the room above the base and ``BODY_MOST_REQUESTS`` bodies of MAX_REQUEST_BYTES
  (16 MiB: more than the queue can take of such requests, and 16 KiB for each of MAX_CONNECTIONS' default
  1024), never below one (or none could be taken). No setting: it follows MAX_REQUEST_BYTES and the limit.
* If even one max-length text per worker does not fit, the derived queue drops to ``MAX_TEXTS_PER_REQUEST``,
  the cache to 0 and the bodies to one of MAX_REQUEST_BYTES before start-up gives up and says what limit it
  needs.

On CUDA the batches run in device memory: their plan is against the GPU's (``CUDA_MEM_LIMIT``, else what
was free on the device before the model loaded), while base, cache and queue stay in host memory.

At run time (``TokenBudget``): after an OOM the budget drops to half the batch that failed, in bytes (a batch
of width ``w`` that failed is counted as the max-length tokens that cost as much, and ``batch_tokens_at``
scales the lowered budget to every width as it does the planned one); it climbs back by a tenth of the base
only after a run of successes, so a budget that just caused an OOM is not retried at once. Under host
memory pressure (``MemoryGuard``) the effective budget is halved on top, and restored when it ends.
``reduce_after_oom`` and ``record_success`` are called from the engine's worker thread while the batcher
reads ``at`` on the event loop, hence the lock.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.config import Settings
from server.exitcodes import ExitCode, StartupError
from server.memory_model import CostModel
from server.metrics import Metrics
from server.tokenizer import ENCODE_CHARS_AT_ONCE, TOKENIZER_PEAK_PER_CHAR

CACHE_SHARE = 0.10  # of the room above the base, at most, for a derived CACHE_MAX_BYTES
QUEUE_SHARE = 0.15  # of the room above the base, at most, for a derived MAX_QUEUE
BODY_SHARE = 0.10  # of the room above the base, at most, for request bodies in flight
BODY_MOST_REQUESTS = 16  # bodies of MAX_REQUEST_BYTES in flight at most (twice what the default MAX_QUEUE takes)
BODY_PARSED_PER_BYTE = 11  # Python objects a request holds per byte of its body (measured 10.0 at worst)
BODY_NATIVE_PER_BYTE = 5  # the tokenizer's and the store's encoding's memory per byte of body (2 + 2-3)
BODY_COST_PER_BYTE = BODY_PARSED_PER_BYTE + BODY_NATIVE_PER_BYTE
# The tokenizer's own peak beside the bodies, whatever their size: it takes at most ENCODE_CHARS_AT_ONCE characters
# at a time on the text thread, and a request of at most that many on the event loop (server.predictor).
TEXT_WORK_BYTES = 2 * ENCODE_CHARS_AT_ONCE * TOKENIZER_PEAK_PER_CHAR
QUEUED_TEXT_OVERHEAD = 1024  # a queued text's objects besides its characters and ids (work item, array, list slots)
PLANNED = ("max_batch_tokens", "engine_workers", "max_queue", "cache_max_bytes")  # batches first, then host-only
MIB = 1 << 20


class MemoryDoesNotFit(StartupError):
    """The settings, or one max-length text, cannot stay under MEMORY_HIGH_WATER x the memory limit. One line: what
    does not fit, then ``fix`` (more memory, or lower settings), which doctor repeats as its remedy."""

    exit_code = ExitCode.CONFIG

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; {fix}", fix=fix)


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
    body_bytes: int  # request bodies held at once (raw bytes; BodyBudget), each byte charged BODY_COST_PER_BYTE
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

    def batch_tokens_at(self, width: int, tokens: int | None = None) -> int:
        """Padded tokens a batch padded to ``width`` may hold: as many as cost what ``tokens`` (default: the
        planned ``batch_tokens``; lower after an OOM) cost at the max length; capped at ``batch_tokens`` where the
        user set MAX_BATCH_TOKENS (module docstring). Without a cost model (CUDA without NVML), ``tokens``."""
        tokens = self.batch_tokens if tokens is None else tokens
        cost = self.model.token_bytes(width)
        if cost <= 0:
            return tokens
        scaled = math.floor(tokens * self.model.token_bytes(self.max_length) / cost * (1 + 1e-12))  # float noise
        return scaled if "max_batch_tokens" in self.derived else min(scaled, self.batch_tokens)

    def max_length_tokens(self, tokens: int, width: int) -> int:
        """The tokens at the max length that cost what ``tokens`` padded to ``width`` cost (the inverse of
        ``batch_tokens_at``, uncapped)."""
        full = self.model.token_bytes(self.max_length)
        return tokens if full <= 0 else math.ceil(tokens * self.model.token_bytes(width) / full)

    @property
    def queue_bytes(self) -> int:
        return self.max_queue * self.queued_text_bytes

    @property
    def bodies_peak(self) -> int:
        """What the request bodies in flight hold at most, parsed."""
        return self.body_bytes * BODY_COST_PER_BYTE

    @property
    def host_peak(self) -> int:
        batches = 0 if self.device else self.engine_workers * self.batch_bytes
        return self.host.base + self.cache_max_bytes + self.bodies_peak + TEXT_WORK_BYTES + self.queue_bytes + batches

    @property
    def device_peak(self) -> int | None:
        return self.device.base + self.engine_workers * self.batch_bytes if self.device else None

    def apply(self, settings: Settings) -> Settings:
        """``settings`` with the planned values in place of the user's or the defaults."""
        return settings.model_copy(update={"max_batch_tokens": self.batch_tokens, "engine_workers": self.engine_workers,
                                           "max_queue": self.max_queue, "cache_max_bytes": self.cache_max_bytes})

    def overflow(self) -> tuple[Area, int] | None:
        """The first area whose planned peak is above its ceiling, and that peak; None when the plan fits."""
        for area, peak in ((self.host, self.host_peak), (self.device, self.device_peak)):
            if area is not None and peak > area.ceiling:
                return area, peak
        return None

    def describe(self) -> dict[str, Any]:
        plan = {
            "engine_workers": self.engine_workers,
            "batch_tokens": self.batch_tokens,
            "batch_texts_at_max_length": self.batch_tokens_at_peak // self.max_length,
            "batch_tokens_at_length": {str(n): self.batch_tokens_at(n) for n in self._lengths()},
            "max_length": self.max_length,
            "max_queue": self.max_queue,
            "cache_max_bytes": self.cache_max_bytes,
            "derived": [name.upper() for name in self.derived],
            "base_bytes": self.host.base,
            "bodies": {"max_bytes": self.body_bytes, "cost_per_byte": BODY_COST_PER_BYTE,
                       "peak_bytes": self.bodies_peak},
            "tokenizer_bytes": TEXT_WORK_BYTES,
            "queue_bytes": self.queue_bytes,
            "batch_bytes": self.batch_bytes,
            "peak_bytes": self.host_peak,
            "ceiling_bytes": self.host.ceiling,
            "cost_model": self.model.describe(self._lengths()),
        }
        if self.device is not None:
            plan["device"] = {"name": self.device.name, "limit_bytes": self.device.limit,
                              "base_bytes": self.device.base, "peak_bytes": self.device_peak,
                              "ceiling_bytes": self.device.ceiling}
        return plan

    def _lengths(self) -> list[int]:
        return [n for n in (64, 128, 256) if n < self.max_length] + [self.max_length]

    def does_not_fit(self, area: Area, peak: int, needed: int) -> MemoryDoesNotFit:
        """What does not fit and its parts, and the limit (``needed`` MiB) or the settings that would make it
        fit."""
        parts = [f"the model and server {mib(area.base)}"]
        if area is self.host:
            parts += [f"the cache {mib(self.cache_max_bytes)} (CACHE_MAX_BYTES)",
                      f"request bodies of {mib(self.body_bytes)} in flight {mib(self.bodies_peak)} parsed "
                      "(MAX_REQUEST_BYTES)",
                      f"the tokenizer {mib(TEXT_WORK_BYTES)}",
                      f"{self.max_queue} queued texts {mib(self.queue_bytes)} (MAX_QUEUE, MAX_TEXT_CHARS)"]
        if area is self.batch_area:
            texts = self.batch_tokens_at_peak // self.max_length
            parts.append(f"{self.engine_workers} engine worker(s) (ENGINE_WORKERS) x a batch of {texts} text(s) of "
                         f"{self.max_length} tokens (MAX_BATCH_TOKENS={self.batch_tokens}) at "
                         f"{mib(self.batch_bytes)} each")
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
        return MemoryDoesNotFit(f"{area.name} ({mib(area.limit)}) cannot hold {what}: {' + '.join(parts)} = "
                                f"{mib(peak)} at the peak, above MEMORY_HIGH_WATER={area.high_water:g} of it "
                                f"({mib(area.ceiling)})", fix)


def plan_memory(settings: Settings, host: Area, model: CostModel, max_length: int, auto_workers: int,
                device: Area | None = None) -> MemoryPlan:
    """The plan for ``settings`` (module docstring); ``MemoryDoesNotFit`` when it cannot fit.

    ``host``: the memory limit and the measured base; ``device``: the GPU's, when the batches run there;
    ``auto_workers``: what ENGINE_WORKERS=0 means on this device and CPU (``server.engine.engine_workers``).
    """
    plan = _plan(settings, host, model, max_length, auto_workers, device)
    over = plan.overflow()
    if over is None:
        return plan
    area, peak = over
    if area is host:  # the parts derived from the room grow with the limit: the smallest that fits, searched
        def fits(limit_mib: int) -> bool:
            larger = _plan(settings, Area(host.name, limit_mib * MIB, host.base, host.high_water), model, max_length,
                           auto_workers, device)
            return larger.host_peak <= larger.host.ceiling

        needed = smallest(fits, math.ceil(peak / host.high_water / MIB))
    else:
        needed = math.ceil(peak / area.high_water / MIB)
    raise plan.does_not_fit(area, peak, needed)


def smallest(fits: Callable[[int], bool], start: int, most: int = 1 << 40) -> int:
    """The smallest ``n >= 1`` for which ``fits`` (true from some ``n`` on) holds, searched from ``start``;
    ``most`` if it does not hold there either."""
    high = max(1, start)
    while not fits(high):
        if high >= most:
            return most
        high *= 2
    low = 0  # fits(low) is false or low is 0
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def _plan(settings: Settings, host: Area, model: CostModel, max_length: int, auto_workers: int,
          device: Area | None) -> MemoryPlan:
    """``plan_memory``'s plan, whether it fits or not."""
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
    one_body = settings.max_request_bytes
    bodies = max(one_body, min(BODY_MOST_REQUESTS * one_body, int(BODY_SHARE * room) // BODY_COST_PER_BYTE))
    workers = settings.engine_workers if user_set("engine_workers") else auto_workers
    token_bytes = model.token_bytes(max_length)
    least_tokens = max_length  # the smallest batch a worker must be able to run: one max-length text, or as set
    if user_set("max_batch_tokens"):
        least_tokens = min(max(settings.max_batch_tokens, max_length), settings.max_batch_size * max_length)
    least_batch = least_tokens * token_bytes

    def batch_room() -> float:
        return device.ceiling - device.base if device else \
            room - cache - bodies * BODY_COST_PER_BYTE - TEXT_WORK_BYTES - queue * per_text

    if "engine_workers" in derived and batch_room() < workers * least_batch:
        workers = 1
    if device is None and batch_room() < workers * least_batch:  # squeeze what was derived before giving up
        cache = 0 if "cache_max_bytes" in derived else cache
        queue = settings.max_texts_per_request if "max_queue" in derived else queue
        bodies = one_body
    if user_set("max_batch_tokens"):
        tokens = settings.max_batch_tokens
    else:
        fit = batch_room() / workers / token_bytes if token_bytes > 0 else math.inf
        tokens = max(1, int(min(defaults["max_batch_tokens"].default, fit)))
    plan = MemoryPlan(host=host, device=device, model=model, max_length=max_length,
                      max_batch_size=settings.max_batch_size, engine_workers=workers, batch_tokens=tokens,
                      max_queue=queue, cache_max_bytes=cache, queued_text_bytes=per_text, body_bytes=bodies,
                      derived=tuple(derived))
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

    def at(self, width: int) -> int:
        """Padded tokens the next batch may hold if padded to ``width``: ``current`` priced at the max length and
        scaled to ``width`` by the plan (``MemoryPlan.batch_tokens_at``); ``current`` at every width without one."""
        tokens = self.current
        return tokens if self.plan is None else self.plan.batch_tokens_at(width, tokens)

    @property
    def memory_pressure(self) -> bool:
        return self._pressure

    def reduce_after_oom(self, failed_batch_tokens: int, width: int | None = None) -> None:
        """A batch of ``failed_batch_tokens`` padded tokens, padded to ``width``, ran out of memory: keep to half of
        what it cost (not below min). With a plan, the batch counts as the max-length tokens that cost as much.

        The halves of a split batch that fail again lower it no further than their own size says.
        """
        if width is not None and self.plan is not None:
            failed_batch_tokens = self.plan.max_length_tokens(failed_batch_tokens, width)
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


class BodyBudget:
    """Bytes of request bodies held in memory at once, from their first byte until they are answered; the plan's
    ``body_bytes`` is the limit (``server.http`` and the gRPC handlers reserve, ``MemoryGuard.follow`` sets the
    serving plan's).

    Used on the event loop only (the HTTP middleware, the gRPC server), so it takes no lock. A lowered limit (a
    reload's plan) refuses new bodies until enough of those held are answered.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit  # None: no plan yet, nothing is refused
        self.held = 0

    def reserve(self, size: int) -> bool:
        """Hold ``size`` bytes more if that stays within the limit (a lone body always fits: the plan's limit is
        at least MAX_REQUEST_BYTES); False, holding nothing, if not. No bytes always fit (a request without a
        body is never refused, even while a reload's lower limit is below what is held)."""
        if not self.has_room(size):
            return False
        self.held += size
        return True

    def has_room(self, size: int) -> bool:
        """Whether ``size`` bytes more would fit now (``reserve``'s test, holding nothing)."""
        return not size or self.limit is None or self.held + size <= self.limit

    def release(self, size: int) -> None:
        self.held -= size
