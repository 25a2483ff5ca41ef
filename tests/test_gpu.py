"""GpuMonitor with a stand-in NVML module: gauges when GPUs exist, no samples at all otherwise."""

from __future__ import annotations

from types import SimpleNamespace

from server.gpu import GpuMonitor
from server.metrics import Metrics

GPU_FAMILIES = (
    "sentiment_gpu_memory_used_bytes",
    "sentiment_gpu_memory_total_bytes",
    "sentiment_gpu_utilization_ratio",
)


class FakeNvml:
    """The part of pynvml GpuMonitor uses."""

    def __init__(self, devices: int = 2, init_error: Exception | None = None) -> None:
        self.devices = devices
        self.init_error = init_error
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return self.devices

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=(handle + 1) * 1_000_000, total=80_000_000_000, free=0)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=37 + handle, memory=5)


def samples(metrics: Metrics) -> list[str]:
    return [s.name for family in metrics.registry.collect() for s in family.samples if s.name in GPU_FAMILIES]


def test_gauges_per_gpu() -> None:
    metrics = Metrics()
    nvml = FakeNvml(devices=2)
    monitor = GpuMonitor(metrics, nvml=nvml)
    assert monitor.available
    monitor.update()
    value = metrics.registry.get_sample_value
    assert value("sentiment_gpu_memory_used_bytes", {"gpu": "1"}) == 2_000_000
    assert value("sentiment_gpu_memory_total_bytes", {"gpu": "0"}) == 80_000_000_000
    assert value("sentiment_gpu_utilization_ratio", {"gpu": "1"}) == 0.38
    monitor.close()
    assert nvml.shutdowns == 1
    assert not monitor.available


def test_no_driver_means_unavailable_and_nothing_exported() -> None:
    metrics = Metrics()
    monitor = GpuMonitor(metrics, nvml=FakeNvml(init_error=RuntimeError("NVML Shared Library Not Found")))
    assert not monitor.available
    monitor.update()
    assert samples(metrics) == []


def test_no_device_means_unavailable_and_nvml_is_released() -> None:
    nvml = FakeNvml(devices=0)
    monitor = GpuMonitor(Metrics(), nvml=nvml)
    assert not monitor.available
    assert nvml.shutdowns == 1


async def test_run_returns_at_once_without_a_gpu() -> None:
    await GpuMonitor(Metrics(), nvml=FakeNvml(devices=0)).run(3600)


def test_the_cuda_fallback_is_tried_and_warned_once_when_the_plan_re_creates_the_engine(
        make_settings, monkeypatch, caplog) -> None:
    """DEVICE=auto with CUDA listed but unusable: one WARNING and one CUDA attempt per load, even when the memory
    plan changes the engine workers and the session is created again (for its threads)."""
    import dataclasses
    import logging

    import server.engine as engine_module
    import server.runtime as runtime_module
    from server.runtime import ModelRuntime

    monkeypatch.setattr(engine_module.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    sessions: list[str] = []
    real_engine, real_plan = engine_module.OnnxEngine.__init__, runtime_module.plan_memory

    def counted(self, artifact, variant, device, *args, **kwargs):
        sessions.append(device)
        real_engine(self, artifact, variant, device, *args, **kwargs)

    def one_worker_more(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        return dataclasses.replace(plan, engine_workers=plan.engine_workers + 1)

    monkeypatch.setattr(engine_module.OnnxEngine, "__init__", counted)
    monkeypatch.setattr(runtime_module, "plan_memory", one_worker_more)
    with caplog.at_level(logging.WARNING, logger="server.engine"):
        runtime = ModelRuntime.load(make_settings(device="auto", intra_op_threads=0), Metrics())
    assert runtime.identity.device == "cpu" and runtime.settings.engine_workers >= 2
    assert sessions == ["cuda", "cpu", "cpu"]  # the fallback's, then the re-created one on the device it found
    assert [r.getMessage()[:27] for r in caplog.records] == ["CUDA unusable, falling back"]
