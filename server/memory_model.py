"""The memory cost model: what one engine batch costs in memory, measured on the running model at start-up.

A batch of ``batch`` texts padded to ``length`` tokens peaks at about

    batch * length * (per_token + per_token_length * length)  bytes

above the idle process: activations grow with the padded tokens (the linear term), each layer's attention
scores with tokens x length (the quadratic term). ``server.budget`` sizes batches, engine workers, the queue
and the cache from it; nothing in it is assumed, every figure is read off the model as it runs here.

How ``measure`` reads a peak:

* CPU: the kernel's own high-water mark of the process's resident memory (``VmHWM`` in /proc/self/status),
  reset before each probe by writing 5 to /proc/self/clear_refs, so a peak is read exactly however briefly
  it lasted. Where that file cannot be written, resident memory is sampled every millisecond instead (a
  lower bound; ``exact`` is False and start-up logs a WARNING).
* CUDA: the device's used memory (NVML), sampled during the probe and read after it. ONNX Runtime's CUDA
  arena holds what a batch allocated at least until the run ends, so its peak is there to be seen. NVML's
  figure is device-wide: another process using the GPU meanwhile would show up as cost (on the safe side).

Every probe's peak is read against one baseline, taken once the model is loaded and before it first runs,
not against the memory just before the probe: the arena keeps part of what earlier batches allocated
(``ARENA_SHRINK_TOKENS``) and that retained, fragmented memory is part of what a batch costs in a server that
runs batches of every shape. Measured on
the default model (CPU, int8): 4 x 512 tokens peak at +138 MB in a fresh process, +164 MB after the
smaller probes; 8 x 512 at +275 MB fresh, +329 MB after them.

The probes run in ascending cost, and one predicted (pessimistically, from the ones before it) not to fit
below the ceiling it is given is not run. The model is the cheapest curve of the form above that lies at or
above every probe (``envelope``): it never predicts less than was measured for a measured shape.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

PROC_STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_PEAK = "5"  # clear_refs: reset the peak resident set size to the current one (Linux 4.0+)
SAMPLE_INTERVAL_S = 0.001
PROBE_TOKENS = 2  # the first probes hold this many texts' worth of max-length tokens each


@dataclass(frozen=True)
class Probe:
    """One measured shape: its peak above the idle baseline."""

    batch: int
    length: int
    peak_bytes: int

    @property
    def tokens(self) -> int:
        return self.batch * self.length


@dataclass(frozen=True)
class CostModel:
    """Peak bytes of a batch, as measured (``probes``) and modelled (the two coefficients)."""

    per_token: float  # bytes per padded token
    per_token_length: float  # bytes per padded token per token of sequence length (attention)
    probes: tuple[Probe, ...] = ()
    exact: bool = True  # peaks read from a high-water mark (False: sampled, a lower bound; or nothing measured)

    def token_bytes(self, length: int) -> float:
        """What one padded token costs in a batch padded to ``length``."""
        return self.per_token + self.per_token_length * length

    def batch_bytes(self, batch: int, length: int) -> int:
        return math.ceil(batch * length * self.token_bytes(length))

    def describe(self, lengths: Sequence[int]) -> dict[str, Any]:
        return {
            "bytes_per_token": round(self.per_token, 1),
            "bytes_per_token_per_length": round(self.per_token_length, 3),
            "bytes_per_token_at_length": {str(n): round(self.token_bytes(n)) for n in lengths},
            "peak_exact": self.exact,
            "probes": [{"batch": p.batch, "length": p.length, "peak_bytes": p.peak_bytes} for p in self.probes],
        }


def envelope(probes: Sequence[Probe], exact: bool = True) -> CostModel:
    """The cheapest ``per_token``, ``per_token_length`` >= 0 whose curve lies at or above every probe.

    A linear programme in two variables: minimise the model's sum over the probes, each relative to its
    measurement, subject to model >= measurement at each probe. Its optimum lies where two constraints (or a
    constraint and an axis) meet, so every such point is tried. ``per_token = max cost per token``,
    ``per_token_length = 0`` is always feasible.
    """
    measured = [(p.length, p.peak_bytes / p.tokens) for p in probes if p.tokens > 0 and p.peak_bytes > 0]
    if not measured:
        return CostModel(0.0, 0.0, tuple(probes), exact)
    candidates = [(max(c for _, c in measured), 0.0)]
    candidates += [(0.0, c / n) for n, c in measured]
    for (n1, c1), (n2, c2) in itertools.combinations(measured, 2):
        if n1 != n2:
            slope = (c1 - c2) / (n1 - n2)
            candidates.append((c1 - n1 * slope, slope))

    def feasible(a: float, b: float) -> bool:
        return a >= 0 and b >= 0 and all(a + b * n >= c * (1 - 1e-9) for n, c in measured)

    def total(candidate: tuple[float, float]) -> float:
        a, b = candidate
        return sum((a + b * n) / c for n, c in measured)

    a, b = min((c for c in candidates if feasible(*c)), key=total)
    return CostModel(a, b, tuple(probes), exact)


def probe_shapes(max_length: int) -> list[tuple[int, int]]:
    """(batch, length) shapes to measure, in ascending expected cost: the same tokens at four lengths (the
    linear and the quadratic term apart), then twice the tokens at the longest (the growth with batch size)."""
    lengths = sorted({max(1, max_length // d) for d in (8, 4, 2, 1)})
    tokens = PROBE_TOKENS * max_length
    return [(max(1, tokens // n), n) for n in lengths] + [(2 * PROBE_TOKENS, max_length)]


def pessimistic_bytes(probes: Sequence[Probe], batch: int, length: int) -> int:
    """A shape's cost guessed high from the probes so far: the dearest per-token cost among the probes at its
    length or the nearest shorter one and longer ones, grown in proportion to the length where the probe is
    shorter (as if all of the growth were attention)."""
    shorter = [p.length for p in probes if p.length <= length]
    nearest = max(shorter, default=0)
    per_token = max((p.peak_bytes / p.tokens * max(1.0, length / p.length) for p in probes if p.length >= nearest),
                    default=0.0)
    return math.ceil(per_token * batch * length)


class PeakMeter(Protocol):
    exact: bool

    def current(self) -> int: ...

    def peak(self, run: Callable[[], object]) -> int: ...


def sampled_peak(read: Callable[[], int], run: Callable[[], object], interval_s: float = SAMPLE_INTERVAL_S) -> int:
    """The highest of ``read()`` sampled every ``interval_s`` while ``run()`` runs, and once after it."""
    highest = read()
    done = threading.Event()

    def sample() -> None:
        nonlocal highest
        while not done.wait(interval_s):
            highest = max(highest, read())

    sampler = threading.Thread(target=sample, name="memory-probe", daemon=True)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return max(highest, read())


class HostMemory:
    """This process's resident memory: now, and its peak while a function runs (module docstring)."""

    def __init__(self, status: Path = PROC_STATUS, clear_refs: Path = CLEAR_REFS) -> None:
        self._status = status
        self._clear_refs = clear_refs
        self.exact = self._reset_peak()

    def current(self) -> int:
        return psutil.Process().memory_info().rss

    def peak(self, run: Callable[[], object]) -> int:
        if not (self.exact and self._reset_peak()):
            return sampled_peak(self.current, run)
        run()
        return self._high_water_mark()

    def _reset_peak(self) -> bool:
        try:
            self._clear_refs.write_text(RESET_PEAK)
            self._high_water_mark()
        except (OSError, ValueError):
            return False
        return True

    def _high_water_mark(self) -> int:
        for line in self._status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise ValueError(f"no VmHWM in {self._status}")


