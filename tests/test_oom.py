"""OOM recognition and ResilientEngine: split and retry, CPU fallback, failures, budget and counters."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, RuntimeException

from server import oom
from server.artifact import ArtifactError
from server.batcher import Batcher
from server.budget import TokenBudget
from server.config import load_settings
from server.metrics import Metrics
from server.oom import BFC_ARENA_OOM, FaultInjectingEngine, ResilientEngine, is_oom_error
from server.primitives import InferenceFailed, OutOfMemory


class FakeEngine:
    """Logits as a deterministic function of each row alone, like a real classifier (no model needed)."""

    def __init__(self, device: str = "cuda", error: Exception | None = None) -> None:
        self.device = device
        self.provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
        self.variant = "fp32"
        self.error = error
        self.calls: list[tuple[int, int]] = []

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self.calls.append(input_ids.shape)
        if self.error is not None:
            raise self.error
        masked = input_ids * attention_mask
        return np.stack([masked.sum(axis=1) % 97 / 10, masked[:, 0] % 13 - masked.max(axis=1) % 7], axis=1).astype(
            np.float32
        )


def batch(size: int, seq_len: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(size * 1000 + seq_len)
    ids = rng.integers(1, 30_000, size=(size, seq_len), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[:, seq_len // 2 + 1:] = rng.integers(0, 2, size=(size, seq_len - seq_len // 2 - 1))
    return ids, mask


def count(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


class Factory:
    def __init__(self, engine: FakeEngine | None = None, error: Exception | None = None) -> None:
        self.engine = engine or FakeEngine("cpu")
        self.error = error
        self.calls = 0

    def __call__(self) -> FakeEngine:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.engine


def resilient(
    fail_when, device: str = "cuda", factory: Factory | None = None, base_tokens: int = 8192
) -> tuple[ResilientEngine, FakeEngine, Factory, TokenBudget, Metrics]:
    metrics = Metrics()
    inner = FakeEngine(device)
    factory = factory or Factory()
    budget = TokenBudget(base_tokens, metrics, min_tokens=16)
    engine = ResilientEngine(FaultInjectingEngine(inner, fail_when), factory, budget, metrics)
    return engine, inner, factory, budget, metrics


@pytest.mark.parametrize(
    "error",
    [
        RuntimeException(BFC_ARENA_OOM),
        Fail("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 2: out of memory ; GPU=0 ; hostname=x ; "
             "file=/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_allocator.cc ; line=48 ; expr=cudaMalloc"),
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUBLAS failure 3: CUBLAS_STATUS_ALLOC_FAILED ; GPU=0"),
        RuntimeError("cudaErrorMemoryAllocation"),
        RuntimeError("onnxruntime::BFCArena::AllocateRawInternal Available memory of 0 is smaller than requested"),
        RuntimeError("std::bad_alloc"),
        MemoryError(),
    ],
    ids=["bfc-arena", "cuda-malloc", "cuda-oom", "cublas", "cuda-enum", "arena-limit", "bad-alloc", "memoryerror"],
)
def test_recognises_allocation_failures(error: BaseException) -> None:
    assert is_oom_error(error)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeException("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: input_ids"),
        Fail("[ONNXRuntimeError] : 1 : FAIL : Load model from model.onnx failed: Protobuf parsing failed"),
        ValueError("memory address 0x0 is not valid"),
        KeyError("input_ids"),
    ],
)
def test_other_failures_are_not_oom(error: BaseException) -> None:
    assert not is_oom_error(error)


def test_an_oom_wrapped_in_another_error_is_recognised() -> None:
    try:
        try:
            raise MemoryError
        except MemoryError as inner:
            raise RuntimeError("batch failed") from inner
    except RuntimeError as outer:
        assert is_oom_error(outer)


def test_clean_runs_pass_through_and_count_as_successes() -> None:
    engine, inner, factory, budget, metrics = resilient(lambda b, t: False)
    budget.reduce_after_oom(8192)  # so record_success has something to recover
    ids, mask = batch(8)
    for _ in range(20):
        np.testing.assert_array_equal(engine.run(ids, mask), FakeEngine().run(ids, mask))
    assert (engine.device, engine.provider, engine.variant) == ("cuda", "CUDAExecutionProvider", "fp32")
    assert budget.current == 4096 + 819  # 20 successes in a row: one recovery step
    assert count(metrics, "sentiment_oom_events_total", device="cuda") == 0
    assert factory.calls == 0


def test_an_oversized_batch_is_split_until_it_fits() -> None:
    engine, inner, factory, budget, metrics = resilient(lambda b, t: b > 2)
    ids, mask = batch(8, seq_len=16)

    logits = engine.run(ids, mask)

    np.testing.assert_array_equal(logits, FakeEngine().run(ids, mask))
    assert inner.calls == [(2, 16)] * 4  # 8 -> 4 + 4 -> 2 + 2 + 2 + 2
    assert count(metrics, "sentiment_oom_events_total", device="cuda") == 3
    assert count(metrics, "sentiment_batch_splits_total", device="cuda") == 3
    assert count(metrics, "sentiment_cpu_fallbacks_total") == 0
    assert budget.current == 32  # half of 4x16, the largest batch that fails
    assert factory.calls == 0


def test_a_single_text_that_never_fits_runs_on_a_cpu_engine_created_once() -> None:
    engine, inner, factory, _, metrics = resilient(lambda b, t: True)
    ids, mask = batch(5)

    first = engine.run(ids, mask)
    second = engine.run(ids[:1], mask[:1])

    np.testing.assert_array_equal(first, FakeEngine().run(ids, mask))
    np.testing.assert_array_equal(second, first[:1])
    assert factory.calls == 1  # created lazily, then kept
    assert factory.engine.calls == [(1, 8)] * 6
    assert count(metrics, "sentiment_cpu_fallbacks_total") == 6
    assert count(metrics, "sentiment_batch_splits_total", device="cuda") == 4
    assert count(metrics, "sentiment_oom_events_total", device="cuda") == 4 + 5 + 1


def test_only_long_sequences_fall_back() -> None:
    engine, inner, factory, _, metrics = resilient(lambda b, t: b * t > 64)
    short_ids, short_mask = batch(4, seq_len=8)
    long_ids, long_mask = batch(1, seq_len=128)
    np.testing.assert_array_equal(engine.run(short_ids, short_mask), FakeEngine().run(short_ids, short_mask))
    np.testing.assert_array_equal(engine.run(long_ids, long_mask), FakeEngine().run(long_ids, long_mask))
    assert count(metrics, "sentiment_cpu_fallbacks_total") == 1
    assert count(metrics, "sentiment_batch_splits_total", device="cuda") == 0


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 40), seq_len=st.integers(1, 64), max_tokens=st.integers(0, 600))
def test_every_text_is_answered_in_order(size: int, seq_len: int, max_tokens: int) -> None:
    engine, inner, factory, _, metrics = resilient(lambda b, t: b * t > max_tokens)
    ids, mask = batch(size, seq_len)
    np.testing.assert_array_equal(engine.run(ids, mask), FakeEngine().run(ids, mask))
    on_gpu = sum(b for b, _ in inner.calls)
    assert on_gpu + count(metrics, "sentiment_cpu_fallbacks_total") == size


def test_a_cpu_primary_splits_but_has_nowhere_to_fall_back() -> None:
    engine, inner, factory, _, metrics = resilient(lambda b, t: b > 1, device="cpu")
    ids, mask = batch(4)
    np.testing.assert_array_equal(engine.run(ids, mask), FakeEngine("cpu").run(ids, mask))
    assert count(metrics, "sentiment_batch_splits_total", device="cpu") == 3

    engine, inner, factory, _, metrics = resilient(lambda b, t: True, device="cpu")
    with pytest.raises(InferenceFailed, match="out of memory on the CPU for one text of 8 tokens"):
        engine.run(ids, mask)
    assert factory.calls == 0


def test_a_non_oom_error_fails_at_once() -> None:
    metrics = Metrics()
    primary = FakeEngine(error=RuntimeException("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : bad input_ids"))
    factory = Factory()
    engine = ResilientEngine(primary, factory, TokenBudget(8192, metrics), metrics)
    ids, mask = batch(8)

    with pytest.raises(InferenceFailed, match="inference failed on cuda: RuntimeException: .*INVALID_ARGUMENT") as info:
        engine.run(ids, mask)

    assert isinstance(info.value.__cause__, RuntimeException)
    assert primary.calls == [(8, 8)]  # no retry
    assert count(metrics, "sentiment_oom_events_total", device="cuda") == 0
    assert factory.calls == 0


@pytest.mark.parametrize(
    "factory",
    [Factory(error=FileNotFoundError("model.onnx")), Factory(engine=FakeEngine("cpu", error=MemoryError()))],
    ids=["factory-fails", "cpu-oom"],
)
def test_a_failing_cpu_fallback_raises_inference_failed(factory: Factory) -> None:
    engine, *_ = resilient(lambda b, t: True, factory=factory)
    ids, mask = batch(2)
    with pytest.raises(InferenceFailed, match="cuda ran out of memory for one text of 8 tokens and the CPU fallback"):
        engine.run(ids, mask)


def test_host_memory_running_out_in_the_cpu_fallback_is_counted_on_the_cpu() -> None:
    """The CPU fallback's own OOM (ORT's CPU arena) was counted under device="cuda", with no fallback counted: the
    host OOM alert (device="cpu") never fired, and the runbook pointed at the GPU (a red team)."""
    cpu = FaultInjectingEngine(FakeEngine("cpu"), lambda b, t: True)
    engine, inner, factory, _, metrics = resilient(lambda b, t: True, factory=Factory(engine=cpu))
    with pytest.raises(OutOfMemory, match="cuda ran out of memory .* CPU fallback failed: .*BFCArena") as info:
        engine.run(*batch(1))
    assert cpu.injected == 1
    assert count(metrics, "sentiment_oom_events_total", device="cpu") == 1
    assert count(metrics, "sentiment_oom_events_total", device="cuda") == 1
    assert count(metrics, "sentiment_cpu_fallbacks_total") == 1  # the text was sent to the CPU
    assert info.value.device == "cpu"  # for the batcher's sentiment_inference_errors_total


def test_only_memory_running_out_in_the_cpu_fallback_counts_as_a_host_oom() -> None:
    factory = Factory(engine=FakeEngine("cpu", error=RuntimeException("[ONNXRuntimeError] : 2 : bad input_ids")))
    engine, inner, factory, _, metrics = resilient(lambda b, t: True, factory=factory)
    with pytest.raises(OutOfMemory) as info:
        engine.run(*batch(1))
    assert count(metrics, "sentiment_oom_events_total", device="cpu") == 0
    assert count(metrics, "sentiment_cpu_fallbacks_total") == 1
    assert info.value.device == "cpu"

    engine, inner, factory, _, metrics = resilient(lambda b, t: True, factory=Factory(error=MemoryError()))
    for _ in range(3):  # the failed build is not tried again for a minute, nor counted again
        with pytest.raises(OutOfMemory):
            engine.run(*batch(1))
    assert count(metrics, "sentiment_oom_events_total", device="cpu") == 1  # building it ran out of host memory
    assert count(metrics, "sentiment_cpu_fallbacks_total") == 0  # no text reached a CPU engine


async def test_the_batcher_counts_a_failed_cpu_fallback_as_an_inference_error_of_the_cpu() -> None:
    """The batcher labelled every engine failure with the engine's device: a CUDA engine's failed CPU fallback
    counted as sentiment_inference_errors_total{device="cuda"}."""
    cpu = FaultInjectingEngine(FakeEngine("cpu"), lambda b, t: True)
    engine, inner, factory, _, metrics = resilient(lambda b, t: True, factory=Factory(engine=cpu))
    settings = load_settings(max_batch_size=4, max_batch_tokens=10_000, max_wait_ms=0, max_queue=100,
                             request_timeout_s=5, engine_workers=1)
    batcher = Batcher(engine, settings, metrics)
    batcher.start()
    with pytest.raises(OutOfMemory):
        await batcher.submit([np.arange(1, 9, dtype=np.int64)])
    await batcher.drain()
    assert count(metrics, "sentiment_inference_errors_total", device="cpu") == 1
    assert count(metrics, "sentiment_inference_errors_total", device="cuda") == 0


def test_a_failed_cpu_fallback_build_is_not_tried_again_for_a_minute(monkeypatch) -> None:
    """Each build reads and checks the variant's files: a file changed since start-up cost every out-of-memory
    text a full re-read before its 503."""
    clock = [1000.0]
    monkeypatch.setattr(oom.time, "monotonic", lambda: clock[0])
    factory = Factory(error=ArtifactError("model file corrupt: model.onnx"))
    engine, *_ = resilient(lambda b, t: True, factory=factory)
    for _ in range(3):
        with pytest.raises(InferenceFailed, match="CPU fallback failed: ArtifactError: model file corrupt"):
            engine.run(*batch(1))
    assert factory.calls == 1
    clock[0] += oom.CPU_REBUILD_AFTER_S
    factory.error = None
    np.testing.assert_array_equal(engine.run(*batch(1)), FakeEngine().run(*batch(1)))
    assert factory.calls == 2


def test_a_non_oom_error_after_a_split_fails_the_batch() -> None:
    calls = []

    def fail_when(b: int, t: int) -> bool:
        calls.append(b)
        return b == 8

    metrics = Metrics()
    inner = FakeEngine()
    engine = ResilientEngine(FaultInjectingEngine(inner, fail_when), Factory(), TokenBudget(8192, metrics), metrics)
    inner.error = ValueError("shape mismatch")
    with pytest.raises(InferenceFailed, match="shape mismatch"):
        engine.run(*batch(8))
    assert calls == [8, 4]


def test_fault_injection_looks_like_onnx_runtime() -> None:
    inner = FakeEngine()
    faulty = FaultInjectingEngine(inner, lambda b, t: b >= 4)
    ids, mask = batch(4)
    with pytest.raises(RuntimeException) as info:
        faulty.run(ids, mask)
    assert is_oom_error(info.value)
    assert "Failed to allocate memory" in str(info.value)
    np.testing.assert_array_equal(faulty.run(ids[:3], mask[:3]), inner.run(ids[:3], mask[:3]))
    assert faulty.injected == 1
    assert (faulty.device, faulty.provider, faulty.variant) == ("cuda", "CUDAExecutionProvider", "fp32")
    with pytest.raises(RuntimeException, match="^CUDA failure 2: out of memory$"):
        FaultInjectingEngine(inner, lambda b, t: True, message="CUDA failure 2: out of memory").run(ids, mask)
