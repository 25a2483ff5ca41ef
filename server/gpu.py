"""GPU gauges from NVML (``pynvml``, package nvidia-ml-py): memory used / total and utilisation per GPU.

Without pynvml, a driver or a GPU, ``GpuMonitor.available`` is False and the gauges are never set, so
``/metrics`` carries no GPU samples at all rather than misleading zeros.

What NVML cannot say: how much of the used memory is ONNX Runtime's CUDA arena, reserved but free.
ORT keeps that figure (``AllocatorStats``; the C API's ``AllocatorGetStats`` returns it) but its Python API
does not expose it (checked on onnxruntime 1.32), so there is no such gauge. NVML's used bytes include the
arena, which only grows unless ``arena_extend_strategy`` / ``memory.enable_memory_arena_shrinkage`` say
otherwise: read a flat, high line as reserved, not as in use. ``sentiment_oom_events`` and
``sentiment_batch_splits`` show when it was really exhausted.

NVML numbers GPUs by PCI order and ignores ``CUDA_VISIBLE_DEVICES``: the ``gpu`` label is NVML's index.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from server.metrics import Metrics

log = logging.getLogger(__name__)


class GpuMonitor:
    def __init__(self, metrics: Metrics, nvml: Any = None) -> None:
        """``nvml``: the pynvml module, or a stand-in for tests; by default pynvml is imported if installed."""
        self._metrics = metrics
        self._nvml: Any = None
        self._handles: list[Any] = []
        try:
            if nvml is None:
                import pynvml as nvml
            nvml.nvmlInit()
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        except Exception as exc:  # ImportError, or NVMLError: no driver, no device
            log.info("GPU metrics off: %s", str(exc) or type(exc).__name__)
            return
        if not handles:
            log.info("GPU metrics off: NVML sees no GPU")
            nvml.nvmlShutdown()
            return
        self._nvml, self._handles = nvml, handles

    @property
    def available(self) -> bool:
        return bool(self._handles)

    def update(self) -> None:
        """Read every GPU once and set the gauges."""
        for index, handle in enumerate(self._handles):
            memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            utilization = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            gpu = str(index)
            self._metrics.gpu_memory_used.labels(gpu=gpu).set(memory.used)
            self._metrics.gpu_memory_total.labels(gpu=gpu).set(memory.total)
            self._metrics.gpu_utilization.labels(gpu=gpu).set(utilization.gpu / 100)

    async def run(self, interval_s: float) -> None:
        """Update every ``interval_s`` until cancelled; returns at once when no GPU is available."""
        while self.available:
            try:
                self.update()
            except Exception:
                log.exception("reading NVML failed")
            await asyncio.sleep(interval_s)

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml, self._handles = None, []
