"""The memory cost model: the envelope fit, the probes, the peak meters (real and injected), and the plan a real
model gets at load (a fake memory limit around the tiny model; the container test runs the real one)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import psutil
import pytest

from scripts.benchlib.serverproc import start_server, stop_server
from server import runtime as runtime_module
from server.budget import TEXT_WORK_BYTES, MemoryDoesNotFit
from server.exitcodes import ExitCode
from server.memory_model import (
    CostModel,
    DeviceMemory,
    HostMemory,
    Probe,
    envelope,
    measure,
    pessimistic_bytes,
    probe_shapes,
)
from server.metrics import Metrics
from server.runtime import fit_memory, load_checked

MIB = 1 << 20


def probes_on(model: CostModel, shapes: list[tuple[int, int]]) -> list[Probe]:
    return [Probe(b, n, model.batch_bytes(b, n)) for b, n in shapes]


def test_the_envelope_recovers_a_model_its_probes_lie_on() -> None:
    truth = CostModel(per_token=12_000, per_token_length=110)
    fitted = envelope(probes_on(truth, probe_shapes(512)))
    assert fitted.per_token == pytest.approx(12_000, rel=1e-3)
    assert fitted.per_token_length == pytest.approx(110, rel=1e-3)


def test_the_envelope_is_at_or_above_every_probe_however_noisy() -> None:
    rng = np.random.default_rng(7)
    truth = CostModel(per_token=20_000, per_token_length=90)
    noisy = [Probe(p.batch, p.length, int(p.peak_bytes * rng.uniform(0.7, 1.4)))
             for p in probes_on(truth, probe_shapes(512))]
    fitted = envelope(noisy)
    assert fitted.per_token >= 0 and fitted.per_token_length >= 0
    assert all(fitted.batch_bytes(p.batch, p.length) >= p.peak_bytes * (1 - 1e-6) for p in noisy)
    # and it is the cheapest such curve: lowering either coefficient drops below some probe
    for lower in (CostModel(fitted.per_token * 0.97, fitted.per_token_length),
                  CostModel(fitted.per_token, fitted.per_token_length * 0.97)):
        if lower.per_token + lower.per_token_length < fitted.per_token + fitted.per_token_length:
            assert any(lower.batch_bytes(p.batch, p.length) < p.peak_bytes for p in noisy)


def test_probes_that_read_nothing_give_a_model_that_costs_nothing() -> None:
    model = envelope([Probe(4, 16, 0), Probe(2, 32, 0)])
    assert (model.per_token, model.per_token_length) == (0.0, 0.0)


@pytest.mark.parametrize("max_length", [512, 128, 5, 1])
def test_probe_shapes_cover_four_lengths_then_grow_the_batch(max_length: int) -> None:
    shapes = probe_shapes(max_length)
    assert shapes[-1] == (4, max_length) and all(1 <= n <= max_length and b >= 1 for b, n in shapes)
    if max_length >= 8:
        assert [n for _, n in shapes[:-1]] == [max_length // 8, max_length // 4, max_length // 2, max_length]


class FakeMeter:
    """Reads a memory that a ``run`` raises by the true model's cost of its shape while it runs."""

    exact = True

    def __init__(self, truth: CostModel, baseline: int) -> None:
        self.truth, self.now, self.runs = truth, baseline, []

    def current(self) -> int:
        return self.now

    def peak(self, run) -> int:
        run()
        batch, length = self.runs[-1]
        return self.now + self.truth.batch_bytes(batch, length)

    def run(self, batch: int, length: int) -> None:
        self.runs.append((batch, length))


def test_measure_reads_each_probe_against_one_baseline_and_fits_the_model() -> None:
    truth = CostModel(per_token=15_000, per_token_length=120)
    meter = FakeMeter(truth, baseline=300 * MIB)
    model = measure(meter.run, meter, 512, meter.now, ceiling=10_000 * MIB)
    assert meter.runs == probe_shapes(512)
    assert model.per_token == pytest.approx(15_000, rel=1e-3)
    assert model.per_token_length == pytest.approx(120, rel=1e-3)


