"""The offline ONNX benchmark: argument parsing, statistics, inputs, and a tiny end-to-end run."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from scripts import bench_batch_effect, bench_loop_stall, bench_onnx, bench_server
from scripts.benchlib.inputs import fixed_length_batch
from scripts.benchlib.offline import BenchConfig, cell_result, run_benchmark, time_runner
from scripts.benchlib.serverproc import ROOT
from scripts.benchlib.stats import accuracy, latency_summary, percentile, throughput
from tests.labeled_files import write_labeled
from tests.model_fixtures import save_tiny_checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SENTENCES = [
    ("a gripping , funny and moving film", 1),
    ("dull , lifeless and far too long", 0),
    ("one of the best films of the year", 1),
    ("the plot makes no sense at all and the acting is wooden from start to finish", 0),
    ("charming", 1),
    ("an utterly forgettable sequel", 0),
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_labeled(tmp_path_factory.mktemp("data") / "dev.tsv", SENTENCES)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The Hugging Face checkpoint the tiny artifact was exported from (same seed, same weights)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint"))


def test_parse_args_defaults_and_lists():
    args = bench_onnx.parse_args(["--artifact", "a", "--data", "d.tsv"])
    assert (args.batch_sizes, args.seq_lens, args.checkpoint) == ([1, 8, 32], [16, 64, 128], None)
    args = bench_onnx.parse_args(["--artifact", "a", "--data", "d", "--batch-sizes", "2, 4", "--variants",
                                  "ort-cpu-fp32,ort-cpu-int8"])
    assert args.batch_sizes == [2, 4] and args.variants == ["ort-cpu-fp32", "ort-cpu-int8"]


@pytest.mark.parametrize("extra", [["--batch-sizes", "0,8"], ["--seq-lens", "x"], ["--variants", "tensorrt"],
                                   ["--repeats", "0"]])
def test_parse_args_rejects(extra, capsys):
    with pytest.raises(SystemExit):
        bench_onnx.parse_args(["--artifact", "a", "--data", "d", *extra])
    assert "error" in capsys.readouterr().err


def test_statistics():
    seconds = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    summary = latency_summary(seconds)
    assert summary["count"] == 100
    assert summary["p50_ms"] == pytest.approx(50.5)
    assert summary["p90_ms"] == pytest.approx(90.1)
    assert summary["p99_ms"] == pytest.approx(99.01)
    assert (summary["min_ms"], summary["max_ms"], summary["mean_ms"]) == pytest.approx((1, 100, 50.5))
    assert latency_summary([])["p50_ms"] is None and percentile([], 50) is None
    assert throughput(30, 2.0) == 15 and throughput(5, 0.0) is None
    assert accuracy(3, 4) == 0.75 and accuracy(0, 0) is None


def test_cell_result_throughput_from_median():
    row = cell_result("v", batch_size=4, seq_len=8, seconds=[0.1, 0.3, 0.2])
    assert row["median_ms"] == pytest.approx(200)
    assert row["seqs_per_s"] == pytest.approx(20) and row["tokens_per_s"] == pytest.approx(160)
    assert row["latencies_ms"] == pytest.approx([100, 300, 200])


def test_time_runner_warms_up_then_times():
    calls = []
    seconds = time_runner(lambda ids, mask: calls.append(ids.shape), np.zeros((1, 2)), np.zeros((1, 2)), 2, 3)
    assert len(calls) == 5 and len(seconds) == 3 and all(s >= 0 for s in seconds)


def test_fixed_length_batch_pads_and_truncates(tiny_artifact):
    texts = [t for t, _ in SENTENCES]
    ids, mask = fixed_length_batch(tiny_artifact / "tokenizer.json", texts, batch_size=8, seq_len=12)
    assert ids.shape == mask.shape == (8, 12) and ids.dtype == mask.dtype == np.int64
    lengths = mask.sum(1)
    assert lengths.max() == 12 and lengths.min() < 12  # the long review truncated, "charming" padded
    long_row = ids[3]
    assert long_row[-1] == ids[0][lengths[0] - 1]  # truncation keeps the closing [SEP]
    assert (ids[mask == 0] == 0).all()
    assert (ids[6] == ids[0]).all()  # cycles through the texts when the batch is larger


def test_end_to_end_run_writes_reports(tiny_artifact, checkpoint, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = bench_onnx.main([
        "--artifact", str(tiny_artifact), "--checkpoint", str(checkpoint), "--data", str(data_file),
        "--batch-sizes", "1,2", "--seq-lens", "8,16", "--repeats", "3", "--warmup", "1", "--threads", "1",
        "--out", str(out),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "# CPU:" in printed and "onnxruntime" in printed
    report = json.loads((out / "bench.json").read_text())
    status = {v["name"]: v for v in report["variants"]}
    ran = ["torch-cpu-fp32", "ort-cpu-fp32-noopt", "ort-cpu-fp32", "ort-cpu-int8"]
    assert [status[name]["status"] for name in ran] == ["ok"] * 4
    assert status["ort-cpu-fp32"]["graph_optimization"] == "ORT_ENABLE_ALL"
    assert status["ort-cpu-fp32-noopt"]["graph_optimization"] == "ORT_DISABLE_ALL"
    # same weights and the same inputs: ONNX Runtime agrees with PyTorch eager on every text
    assert status["ort-cpu-fp32"]["agreement"]["reference"] == "torch-cpu-fp32"
    assert status["ort-cpu-fp32"]["agreement"]["argmax_agreement"] == 1.0
    assert status["ort-cpu-fp32"]["agreement"]["max_abs_diff"] < 1e-4
    assert status["ort-cpu-fp32"]["accuracy"] == status["torch-cpu-fp32"]["accuracy"]
    assert status["ort-cpu-int8"]["eval_examples"] == len(SENTENCES)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert status["ort-cuda-fp32"]["status"] == "skipped"
        assert "CUDAExecutionProvider" in status["ort-cuda-fp32"]["reason"]
        assert f"skipped ort-cuda-fp32: {status['ort-cuda-fp32']['reason']}" in printed
    assert len(report["results"]) == 4 * 4
    assert all(len(r["latencies_ms"]) == 3 and r["median_ms"] > 0 for r in report["results"])
    with (out / "bench.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 16 and {r["variant"] for r in rows} == set(ran)
    assert float(rows[0]["seqs_per_s"]) > 0 and 0 <= float(rows[0]["accuracy"]) <= 1
    for png in ("throughput.png", "latency.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC


def test_torch_skipped_without_checkpoint(tiny_artifact, data_file, capsys):
    config = BenchConfig(tiny_artifact, data_file, batch_sizes=[1], seq_lens=[8], repeats=1, warmup=0, threads=1,
                         variants=["torch-cpu-fp32", "ort-cpu-fp32"])
    report = run_benchmark(config)
    torch_variant, ort_variant = report["variants"]
    assert torch_variant["status"] == "skipped" and "--checkpoint" in torch_variant["reason"]
    assert ort_variant["status"] == "ok" and ort_variant["agreement"]["reference"] == "ort-cpu-fp32"
    assert "skipped torch-cpu-fp32: no --checkpoint given" in capsys.readouterr().out


def test_sequence_length_beyond_the_model_is_refused(tiny_artifact, data_file):
    with pytest.raises(ValueError, match="exceeds the model's maximum"):
        run_benchmark(BenchConfig(tiny_artifact, data_file, seq_lens=[4096], variants=["ort-cpu-fp32"]))


def test_bench_server_compares_durability_modes_in_one_run(tiny_artifact, data_file, tmp_path, capsys):
    bench_server.main(["--artifact", str(tiny_artifact), "--data", str(data_file), "--skip-raw", "--seconds", "0.5",
                       "--concurrency", "2", "--durability", "ack,async", "--out", str(tmp_path)])
    durability = json.loads((tmp_path / "bench_server.json").read_text())["durability"]
    ack, fast = durability["ack"], durability["async"]
    assert (ack["server_says"], fast["server_says"]) == ("ack", "async")  # each server ran in its mode
    assert ack["saturation_texts_per_s"] > 0 and fast["saturation_texts_per_s"] > 0
    cost = durability["ack_cost"]
    assert cost["saturation_cost_pct"] == pytest.approx(
        100 * (1 - ack["saturation_texts_per_s"] / fast["saturation_texts_per_s"]))
    assert cost["lone_p50_cost_ms"] == pytest.approx(ack["lone_request_p50_ms"] - fast["lone_request_p50_ms"])
    level = ack["by_concurrency"]["2"]  # where the time went, from the server's /metrics and /proc
    assert level["texts_per_batch"] >= 1 and level["padded_per_real_token"] >= 1
    assert level["engine_ms_per_text"] > 0
    assert level["loop_cpu_ms_per_text"] + level["other_threads_cpu_ms_per_text"] > 0
    found = json.loads((tmp_path / "bench_server.json").read_text())["f_floor"]  # this machine's floor
    assert found["transport_p50_ms"] > 0 and found["fsync_p50_ms"] > 0 and found["tokenization_p50_ms"] > 0
    assert found["lone"]["ack"]["fsync_ms"] == found["fsync_p50_ms"] and found["lone"]["async"]["fsync_ms"] == 0
    assert found["lone"]["ack"]["target_reachable"] is None  # --skip-raw: no engine, no floor to judge by
    out = capsys.readouterr().out
    assert "(d) ack costs" in out and "(e) at 2 clients, per text" in out and "target lone_overhead_ms" in out
    assert "(f) lone overhead floor (ack)" in out and "(f) saturation ceiling" in out
    assert "(f) the server's own CPU per text beside the engine" in out


def test_bench_server_measures_a_setting_beside_the_first_mode_in_the_same_run(tiny_artifact, data_file, tmp_path,
                                                                                capsys):
    bench_server.main(["--artifact", str(tiny_artifact), "--data", str(data_file), "--skip-raw", "--seconds", "0.5",
                       "--concurrency", "2", "--durability", "async", "--beside", "STORE_DURABILITY=ack",
                       "--out", str(tmp_path)])
    beside = json.loads((tmp_path / "bench_server.json").read_text())["beside"]
    assert list(beside) == ["async STORE_DURABILITY=ack"]
    assert beside["async STORE_DURABILITY=ack"]["saturation_texts_per_s"] > 0
    assert "(g) async STORE_DURABILITY=ack (/health says ack): lone p50" in capsys.readouterr().out  # its setting won


def test_bench_server_refuses_an_unknown_durability_mode(capsys):
    with pytest.raises(SystemExit):
        bench_server.main(["--durability", "ack,fast"])
    assert "choose from ack, async" in capsys.readouterr().err


def test_bench_grpc_memory_floods_a_real_server_and_prints_its_peak(tiny_artifact):
    """In a process of its own: the script imports the server's generated gRPC code, which cannot share a process
    with tritonclient's copy (tests/test_protocol_oip_grpc.py)."""
    done = subprocess.run([sys.executable, "scripts/bench_grpc_memory.py", "--calls", "5", "--texts", "2",
                           "--chars", "300", "--env", f"MODEL_PATH={tiny_artifact}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    calls, memory = done.stdout.splitlines()[-2:]
    assert calls.startswith("5 calls of ") and calls.endswith(": 5 OK"), done.stdout
    assert memory.startswith("server resident memory: ") and "MiB idle, peak" in memory, done.stdout


def test_the_batch_effect_script_reports_what_batching_changed(tiny_artifact, tmp_path, capsys):
    """fp32 computes each text on its own: nothing may change (int8's figures are the README's, on the default
    model)."""
    data = write_labeled(tmp_path / "texts.tsv", [(f"a {word} film number {n}", 1)
                                                  for n, word in enumerate(["fine", "dull", "bright", "slow"] * 3)])
    bench_batch_effect.main(["--artifact", str(tiny_artifact), "--variant", "fp32", "--data", str(data),
                             "--limit", "8", "--batch", "4"])
    out = capsys.readouterr().out
    assert out.startswith(f"fp32, 8 texts of {data}, each alone and in a batch of 4 with random others: 0 labels "
                          "changed (0.0%); probability moved by p50"), out
    moved = float(out.rsplit("max ", 1)[1])
    assert moved < 1e-4


def test_the_loop_stall_script_probes_readiness_idle_and_under_large_bodies(tiny_artifact, data_file, capsys):
    assert bench_loop_stall.main(["--artifact", str(tiny_artifact), "--data", str(data_file), "--texts", "3",
                                  "--chars", "8000", "--clients", "2", "--seconds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("bodies: 2 clients x 3 texts x 8000 characters") and "answered {200: " in lines[0]
    for phase, line in zip(("idle", "under the large bodies"), lines[1:], strict=True):
        p50, p99, peak = (float(line.split(f"{name} ", 1)[1].split(" ms")[0]) for name in ("p50", "p99", "max"))
        assert line.startswith(f"/ready {phase}: ") and 0 < p50 <= p99 <= peak, line


def test_the_loop_stall_script_needs_data(capsys):
    with pytest.raises(SystemExit):
        bench_loop_stall.parse_args([])
    assert "--data is required" in capsys.readouterr().err
