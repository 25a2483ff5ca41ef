"""Provider selection and CUDA -> CPU fallback, variant choice, real inference on the tiny artifact."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from server import engine as engine_module
from server.artifact import load_artifact
from server.cgroup import cpu_quota_cores
from server.engine import (
    EngineStartError,
    available_cores,
    create_cpu_engine,
    create_engine,
    cuda_provider_options,
    engine_workers,
    intra_op_threads,
    resolve_device,
    session_options,
)
from server.runtime import warmup_shapes
from server.tokenizer import TextEncoder, pad_batch
from tests.cgroup_fixtures import is_v2, read_inside_new_cgroup


def test_cpu_engine_runs_the_tiny_artifact(tiny_artifact, make_settings):
    artifact = load_artifact(tiny_artifact)
    engine = create_engine(artifact, make_settings(device="cpu"))
    assert (engine.device, engine.provider, engine.variant) == ("cpu", "CPUExecutionProvider", "int8")
    ids, mask = pad_batch(TextEncoder(artifact.tokenizer_path, artifact.max_length).encode(["good", "bad film"]))
    logits = engine.run(ids, mask)
    assert logits.shape == (2, 2) and logits.dtype == np.float32 and np.isfinite(logits).all()


def test_variant_override_is_honoured_and_unknown_variant_is_refused(tiny_artifact, make_settings):
    artifact = load_artifact(tiny_artifact)
    assert create_engine(artifact, make_settings(model_variant="fp32")).variant == "fp32"
    with pytest.raises(Exception, match="variant 'fp16' is not in"):
        create_engine(artifact, make_settings(model_variant="fp16"))


def test_device_cuda_without_a_gpu_is_a_clear_start_up_error(make_settings, monkeypatch):
    monkeypatch.setattr(engine_module.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(EngineStartError, match="DEVICE=cuda but ONNX Runtime has no CUDA execution provider"):
        resolve_device(make_settings(device="cuda"))


def test_auto_falls_back_to_cpu_with_one_warning(tiny_artifact, make_settings, monkeypatch, caplog):
    monkeypatch.setattr(engine_module.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger="server.engine"):
        engine = create_engine(load_artifact(tiny_artifact), make_settings(device="auto"))
    assert engine.device == "cpu"
    assert [r.levelname for r in caplog.records] == ["WARNING"]


def test_cuda_provider_listed_but_unusable_falls_back_on_auto_and_fails_on_cuda(
    tiny_artifact, make_settings, monkeypatch, caplog
):
    """onnxruntime-gpu installed but no driver: the session silently runs on CPU, which we detect."""
    monkeypatch.setattr(engine_module.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    artifact = load_artifact(tiny_artifact)
    with caplog.at_level(logging.WARNING, logger="server.engine"):
        engine = create_engine(artifact, make_settings(device="auto"))
    assert engine.device == "cpu" and engine.provider == "CPUExecutionProvider"
    assert any("CUDA unusable" in r.getMessage() for r in caplog.records)
    with pytest.raises(EngineStartError):
        create_engine(artifact, make_settings(device="cuda"))


def test_a_cuda_start_failure_is_logged_with_its_reason_and_nothing_is_printed(
    tiny_artifact, make_settings, monkeypatch, caplog, capsys
):
    """ONNX Runtime's wrapper, left to itself, prints a failed start to stdout (the JSON log stream) and builds the
    session again on the CPU, so the warning said only that CUDA was not used. Injected here as the wrapper does
    it: a CUDA session that cannot start, and the wrapper's fallback when it is not turned off."""
    real = engine_module.ort.InferenceSession
    reason = "CUDA failure 35: CUDA driver version is insufficient for CUDA runtime version"

    def cuda_cannot_start(model, sess_options=None, providers=None, **kwargs):
        if any("CUDAExecutionProvider" in str(provider) for provider in providers):
            if int(kwargs.get("enable_fallback", 1)):
                print(f"EP Error {reason} when using {providers}")
                return real(model, sess_options=sess_options, providers=["CPUExecutionProvider"], **kwargs)
            raise RuntimeError(reason)
        return real(model, sess_options=sess_options, providers=providers, **kwargs)

    monkeypatch.setattr(engine_module.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(engine_module.ort, "InferenceSession", cuda_cannot_start)
    artifact = load_artifact(tiny_artifact)
    with caplog.at_level(logging.WARNING, logger="server.engine"):
        assert create_engine(artifact, make_settings(device="auto")).device == "cpu"
    assert [r.getMessage() for r in caplog.records if "CUDA unusable" in r.getMessage()][0].endswith(reason)
    with pytest.raises(EngineStartError, match=reason):
        create_engine(artifact, make_settings(device="cuda"))
    assert capsys.readouterr().out == ""


def test_cpu_threads_do_not_spin_unless_asked(make_settings):
    spin = "session.intra_op.allow_spinning"
    assert session_options(make_settings(), "cpu").get_session_config_entry(spin) == "0"
    assert session_options(make_settings(intra_op_spinning=True), "cpu").get_session_config_entry(spin) == "1"
    assert session_options(make_settings(intra_op_threads=3), "cpu").intra_op_num_threads == 3


@pytest.mark.parametrize(("cores", "device", "workers", "threads"), [
    (1, "cpu", 1, 1), (2, "cpu", 2, 1), (8, "cpu", 2, 4), (16, "cuda", 1, 16),
])
def test_auto_workers_share_the_cores(make_settings, monkeypatch, cores, device, workers, threads):
    monkeypatch.setattr(engine_module, "available_cores", lambda: cores)
    settings = make_settings(engine_workers=0, intra_op_threads=0)
    assert (engine_workers(settings, device), intra_op_threads(settings, device)) == (workers, threads)
    explicit = make_settings(engine_workers=3, intra_op_threads=0)
    assert (engine_workers(explicit, device), intra_op_threads(explicit, device)) == (3, max(1, cores // 3))


def test_gpu_oom_fallback_session_gets_every_core(tiny_artifact, make_settings, monkeypatch):
    monkeypatch.setattr(engine_module, "available_cores", lambda: 6)
    settings = make_settings(engine_workers=0, intra_op_threads=0)
    engine = create_cpu_engine(load_artifact(tiny_artifact), settings)
    assert engine._session.get_session_options().intra_op_num_threads == 6  # not 6 // 2 CPU workers


@pytest.mark.parametrize(("files", "cores"), [
    ({"cpu.max": "150000 100000\n"}, 2),  # v2: 1.5 CPUs -> 2 threads
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
    ({"cpu.max": "1" + "0" * 400 + " 100000\n"}, None),  # no number a kernel writes: OverflowError before
    ({"cpu.max": "0 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "-5\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "abc 100000\n"}, None),
])
def test_container_cpu_quota_caps_the_cores(tmp_path, files, cores):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota_cores(tmp_path) == cores
    assert available_cores(tmp_path) == min(cores or 10**6, available_cores(tmp_path / "none"))


def test_a_cpu_quota_on_the_process_s_own_cgroup_or_above_binds_though_the_mount_s_root_has_none(tmp_path):
    """systemd's CPUQuota=, docker --cgroupns=host --cpus: read at the mount's root alone, the quota was missed, so
    IDLE_SPIN_MS was not refused under it and thread pools were sized past it (red team helper-76)."""
    proc_self = tmp_path / "proc-self-cgroup"
    (tmp_path / "v2" / "system.slice" / "sentiment.service").mkdir(parents=True)
    (tmp_path / "v2" / "system.slice" / "cpu.max").write_text("300000 100000\n")
    (tmp_path / "v2" / "system.slice" / "sentiment.service" / "cpu.max").write_text("max 100000\n")
    proc_self.write_text("0::/system.slice/sentiment.service\n")
    assert cpu_quota_cores(tmp_path / "v2", proc_self) == 3  # the parent's, the lowest over the levels
    (tmp_path / "v1" / "cpu" / "docker" / "abc").mkdir(parents=True)
    (tmp_path / "v1" / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "v1" / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "v1" / "cpu" / "docker" / "abc" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "v1" / "cpu" / "docker" / "abc" / "cpu.cfs_period_us").write_text("100000\n")
    proc_self.write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cpu_quota_cores(tmp_path / "v1", proc_self) == 1
    proc_self.write_text("3:cpu,cpuacct:/elsewhere\n")  # not under this mount: the root's, which sets none
    assert cpu_quota_cores(tmp_path / "v1", proc_self) is None


def test_a_real_cpu_cgroup_s_quota_is_what_a_process_in_it_reads():
    """A cgroup made as an operator would (root, no namespace of its own): the process inside reads its quota."""
    quota = {"cpu.max": "100000 100000"} if is_v2() else {"cpu.cfs_quota_us": "100000"}
    assert read_inside_new_cgroup("cpu", quota, "c.cpu_quota_cores()") == "1"


def test_cuda_provider_options_are_deliberate(make_settings):
    options = cuda_provider_options(make_settings(cuda_device_id=1, cuda_mem_limit=2**30))
    assert options["device_id"] == "1"
    assert options["gpu_mem_limit"] == str(2**30)
    assert options["arena_extend_strategy"] == "kSameAsRequested"


def test_warmup_covers_every_cuda_bucket_within_the_budget_and_few_cpu_shapes():
    cuda = warmup_shapes("cuda", max_batch=32, max_tokens=8192, max_length=512)
    assert (1, 8) in cuda and (32, 256) in cuda and (16, 512) in cuda
    assert all(b * n <= 8192 for b, n in cuda)
    cpu = warmup_shapes("cpu", max_batch=32, max_tokens=8192, max_length=512)
    assert 1 <= len(cpu) <= 3 and max(b * n for b, n in cpu) == 8192