def test_measure_does_not_run_probes_predicted_above_the_ceiling() -> None:
    truth = CostModel(per_token=15_000, per_token_length=120)
    meter = FakeMeter(truth, baseline=300 * MIB)
    shapes = probe_shapes(512)
    ceiling = 300 * MIB + truth.batch_bytes(*shapes[2]) * 1.5  # room for the first three probes, not the others
    model = measure(meter.run, meter, 512, meter.now, ceiling)
    assert meter.runs == shapes[:3]
    assert len(model.probes) == 3
    assert all(300 * MIB + pessimistic_bytes(model.probes, *shape) > ceiling for shape in shapes[3:])


def test_the_host_meter_reads_a_peak_exactly_even_after_the_memory_is_freed() -> None:
    meter = HostMemory()
    assert meter.exact, "/proc/self/clear_refs should be writable on Linux"
    before = meter.current()
    peak = meter.peak(lambda: np.ones(64 * MIB, dtype=np.uint8).sum())  # 64 MiB touched, then freed
    assert peak - before >= 60 * MIB
    assert meter.current() - before < 32 * MIB


def test_without_clear_refs_the_host_meter_samples_the_peak(tmp_path: Path) -> None:
    meter = HostMemory(clear_refs=tmp_path / "missing" / "clear_refs")
    assert not meter.exact
    before = meter.current()

    def hold() -> None:
        block = np.ones(64 * MIB, dtype=np.uint8)
        time.sleep(0.2)  # held long enough for the 1 ms sampler, however busy the CPU
        del block

    assert meter.peak(hold) - before >= 60 * MIB


class FakeNvml:
    """pynvml's calls the device meter makes; ``used`` rises by ``step`` while ``busy`` is set."""

    def __init__(self, used: int, total: int, fail: bool = False) -> None:
        self.used, self.total, self.fail = used, total, fail

    def nvmlInit(self) -> None:
        if self.fail:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=self.used, total=self.total)


def test_the_device_meter_samples_used_memory_during_a_run() -> None:
    nvml = FakeNvml(used=2000 * MIB, total=16_000 * MIB)
    gpu = DeviceMemory.open(0, nvml)
    assert gpu is not None and (gpu.current(), gpu.total()) == (2000 * MIB, 16_000 * MIB)

    def batch() -> None:  # the arena grows during the run and gives it back at its end
        nvml.used += 700 * MIB
        time.sleep(0.2)
        nvml.used -= 700 * MIB

    assert gpu.peak(batch) == 2700 * MIB
    assert DeviceMemory.open(0, FakeNvml(0, 0, fail=True)) is None


class FakeCudaEngine:
    """An engine on 'cuda' whose runs raise the fake GPU's used memory by a known model's cost, for the run."""

    device, provider, variant = "cuda", "CUDAExecutionProvider", "fp16"

    def __init__(self, nvml: FakeNvml, truth: CostModel) -> None:
        self.nvml, self.truth, self.lock = nvml, truth, threading.Lock()

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with self.lock:
            cost = self.truth.batch_bytes(*input_ids.shape)
            self.nvml.used += cost
            time.sleep(0.05)
            self.nvml.used -= cost
        return np.zeros((len(input_ids), 2), dtype=np.float32)


@pytest.mark.parametrize("cuda_mem_limit", [0, 3000 * MIB])
def test_on_cuda_the_batches_are_measured_and_planned_in_gpu_memory(tiny_artifact, make_settings,
                                                                   cuda_mem_limit: int) -> None:
    from server.artifact import load_artifact
    from server.runtime import load_encoder

    truth = CostModel(per_token=40_000, per_token_length=300)
    before, loaded = 1000 * MIB, 1400 * MIB  # another process's 1000 MiB, then our model's 400 MiB
    nvml = FakeNvml(used=loaded, total=8000 * MIB)
    gpu = DeviceMemory.open(0, nvml)
    artifact = load_artifact(tiny_artifact)
    settings = make_settings(cuda_mem_limit=cuda_mem_limit)
    plan = fit_memory(FakeCudaEngine(nvml, truth), load_encoder(artifact, False), artifact, settings, gpu, loaded,
                      before)
    assert plan.device is not None and plan.device.base == loaded - before
    assert plan.device.limit == (cuda_mem_limit or 8000 * MIB - before)
    fitted = plan.model
    assert fitted.token_bytes(artifact.max_length) == pytest.approx(truth.token_bytes(artifact.max_length), rel=0.05)
    assert plan.device_peak <= plan.device.ceiling
    assert plan.host_peak == (plan.host.base + plan.cache_max_bytes + plan.bodies_peak + TEXT_WORK_BYTES
                              + plan.queue_bytes)