class DeviceMemory:
    """One GPU's memory as NVML reports it (device-wide: every process's use). ``open`` returns None without
    pynvml, a driver or that device."""

    exact = True  # the CUDA arena holds its peak until the run ends (module docstring)

    def __init__(self, nvml: Any, index: int) -> None:
        self._nvml = nvml
        self.index = index
        self._handle = nvml.nvmlDeviceGetHandleByIndex(index)

    @classmethod
    def open(cls, index: int, nvml: Any = None) -> DeviceMemory | None:
        try:
            if nvml is None:
                import pynvml as nvml
            nvml.nvmlInit()
            return cls(nvml, index)
        except Exception:  # ImportError, or NVMLError: no driver, no such device
            return None

    def current(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def total(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).total)

    def peak(self, run: Callable[[], object]) -> int:
        return sampled_peak(self.current, run)


def measure(run: Callable[[int, int], object], meter: PeakMeter, max_length: int, baseline: int,
            ceiling: float) -> CostModel:
    """Run ``probe_shapes`` through ``run(batch, length)`` and fit the model to their peaks above ``baseline``.

    ``baseline``: the meter's reading with the model loaded, before its first run (what the probes' peaks are
    read against, see the module docstring). ``ceiling``: the reading no probe may be expected to pass
    (MEMORY_HIGH_WATER x the limit); a probe ``pessimistic_bytes`` puts above it is skipped, and so are the
    larger ones after it.
    """
    probes: list[Probe] = []
    for batch, length in probe_shapes(max_length):
        if baseline + pessimistic_bytes(probes, batch, length) > ceiling:
            break
        peak = meter.peak(lambda b=batch, n=length: run(b, n))
        probes.append(Probe(batch, length, max(0, peak - baseline)))
    return envelope(probes, meter.exact)
