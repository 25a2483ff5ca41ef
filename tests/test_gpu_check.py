"""scripts/gpu_check.py: skips with reasons without a GPU; its engine checks run on a CPU stand-in for CUDA."""

from __future__ import annotations

import json

import pytest

from scripts import gpu_check
from server import engine as engine_module
from server.oom import FaultInjectingEngine


class StandInCuda:
    """A CPU engine that calls itself CUDA, so the checks' own logic runs without a GPU."""

    device = "cuda"
    provider = "CUDAExecutionProvider"

    def __init__(self, inner) -> None:
        self.inner = inner
        self.variant = inner.variant

    def run(self, input_ids, attention_mask):
        return self.inner.run(input_ids, attention_mask)


def read(out) -> dict[str, dict]:
    return {r["check"]: r for r in json.loads((out / "gpu_check.json").read_text())}


def test_without_a_gpu_every_gpu_check_skips_and_says_why(tiny_artifact, tmp_path):
    assert gpu_check.main(["--artifact", str(tiny_artifact), "--out", str(tmp_path)]) == 0
    results = read(tmp_path)
    assert {r["status"] for r in results.values()} == {"SKIP"}
    assert "onnxruntime-gpu" in results["cuda-ep"]["detail"]
    assert results["oom-split"]["detail"] == "no CUDA execution provider (see cuda-ep)"


@pytest.fixture
def stand_in_cuda(monkeypatch):
    """CUDA 'available'; a capped arena (CUDA_MEM_LIMIT) runs out of memory above 512 padded tokens."""
    real_create = engine_module.create_engine
    monkeypatch.setattr(engine_module.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])

    def create(artifact, settings):
        if settings.device != "cuda":
            return real_create(artifact, settings)
        engine = StandInCuda(real_create(artifact, settings.model_copy(update={"device": "cpu"})))
        if settings.cuda_mem_limit:
            return FaultInjectingEngine(engine, lambda batch, length: batch * length > 512)
        return engine

    monkeypatch.setattr(engine_module, "create_engine", create)


def test_engine_checks_measure_agreement_throughput_and_the_oom_split(tiny_artifact, tmp_path, stand_in_cuda):
    argv = ["--artifact", str(tiny_artifact), "--out", str(tmp_path), "--seconds", "0.2"]
    assert gpu_check.main(argv) == 0
    results = read(tmp_path)
    assert results["cuda-engine"]["status"] == "PASS"
    assert results["cuda-engine"]["numbers"]["argmax_agreement"] == 1.0
    assert results["throughput"]["numbers"]["length_sorted_texts_per_s"] > 0
    oom = results["oom-split"]
    assert oom["status"] == "PASS", oom["detail"]
    assert oom["numbers"]["oom_events"] >= 1 and oom["numbers"]["splits"] >= 1


def test_an_oom_that_never_comes_is_a_failure_not_a_pass(tiny_artifact, tmp_path, stand_in_cuda, monkeypatch):
    monkeypatch.setattr(FaultInjectingEngine, "run", lambda self, ids, mask: self.inner.run(ids, mask))
    assert gpu_check.main(["--artifact", str(tiny_artifact), "--out", str(tmp_path), "--seconds", "0.1"]) == 1
    assert "no OOM to recover from" in read(tmp_path)["oom-split"]["detail"]