def test_on_cuda_without_nvml_the_batch_budget_is_not_derived_nor_the_peak_exact(tiny_artifact, make_settings,
                                                                                  caplog) -> None:
    from server.artifact import load_artifact
    from server.runtime import load_encoder

    artifact = load_artifact(tiny_artifact)
    engine = FakeCudaEngine(FakeNvml(0, 0), CostModel(40_000, 300))
    with caplog.at_level(logging.INFO, logger="server.runtime"):
        plan = fit_memory(engine, load_encoder(artifact, False), artifact, make_settings(), None, 0, 0)
    assert plan.device is None and plan.batch_tokens == 8192 and plan.model.probes == ()
    assert not plan.model.exact and plan.describe()["cost_model"]["peak_exact"] is False  # nothing was measured
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "GPU memory cannot be read" in warnings[0], warnings  # not "sampled" as well
    assert "peak_exact false" in warnings[0]


@pytest.mark.parametrize(("set_tokens", "warned"), [(None, False), (1, True), (4096, False)])
def test_a_max_batch_tokens_below_the_max_length_is_said_not_to_hold_for_long_texts(tiny_artifact, make_settings,
                                                                                      caplog, set_tokens, warned):
    """A batch always holds one text: MAX_BATCH_TOKENS=1 started silently, and a text of the max length ran past it
    while /info and the README said it was a flat cap (red team helper-74)."""
    from server.artifact import load_artifact
    from server.runtime import load_encoder

    artifact = load_artifact(tiny_artifact)
    engine = FakeCudaEngine(FakeNvml(0, 0), CostModel(40_000, 300))
    settings = make_settings(**({} if set_tokens is None else {"max_batch_tokens": set_tokens}))
    with caplog.at_level(logging.INFO, logger="server.runtime"):
        fit_memory(engine, load_encoder(artifact, False), artifact, settings, None, 0, 0)
    said = [r.getMessage() for r in caplog.records if "is below the model's max length" in r.getMessage()]
    assert len(said) == warned, said
    if warned:
        assert said[0].startswith(f"MAX_BATCH_TOKENS=1 is below the model's max length ({artifact.max_length} tokens)")


class ConstantMeter:
    """A host meter that reads ``rise`` bytes above ``base`` at every probe's peak; ``exact``: as a meter says."""

    def __init__(self, base: int, rise: int, exact: bool) -> None:
        self.base, self.rise, self.exact = base, rise, exact

    def current(self) -> int:
        return self.base

    def peak(self, run) -> int:
        run()
        return self.base + self.rise


class ZeroEngine:
    device, provider, variant = "cpu", "CPUExecutionProvider", "fp32"

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return np.zeros((len(input_ids), 2), dtype=np.float32)


@pytest.mark.parametrize(("rise", "meter_exact", "warned"), [
    (8 * MIB, True, []),  # read from the high-water mark: exact, no warning
    (8 * MIB, False, ["sampled"]),  # sampled: a lower bound, one warning
    (0, True, []),  # read exactly, nothing above the baseline (a model too small to show, as the tests' tiny one)
])
def test_a_measured_plan_is_exact_unless_its_peaks_were_sampled(
        tiny_artifact, make_settings, caplog, rise: int, meter_exact: bool, warned: list[str]) -> None:
    from server.artifact import load_artifact
    from server.runtime import load_encoder

    artifact = load_artifact(tiny_artifact)
    meter = ConstantMeter(300 * MIB, rise, meter_exact)
    with caplog.at_level(logging.INFO, logger="server.runtime"):
        plan = fit_memory(ZeroEngine(), load_encoder(artifact, False), artifact, make_settings(),
                          meter, meter.base, 0)  # type: ignore[arg-type]  # a fake meter and engine
    assert (plan.model.per_token > 0) == (rise > 0)
    assert plan.model.exact is meter_exact and plan.describe()["cost_model"]["peak_exact"] is meter_exact
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == len(warned) and all(word in w for w, word in zip(warnings, warned, strict=True)), warnings


