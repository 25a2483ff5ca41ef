"""Out-of-memory handling around an engine: recognise ORT's OOM errors, split and retry, fall back to the CPU.

ONNX Runtime reports an allocation failure as a plain ``RuntimeException`` (or ``Fail``) whose message names
the allocator, so recognising one means reading the message. A batch that ran out of memory is split in
two and each half retried (recursively) while the token budget is lowered, so every accepted text is still
answered and later batches are formed smaller. A single text that still does not fit on the GPU runs on a
CPU engine, built on first need and then kept; memory that runs out even so is ``OutOfMemory`` (503), counted
on the device it ran out on (``CpuFallbackFailed``: the host's, when the CPU fallback's did). Any other
failure becomes ``InferenceFailed`` at once, here: the batcher then tells an input the model fails on (500) from an
engine that fails on everything (503) (``Batcher._per_request``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

from server.budget import TokenBudget
from server.metrics import Metrics
from server.primitives import InferenceFailed, OutOfMemory

if TYPE_CHECKING:
    from server.engine import Engine

CPU_REBUILD_AFTER_S = 60.0  # a failed build of the CPU fallback engine is not tried again sooner

# Lower-case fragments of ORT / CUDA / cuBLAS / cuDNN / C++ allocation failure messages.
OOM_MARKERS = (
    "failed to allocate memory",  # BFCArena::AllocateRawInternal, CPU and CUDA arenas
    "bfcarena",
    "bfc_arena",
    "out of memory",  # "CUDA failure 2: out of memory", "CUDA out of memory"
    "out_of_memory",  # CUDA_ERROR_OUT_OF_MEMORY
    "cudaerrormemoryallocation",
    "alloc_failed",  # CUBLAS_STATUS_ALLOC_FAILED, CUDNN_STATUS_ALLOC_FAILED
    "bad_alloc",  # std::bad_alloc
    "bad allocation",  # std::bad_alloc's what() on MSVC
)

# What ORT 1.17+ raises when the CUDA arena cannot grow (node name and size are illustrative).
BFC_ARENA_OOM = (
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running MatMul node. "
    "Name:'/distilbert/transformer/layer.0/attention/MatMul' Status Message: "
    "/onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:376 void* onnxruntime::BFCArena::AllocateRawInternal"
    "(size_t, bool, onnxruntime::Stream*, bool, onnxruntime::WaitNotificationFn) "
    "Failed to allocate memory for requested buffer of size 2147483648"
)


def is_oom_error(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) is a memory allocation failure."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError):
            return True
        message = str(current).lower()
        if any(marker in message for marker in OOM_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False


class CpuFallbackFailed(OutOfMemory):
    """``OutOfMemory`` for a text whose CPU fallback failed too: ``device`` says where, so the batcher counts the
    failure under ``device="cpu"`` (``sentiment_inference_errors_total``), not under the primary's device. Host
    memory running out in the fallback was counted as a CUDA failure: the alert that watches the CPU
    (SentimentAnalyzerHostOOM) never fired, and the runbook pointed at the GPU (red team helper-89)."""

    device = "cpu"


def _summary(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ResilientEngine:
    """An Engine that survives OOM: split and retry, lower the budget, run single texts on the CPU if need be.

    It also reports each clean run to the budget (``record_success``), so the batcher only reads
    ``budget.current``. Results are the primary's (or the CPU engine's) logits, in input order.
    """

    def __init__(
        self,
        primary: Engine,
        cpu_engine_factory: Callable[[], Engine],
        budget: TokenBudget,
        metrics: Metrics,
    ) -> None:
        self.primary = primary
        self._cpu_engine_factory = cpu_engine_factory
        self._cpu_engine: Engine | None = None
        self._cpu_lock = threading.Lock()
        self._cpu_failure: tuple[float, Exception] | None = None  # when the CPU engine's last build failed, and why
        self._budget = budget
        self._metrics = metrics

    @property
    def device(self) -> str:
        return self.primary.device

    @property
    def provider(self) -> str:
        return self.primary.provider

    @property
    def variant(self) -> str:
        return self.primary.variant

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        try:
            logits = self.primary.run(input_ids, attention_mask)
        except Exception as exc:
            failure = exc
        else:
            self._budget.record_success()
            return logits
        return self._recover(input_ids, attention_mask, failure)

    def _attempt(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        try:
            return self.primary.run(input_ids, attention_mask)
        except Exception as exc:
            failure = exc
        return self._recover(input_ids, attention_mask, failure)  # outside the handler: no nested catching

    def _recover(self, input_ids: np.ndarray, attention_mask: np.ndarray, failure: Exception) -> np.ndarray:
        device = self.primary.device
        if not is_oom_error(failure):
            raise InferenceFailed(f"inference failed on {device}: {_summary(failure)}") from failure
        self._metrics.oom_events.labels(device=device).inc()
        self._budget.reduce_after_oom(int(input_ids.size), input_ids.shape[1])
        if len(input_ids) > 1:
            self._metrics.batch_splits.labels(device=device).inc()
            half = len(input_ids) // 2
            first = self._attempt(input_ids[:half], attention_mask[:half])
            second = self._attempt(input_ids[half:], attention_mask[half:])
            return np.concatenate([first, second])
        if device == "cpu":
            raise OutOfMemory(
                f"out of memory on the CPU for one text of {input_ids.shape[1]} tokens: {_summary(failure)}"
            ) from failure
        return self._run_on_cpu(input_ids, attention_mask)

    def _run_on_cpu(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The text on the CPU engine. It counts as a fallback once sent to that engine, whether or not the run
        succeeds (``sentiment_cpu_fallbacks_total``: texts run on the CPU); memory running out there, or in
        building it (``_build_cpu_engine``), is an OOM event of the CPU's, the host's, not of the primary's."""
        cpu_engine = None
        try:
            with self._cpu_lock:
                if self._cpu_engine is None:
                    self._cpu_engine = self._build_cpu_engine()
                cpu_engine = self._cpu_engine
            self._metrics.cpu_fallbacks.inc()
            return cpu_engine.run(input_ids, attention_mask)
        except Exception as exc:
            failure = exc
        if cpu_engine is not None and is_oom_error(failure):  # a failed build counts its own, once per attempt
            self._metrics.oom_events.labels(device="cpu").inc()
        raise CpuFallbackFailed(
            f"{self.primary.device} ran out of memory for one text of {input_ids.shape[1]} tokens "
            f"and the CPU fallback failed: {_summary(failure)}"
        ) from failure

    def _build_cpu_engine(self) -> Engine:
        """The CPU engine, or the error its build raised, again without a new attempt for ``CPU_REBUILD_AFTER_S``:
        each attempt reads and checks the variant's files (``Artifact.read_verified``), and a file changed since
        start-up failed every out-of-memory text's fallback after a full re-read, under the lock."""
        if self._cpu_failure is not None and time.monotonic() - self._cpu_failure[0] < CPU_REBUILD_AFTER_S:
            raise self._cpu_failure[1].with_traceback(None)  # not a traceback grown by each raise
        try:
            return self._cpu_engine_factory()
        except Exception as exc:
            self._cpu_failure = (time.monotonic(), exc)
            if is_oom_error(exc):
                self._metrics.oom_events.labels(device="cpu").inc()
            raise


class FaultInjectingEngine:
    """Wraps an engine and raises ORT's own OOM error whenever ``fail_when(batch_size, seq_len)`` is true.

    For tests and drills: it exercises the same path a real CUDA arena failure takes.
    """

    def __init__(
        self,
        inner: Engine,
        fail_when: Callable[[int, int], bool],
        message: str = BFC_ARENA_OOM,
    ) -> None:
        self.inner = inner
        self.device = inner.device
        self.provider = inner.provider
        self.variant = inner.variant
        self._fail_when = fail_when
        self._message = message
        self.injected = 0  # failures raised so far

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        batch_size, seq_len = input_ids.shape
        if self._fail_when(batch_size, seq_len):
            self.injected += 1
            raise RuntimeException(self._message)
        return self.inner.run(input_ids, attention_mask)