def test_a_real_model_gets_a_measured_plan(make_settings) -> None:
    runtime = load_checked(make_settings(), Metrics(), warm=False)
    plan = runtime.memory_plan
    assert plan is not None and plan.model.exact and len(plan.model.probes) == 5
    assert plan.host.base > 0 and plan.host_peak <= plan.host.ceiling
    assert runtime.settings.max_batch_tokens == plan.batch_tokens == runtime.budget.base_tokens
    assert runtime.settings.max_queue == plan.max_queue


def test_a_limit_too_small_for_the_real_model_stops_its_load_in_one_line(make_settings, monkeypatch) -> None:
    """The limit just above what the process holds already: no room for a batch, whatever the settings."""
    from server.memory_model import HostMemory as Meter

    monkeypatch.setattr(runtime_module, "memory_limit_bytes", lambda: int(Meter().current() / 0.85) + MIB)
    with pytest.raises(MemoryDoesNotFit) as failure:
        load_checked(make_settings(), Metrics(), warm=False)
    assert failure.value.exit_code == ExitCode.CONFIG
    assert "cannot hold one text of" in str(failure.value) and "\n" not in str(failure.value)


def test_health_and_metrics_show_the_plan_the_cost_model_and_the_headroom(live_server) -> None:
    memory = httpx.get(live_server.url + "/health", timeout=30).json()["memory"]
    assert memory["headroom_bytes"] == memory["high_water_bytes"] - memory["rss_bytes"]
    plan = memory["plan"]
    assert plan["peak_bytes"] <= plan["ceiling_bytes"] and plan["derived"]
    assert len(plan["cost_model"]["probes"]) == 5 and plan["cost_model"]["peak_exact"] is True
    widths = plan["batch_tokens_at_length"]
    assert widths[str(plan["max_length"])] == plan["batch_tokens"] <= min(widths.values())
    assert plan["bodies"]["max_bytes"] >= 1 << 20 and memory["bodies_in_flight_bytes"] == 0  # the default's body
    metrics = httpx.get(live_server.url + "/metrics", timeout=30).text
    for family in ("sentiment_memory_headroom_bytes", 'sentiment_memory_plan_bytes{memory="host",part="batches"}',
                   'sentiment_memory_plan_bytes{memory="host",part="bodies"}',
                   "sentiment_memory_cost_bytes_per_token ", "sentiment_memory_cost_bytes_per_token_length "):
        assert family in metrics
    budget = [line for line in metrics.splitlines() if line.startswith("sentiment_batch_token_budget ")]
    assert float(budget[0].split()[1]) == plan["batch_tokens"]


def test_serve_refuses_to_start_when_the_limit_cannot_hold_one_text(tiny_artifact, tmp_path) -> None:
    """The real start-up path: MEMORY_HIGH_WATER set so that 64 MiB of this machine's memory is all there is
    (less than the process holds before its first batch): exit code 2 and one line, no traceback."""
    high = f"{64 * MIB / psutil.virtual_memory().total:.6f}"
    server = start_server({"MODEL_PATH": str(tiny_artifact), "MEMORY_HIGH_WATER": high,
                           "MEMORY_LOW_WATER": f"{float(high) / 2:.6f}"}, tmp_path, wait_ready=False)
    try:
        assert server.process.wait(120) == ExitCode.CONFIG, server.log()
    finally:
        stop_server(server)
    log = server.log()
    (line,) = [line for line in log.splitlines() if "cannot start" in line]
    assert "cannot hold one text of" in line and "give it at least" in line, line
    assert "Traceback" not in log, log
