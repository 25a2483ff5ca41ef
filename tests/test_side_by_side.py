"""Side by side (issue 6): adapters, comparison arithmetic, writers, CLI and the server lifecycle; no peer installs."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import orjson
import psutil
import pytest
from fastapi import FastAPI, Request

from scripts import side_by_side
from scripts.benchlib.loadrun import LoadTestConfig, run_loadtest
from scripts.benchlib.peers import servers as servers_module
from scripts.benchlib.peers.adapters import (
    ADAPTERS,
    InfinityAdapter,
    OursAdapter,
    RayAdapter,
    TorchServeAdapter,
    TritonAdapter,
    correct_count,
    normalize_label,
)
from scripts.benchlib.peers.compare import compare, saturation, verdict_lines
from scripts.benchlib.peers.output import markdown, overall_accuracy, write_outputs
from scripts.benchlib.peers.run import (
    RunConfig,
    SideBySide,
    artifact_mismatch,
    disturbance,
    overloaded,
    prepare_checkpoint,
)
from scripts.benchlib.peers.servers import (
    SERVERS,
    Context,
    Launch,
    ServerSpec,
    StartFailed,
    pause,
    start,
    start_with_retries,
    stop,
)
from scripts.benchlib.peers.venvs import MARKER, ensure_venv
from scripts.benchlib.serverproc import free_port
from scripts.benchlib.workload import Draw
from tests.asgi_thread import serve_in_thread
from tests.labeled_files import write_labeled

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BAD_BODY = (ValueError, KeyError, TypeError, IndexError)


# -- adapters -----------------------------------------------------------------------------------------------

def test_normalize_label():
    assert normalize_label(b"NEGATIVE") == "NEGATIVE"
    assert normalize_label(" neutral ") == "neutral"
    with pytest.raises(TypeError):
        normalize_label(1)


def test_correct_count_checks_length():
    assert correct_count(["POSITIVE", "NEGATIVE", "POSITIVE"], [1, 0, 0]) == 2
    with pytest.raises(ValueError):
        correct_count(["POSITIVE"], [1, 0])


def test_correct_count_matches_any_models_labels_by_name():
    """A 3-label model: "neutral" is nobody's 1; names match in any case; LABEL_<i> is position i."""
    assert correct_count(["neutral", "positive", b"NEGATIVE"], ["neutral", 1, "negative"]) == 3
    assert correct_count(["neutral", "positive"], [1, " positive"]) == 1  # "1" is never "neutral"
    assert correct_count(["LABEL_2", "LABEL_0"], [2, 1]) == 1
    assert correct_count(["good", "bad"], ["good", 0]) == 1  # 0 is "negative" only where a label says so


def test_ours_adapter_counts_cached():
    adapter = OursAdapter()
    draw = Draw(["good", "bad"], [1, 0], 0)
    assert orjson.loads(adapter.encode(draw)) == {"texts": ["good", "bad"]}
    assert orjson.loads(adapter.encode(Draw(["good"], [1], 0))) == {"text": "good"}
    payload = orjson.dumps({"predictions": [{"label": "POSITIVE", "cached": True}, {"label": "POSITIVE"}]})
    assert adapter.score(payload, [1, 0]) == (1, 1)
    assert adapter.path == "/predict" and adapter.health_path == "/ready"


def test_triton_adapter_request_and_response():
    adapter = TritonAdapter("sentiment")
    assert adapter.path == "/v2/models/sentiment/infer"
    body = orjson.loads(adapter.encode(Draw(["good", "bad"], [1, 0], 0)))
    assert body["inputs"] == [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": ["good", "bad"]}]
    assert body["outputs"][0]["name"] == "label"
    flat = {"outputs": [{"name": "score", "data": [0.9, 0.8]},
                        {"name": "label", "datatype": "BYTES", "shape": [2, 1], "data": ["POSITIVE", "NEGATIVE"]}]}
    assert adapter.labels(orjson.dumps(flat)) == ["POSITIVE", "NEGATIVE"]
    nested = {"outputs": [{"name": "label", "data": [["NEGATIVE"], ["NEGATIVE"]]}]}
    assert adapter.score(orjson.dumps(nested), [1, 0]) == (1, 0)
    with pytest.raises(KeyError):
        adapter.labels(orjson.dumps({"outputs": [{"name": "score", "data": [1.0]}]}))
    with pytest.raises(BAD_BODY):
        adapter.labels(b'{"error": "Request for unknown model"}')


def test_infinity_adapter_takes_the_top_label():
    adapter = InfinityAdapter("sentiment")
    assert adapter.path == "/classify"
    assert orjson.loads(adapter.encode(Draw(["a", "b"], [1, 0], 0))) == {
        "model": "sentiment", "input": ["a", "b"], "raw_scores": False}
    payload = orjson.dumps({"object": "classify", "data": [
        [{"label": "NEGATIVE", "score": 0.2}, {"label": "POSITIVE", "score": 0.8}],
        [{"label": "POSITIVE", "score": 0.4}, {"label": "NEGATIVE", "score": 0.6}],
    ]})
    assert adapter.labels(payload) == ["POSITIVE", "NEGATIVE"]
    assert adapter.score(payload, [1, 1]) == (1, 0)
    with pytest.raises(ValueError):
        adapter.score(payload, [1])
    with pytest.raises(BAD_BODY):
        adapter.labels(orjson.dumps({"data": [[]]}))


@pytest.mark.parametrize("adapter, path, health", [
    (TorchServeAdapter("sentiment"), "/predictions/sentiment", "/ping"),
    (RayAdapter(), "/predict", "/-/healthz"),
])
def test_handler_peers_speak_our_body(adapter, path, health):
    assert (adapter.path, adapter.health_path) == (path, health)
    assert orjson.loads(adapter.encode(Draw(["x"], [1], 0))) == {"text": "x"}
    assert adapter.score(orjson.dumps({"predictions": [{"label": "POSITIVE", "score": 0.7}]}), [1]) == (1, 0)


def test_every_server_has_an_adapter_and_its_knobs():
    assert set(ADAPTERS) == set(SERVERS)
    for spec in SERVERS.values():
        assert {"max_batch_size", "threads"} <= set(spec.settings)
        if spec.requirements:  # a peer: torch pinned to the local CPU wheel, never unpinned
            torch = [r for r in spec.requirements if re.split(r"[=<>!~\[ ]", r)[0] == "torch"]
            assert torch == [servers_module.TORCH_PIN]


def fake_triton() -> FastAPI:
    app = FastAPI()

    @app.post("/v2/models/sentiment/infer")
    async def infer(request: Request):
        body = await request.json()
        texts = body["inputs"][0]["data"]
        return {"outputs": [{"name": "label", "datatype": "BYTES", "shape": [len(texts), 1],
                             "data": ["POSITIVE" if "good" in t else "NEGATIVE" for t in texts]}]}

    return app


@pytest.fixture
def triton_like():
    with serve_in_thread(fake_triton()) as url:
        yield url


@pytest.fixture
def data_file(tmp_path) -> Path:
    rows = [(f"a {'good' if i % 2 else 'bad'} film number {i}", i % 2) for i in range(20)]
    return write_labeled(tmp_path / "labeled.tsv", rows)


def test_load_test_drives_a_peer_protocol(triton_like, data_file):
    adapter = TritonAdapter()
    report = run_loadtest(LoadTestConfig(url=triton_like, data=data_file, levels=[2], duration=0.5, warmup=0.0,
                                         predict_path=adapter.path, baseline_path=None, protocol=adapter),
                          log=lambda _: None)
    phase = report["phases"][0]
    assert phase["ok"] == phase["requests"] > 0
    assert phase["accuracy"] == 1.0 and not phase["errors"]
    assert report["config"]["protocol"] == "triton"


# -- comparison arithmetic ------------------------------------------------------------------------------------

def phase(server, mode, level, rps, p50=10.0, p99=20.0, requests=100, ok=None, accuracy=0.9):
    ok = requests if ok is None else ok
    return {"server": server, "mode": mode, "level": level, "goodput_rps": rps, "requests": requests, "ok": ok,
            "by_status": {"200": ok}, "errors": {}, "accuracy": accuracy, "scored_texts": ok,
            "latency": {"count": ok, "p50_ms": p50, "p90_ms": p50, "p99_ms": p99}}


def sweep(ours_p99=8.0, triton_p50=9.0, ray_p50=12.0, triton_ok=100) -> list[dict]:
    return [
        phase("ours", "closed", 1, 100.0), phase("ours", "closed", 16, 300.0), phase("ours", "closed", 64, 290.0),
        phase("triton", "closed", 1, 50.0), phase("triton", "closed", 16, 180.0),
        phase("ray", "closed", 1, 40.0), phase("ray", "closed", 16, 150.0),
        phase("ours", "open", 150.0, 150.0, p50=4.0, p99=ours_p99),
        phase("triton", "open", 150.0, 149.0, p50=triton_p50, p99=40.0, ok=triton_ok),
        phase("ray", "open", 150.0, 148.0, p50=ray_p50, p99=50.0),
    ]


def test_saturation_is_the_best_closed_loop_goodput():
    phases = sweep()
    assert saturation(phases, "ours") == {"rps": 300.0, "level": 16}
    assert saturation(phases, "triton") == {"rps": 180.0, "level": 16}
    assert saturation(phases, "nobody") is None


def test_compare_the_three_targets():
    result = compare(sweep(), ["ours", "triton", "ray"])
    t = result["throughput"]
    assert t["best_peer"] == "triton" and t["ratio"] == pytest.approx(300 / 180) and not t["passed"]  # < 2x
    assert (t["ours_level"], t["best_peer_level"]) == (16, 16)
    levels = result["equal_concurrency"]["levels"]
    assert [(r["concurrency"], r["best_peer"]) for r in levels] == [(1, "triton"), (16, "triton"), (64, None)]
    assert levels[0]["ratio"] == pytest.approx(2.0) and levels[1]["ratio"] == pytest.approx(300 / 180)
    assert levels[0]["peers_rps"] == {"triton": 50.0, "ray": 40.0}
    assert levels[2]["passed"] is None  # only ours ran at 64: that level is not judged, so neither is "every level"
    assert result["equal_concurrency"]["passed"] is None
    lat = result["latency"]
    assert lat["rate_rps"] == 150.0
    assert lat["best_peer"] == "triton" and lat["best_peer_p50_ms"] == 9.0
    assert lat["ours_p99_ms"] == 8.0 and lat["passed"]
    assert {k: v["met"] for k, v in result["targets"].items()} == {
        "equal_concurrency": None, "saturation": False, "latency": True}
    lines = verdict_lines(result)
    assert "c=1 2.00x vs triton, c=16 1.67x vs triton" in lines[0] and "no comparison at c=64" in lines[0]
    assert "1.67x, best of sweep (target >= 2x): not met" in lines[1]
    assert "ours p99 8.0 ms" in lines[2] and "triton p50 9.0 ms" in lines[2] and lines[2].endswith(": met")


def test_equal_concurrency_catches_a_level_where_ours_is_not_far_enough_ahead():
    """Ahead by 2x at saturation (best of sweep) but only 1.45x at 64 clients, where the peer peaks: not met."""
    phases = sweep() + [phase("triton", "closed", 64, 145.0), phase("ray", "closed", 64, 100.0)]
    phases = [p for p in phases if not (p["server"] == "triton" and p["level"] == 16)]
    phases += [phase("triton", "closed", 16, 120.0)]
    phases = [p for p in phases if not (p["server"] == "ours" and p["level"] == 64)] + [
        phase("ours", "closed", 64, 210.0)]
    result = compare(phases, ["ours", "triton", "ray"])
    assert result["throughput"]["ratio"] == pytest.approx(2.0) and result["throughput"]["passed"]
    row = result["equal_concurrency"]["levels"][2]
    assert (row["best_peer"], row["ratio"], row["passed"]) == ("triton", pytest.approx(210 / 145), False)
    assert result["equal_concurrency"]["passed"] is False
    assert result["targets"]["equal_concurrency"]["verdict"] == "not met"
    assert result["targets"]["saturation"]["verdict"] == "met"
    faster = [p for p in phases if not (p["server"] == "ours" and p["level"] == 64)] + [
        phase("ours", "closed", 64, 220.0)]
    assert compare(faster, ["ours", "triton", "ray"])["equal_concurrency"]["passed"] is True  # 220/145 >= 1.5


def test_a_level_where_no_peer_answered_counts_for_ours_if_ours_did():
    phases = [phase("ours", "closed", 8, 50.0), phase("triton", "closed", 8, 0.0)]
    row = compare(phases, ["ours", "triton"])["equal_concurrency"]["levels"][0]
    assert row["ratio"] is None and row["passed"] is True
    phases = [phase("ours", "closed", 8, 0.0), phase("triton", "closed", 8, 0.0)]
    assert compare(phases, ["ours", "triton"])["equal_concurrency"]["passed"] is False


def test_compare_fails_when_targets_are_missed():
    phases = [p for p in sweep(ours_p99=10.0) if not (p["server"] == "triton" and p["mode"] == "closed")]
    phases += [phase("triton", "closed", 16, 250.0)]
    result = compare(phases, ["ours", "triton", "ray"])
    assert result["throughput"]["ratio"] == pytest.approx(1.2) and not result["throughput"]["passed"]
    assert result["equal_concurrency"]["passed"] is False  # 1.2x at 16
    assert not result["latency"]["passed"]
    assert all("not met" in line for line in verdict_lines(result))


def test_a_peer_that_drops_requests_is_not_the_latency_yardstick():
    result = compare(sweep(triton_p50=3.0, triton_ok=80), ["ours", "triton", "ray"])
    assert result["latency"]["best_peer"] == "ray" and result["latency"]["best_peer_kept_up"]
    result = compare(sweep(triton_p50=3.0, triton_ok=80), ["ours", "triton"])
    assert result["latency"]["best_peer"] == "triton" and not result["latency"]["best_peer_kept_up"]


def test_compare_without_ours_or_peers_judges_nothing():
    only_peers = [p for p in sweep() if p["server"] != "ours"]
    assert compare(only_peers, ["triton", "ray"])["throughput"] is None
    result = compare([p for p in sweep() if p["server"] == "ours"], ["ours"])
    assert result["throughput"] is None and result["latency"] is None
    assert all("not judged" in line for line in verdict_lines(result))


# -- writers ---------------------------------------------------------------------------------------------------

def report_for(phases: list[dict]) -> dict:
    names = ["ours", "triton", "ray", "infinity"]
    servers = {n: {"status": "measured", "settings": dict(SERVERS[n].settings), "versions": {"torch": "2.13.0"},
                   "idle_cpu_percent": 0.5} for n in names[:3]}
    servers["infinity"] = {"status": "start failed", "error": "boom", "settings": {}}
    return {"started": "2026-01-01T00:00:00+00:00",
            "environment": {"cpu": "test CPU", "usable_cpus": 2},
            "config": {"data": "dev.tsv", "checkpoint": "ckpt", "max_length": 128},
            "servers": servers, "phases": phases, "generator": None,
            "comparison": compare(phases, names[:3])}


def test_markdown_has_verdicts_servers_and_both_tables():
    text = markdown(report_for(sweep(triton_ok=80)))
    assert "saturation: ours 300.0 req/s" in text and "latency at 150.0 req/s" in text
    assert "- equal concurrency: ours / best peer at the same level: c=1 2.00x vs triton" in text
    assert "| ours | measured |" in text and "max_batch_size=32" in text and "300.0 (c=16)" in text
    assert "## Closed loop" in text and "| concurrency 1 | concurrency 16 | concurrency 64 |" in text
    assert "| triton | 50.0 · 10.0/20.0 | 180.0 · 10.0/20.0 | - |" in text
    assert "## Open loop" in text and "20 failed" in text
    assert "| concurrency 1 | 100.0 | triton 50.0 | 2.00× | ≥ 1.5×: met |" in text
    assert "| concurrency 64 | 290.0 | - | - | ≥ 1.5×: not judged |" in text
    assert "| saturation (best of sweep) | 300.0 (c=16) | triton 180.0 (c=16) | 1.67× | ≥ 2×: not met |" in text
    assert "- infinity: start failed: boom" in text and "Interrupted" not in text


def test_disturbed_phases_are_flagged():
    calm = {"mode": "open", "level": 100.0, "goodput_rps": 99.0, "other_cpu_percent": 5.0, "send_lag": {"p99_ms": 0.5}}
    assert disturbance(calm) is None and not overloaded(calm)
    assert "other processes used 60%" in disturbance({**calm, "other_cpu_percent": 60.0})
    assert "sent late (p99 250 ms)" in disturbance({**calm, "send_lag": {"p99_ms": 250.0}})
    swamped = {**calm, "goodput_rps": 40.0, "send_lag": {"p99_ms": 250.0}}
    assert overloaded(swamped) and disturbance(swamped) is None  # its own load made the generator late
    phases = sweep()
    phases[3]["disturbed"] = "other processes used 60% of a CPU"
    text = markdown(report_for(phases))
    assert "| triton | 50.0 · 10.0/20.0 † |" in text
    assert "- triton closed 1: other processes used 60% of a CPU" in text
    assert "| concurrency 1 | 100.0 | triton 50.0 | 2.00× † | ≥ 1.5×: met |" in text
    assert "| concurrency 16 | 300.0 | triton 180.0 | 1.67× | ≥ 1.5×: met |" in text


def test_overall_accuracy_weights_by_texts():
    phases = [phase("ours", "closed", 1, 10.0, accuracy=1.0, requests=10),
              phase("ours", "closed", 4, 10.0, accuracy=0.5, requests=30), phase("ray", "closed", 1, 1.0)]
    assert overall_accuracy(phases, "ours") == pytest.approx(0.625)
    assert overall_accuracy(phases, "triton") is None
    report = report_for(phases)
    report["interrupted"] = "SystemExit: 143"
    assert "**Interrupted** (SystemExit: 143): partial results." in markdown(report)


def test_write_outputs_writes_json_markdown_and_png(tmp_path):
    report = report_for(sweep())
    paths = write_outputs(report, tmp_path / "out")
    assert [p.name for p in paths] == ["side_by_side.json", "side_by_side.md", "side_by_side.png"]
    saved = json.loads(paths[0].read_text())["comparison"]
    assert saved["throughput"]["best_peer"] == "triton"
    assert saved["targets"]["saturation"] == {"target": "our saturation throughput >= 2x the best peer's",
                                              "met": False, "verdict": "not met"}
    assert saved["equal_concurrency"]["levels"][1]["ratio"] == pytest.approx(300 / 180)
    assert paths[2].read_bytes().startswith(PNG_MAGIC)


def test_plot_without_open_loop_phases(tmp_path):
    paths = write_outputs(report_for([p for p in sweep() if p["mode"] == "closed"]), tmp_path)
    assert paths[2].read_bytes().startswith(PNG_MAGIC)


# -- CLI, checkpoint, venvs --------------------------------------------------------------------------------------

def test_parse_args_and_overrides():
    args = side_by_side.parse_args(["--peers", "ours,ray", "--concurrency", "1,8", "--set", "ray.replicas=2",
                                    "--set", "ours.cache=false", "--set", "triton.max_wait_ms=0.5"])
    assert args.peers == ["ours", "ray"] and args.concurrency == [1, 8]
    assert args.overrides == [("ray", "replicas", 2), ("ours", "cache", False), ("triton", "max_wait_ms", 0.5)]
    config = side_by_side.config_from(args)
    assert config.overrides == {"ray": {"replicas": 2}, "ours": {"cache": False}, "triton": {"max_wait_ms": 0.5}}
    smoke = side_by_side.parse_args(["--smoke"])
    assert smoke.concurrency == [1, 8] and smoke.duration == 2.0 and smoke.out.name == "side_by_side_smoke"


@pytest.mark.parametrize("argv", [["--peers", "ours,vllm"], ["--set", "ray=2"], ["--set", "ray.nope=1"],
                                  ["--set", "nope.threads=1"], ["--duration", "0"]])
def test_parse_args_rejects(argv):
    with pytest.raises(SystemExit):
        side_by_side.parse_args(argv)


def test_prepare_checkpoint_links_files_and_caps_the_tokenizer(tmp_path):
    source = tmp_path / "ckpt"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / "model.safetensors").write_bytes(b"weights")
    (source / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512, "do_lower_case": True}))
    dest = prepare_checkpoint(source, tmp_path / "out" / "model", 128)
    assert (dest / "model.safetensors").is_symlink() and (dest / "model.safetensors").read_bytes() == b"weights"
    config = json.loads((dest / "tokenizer_config.json").read_text())
    assert config == {"model_max_length": 128, "do_lower_case": True,
                      "model_input_names": ["input_ids", "attention_mask"]}
    assert json.loads((source / "tokenizer_config.json").read_text())["model_max_length"] == 512
    prepare_checkpoint(source, dest, 64)  # again: replaced
    assert json.loads((dest / "tokenizer_config.json").read_text())["model_max_length"] == 64


def fine_tuned(tmp_path: Path, result: dict) -> Path:
    checkpoint = tmp_path / "ft" / "best"
    checkpoint.mkdir(parents=True)
    (checkpoint / "dev_result.json").write_text(json.dumps(result))
    return checkpoint


def built_from(tmp_path: Path, source) -> Path:
    artifact = tmp_path / "artifact"
    artifact.mkdir(exist_ok=True)
    (artifact / "manifest.json").write_text(json.dumps({"max_sequence_length": 128, "source": source}))
    return artifact


def test_the_artifact_must_come_from_the_peers_checkpoint(tmp_path):
    selected = {"accuracy": 0.85, "step": 400, "weights": "trained"}
    checkpoint = fine_tuned(tmp_path, selected)
    same = built_from(tmp_path, {"checkpoint": "ft/best", "selected": selected})
    assert artifact_mismatch(same, checkpoint, root=tmp_path) is None  # relative to where the build ran
    assert artifact_mismatch(built_from(tmp_path, str(checkpoint)), checkpoint, root=tmp_path) is None
    other = built_from(tmp_path, {"checkpoint": "build/finetune_ema/best", "selected": selected})
    assert "was built from build/finetune_ema/best, not from --checkpoint" in artifact_mismatch(other, checkpoint,
                                                                                               root=tmp_path)
    later = built_from(tmp_path, {"checkpoint": "ft/best", "selected": {**selected, "step": 300}})
    assert "changed since" in artifact_mismatch(later, checkpoint, root=tmp_path)
    (later / "manifest.json").unlink()
    assert "no manifest.json" in artifact_mismatch(later, checkpoint, root=tmp_path)


def test_main_refuses_an_artifact_from_another_checkpoint(tmp_path, capsys):
    checkpoint = fine_tuned(tmp_path, {"step": 1})
    artifact = built_from(tmp_path, "somewhere/else")
    data = write_labeled(tmp_path / "d.tsv", [("good", 1)])
    code = side_by_side.main(["--checkpoint", str(checkpoint), "--artifact", str(artifact), "--data", str(data),
                              "--out", str(tmp_path / "out")])
    assert code == 2 and "was built from somewhere/else" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was started or written


def test_ensure_venv_is_a_no_op_when_the_marker_matches(tmp_path, monkeypatch):
    venv = tmp_path / "peer"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / MARKER).write_text("torch==2.13.0\nx==1\n")
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail("nothing should be installed"))
    assert ensure_venv(venv, ["torch==2.13.0", "x==1"]) == venv / "bin" / "python"


def context(tmp_path, settings, python=None) -> Context:
    return Context(python=Path(python or sys.executable), checkpoint=tmp_path / "ckpt", artifact=tmp_path / "art",
                   max_length=128, port=8001, spare_ports=[8002, 8003], workdir=tmp_path / "w", settings=settings)


def test_launch_commands_carry_the_settings(tmp_path):
    ours = SERVERS["ours"].launch(context(tmp_path, SERVERS["ours"].settings))
    assert ours.env["MAX_BATCH_SIZE"] == "32" and ours.env["ENABLE_MODEL_CACHING"] == "false"
    assert ours.env["PORT"] == "8001"
    assert (ours.env["ENGINE_WORKERS"], ours.env["INTRA_OP_THREADS"]) == ("0", "0")  # the server's own auto
    triton = SERVERS["triton"].launch(context(tmp_path, SERVERS["triton"].settings))
    assert triton.argv[triton.argv.index("--max-wait-ms") + 1] == "2.0"
    assert triton.argv[triton.argv.index("--grpc-port") + 1] == "8002"
    assert triton.env["LD_LIBRARY_PATH"].split(os.pathsep)[0]  # this python's LIBDIR first
    infinity = SERVERS["infinity"].launch(context(tmp_path, SERVERS["infinity"].settings, "/venv/bin/python"))
    assert infinity.argv[0] == "/venv/bin/infinity_emb" and "--no-compile" in infinity.argv
    assert infinity.argv[infinity.argv.index("--batch-size") + 1] == "32"
    assert infinity.env["PATH"].startswith("/venv/bin")
    ray = SERVERS["ray"].launch(context(tmp_path, {**SERVERS["ray"].settings, "replicas": 2}))
    assert ray.argv[ray.argv.index("--replicas") + 1] == "2"
    assert len(ray.env["RAY_TMPDIR"]) < 40 and ray.cleanup == [Path(ray.env["RAY_TMPDIR"])]
    ray.cleanup[0].rmdir()


# -- lifecycle: start waits for a real prediction, stop ends the whole process group -------------------------------

FAKE_SERVER = r"""
import json, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
time.sleep(0.3)
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers()
        self.wfile.write(data)
    def do_GET(self): self._send({"status": "ok", "helper": helper.pid})
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._send({"predictions": [{"label": "POSITIVE", "score": 0.9}]})
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_start_probes_and_stop_ends_the_process_group(tmp_path):
    def launch(ctx: Context) -> Launch:
        return Launch([sys.executable, "-c", FAKE_SERVER, str(ctx.port)], dict(os.environ), ctx.workdir,
                      cleanup=[ctx.workdir / "scratch"])

    spec = ServerSpec("fake", "fake", [], [], {"threads": 1}, OursAdapter, launch, ready_timeout=20)
    ctx = Context(python=Path(sys.executable), checkpoint=tmp_path, artifact=None, max_length=8, port=free_port(),
                  spare_ports=[], workdir=tmp_path / "fake", settings={"threads": 1})
    (ctx.workdir / "scratch").mkdir(parents=True)
    running = start(spec, ctx, log=lambda _: None)
    tree = running.tree()
    assert len(tree) == 2 and running.cpu_seconds() >= 0
    helper = tree[1]
    stop(running, timeout=10)
    assert running.process.returncode == -signal.SIGTERM
    assert not helper.is_running() or helper.status() == psutil.STATUS_ZOMBIE
    assert not (ctx.workdir / "scratch").exists()


def fake_spec(name: str) -> ServerSpec:
    def launch(ctx: Context) -> Launch:
        return Launch([sys.executable, "-c", FAKE_SERVER, str(ctx.port)], dict(os.environ), ctx.workdir)

    return ServerSpec(name, name, [], [], {}, OursAdapter, launch, ready_timeout=20)


def stopped(procs: list[psutil.Process], expected: bool) -> list[bool]:
    """Whether each process is stopped, once the signals sent have had up to 5 s to make them all ``expected``. It
    returned as soon as the states agreed, and before a SIGSTOP had arrived they agreed on running (CI, loaded)."""
    deadline = time.monotonic() + 5
    while True:
        states = [proc.status() == psutil.STATUS_STOPPED for proc in procs]
        if states == [expected] * len(procs) or time.monotonic() > deadline:
            return states
        time.sleep(0.05)


@pytest.mark.parametrize("pause_others", [True, False])
def test_a_server_is_measured_alone_the_others_stopped_meanwhile(tmp_path, pause_others):
    """Idle servers took CPU from the one measured (Ray's daemons: 17 % of a CPU); each whole process tree but the
    measured server's is stopped inside ``alone`` and continued after it, also when the block fails."""
    config = RunConfig(checkpoint=tmp_path, artifact=tmp_path, data=tmp_path / "d.tsv", out=tmp_path / "out",
                       servers=["a", "b"], concurrency=[1], pause_others=pause_others)
    run = SideBySide(config, log=lambda _: None)
    try:
        for name in ("a", "b"):
            run.running[name] = start(fake_spec(name), fresh_contexts(tmp_path / name)(), log=lambda _: None)
        trees = {name: running.tree() for name, running in run.running.items()}
        assert all(len(tree) == 2 for tree in trees.values())  # the server and its helper process
        with pytest.raises(RuntimeError, match="the phase failed"), run.alone("a"):
            assert stopped(trees["a"], False) == [False, False]
            assert stopped(trees["b"], pause_others) == [pause_others, pause_others]
            raise RuntimeError("the phase failed")
        assert stopped(trees["a"], False) + stopped(trees["b"], False) == [False] * 4
    finally:
        for running in run.running.values():
            stop(running, timeout=10)


def test_a_server_left_stopped_is_still_ended_by_its_sigterm(tmp_path):
    """An interrupt between ``pause`` and ``resume`` leaves a server stopped; ``stop`` continues it, so it ends on
    SIGTERM (a stopped process holds the signal: SIGKILL only, after the whole timeout)."""
    running = start(fake_spec("a"), fresh_contexts(tmp_path / "a")(), log=lambda _: None)
    tree = running.tree()
    try:
        pause(running, [])
        assert stopped(tree, True) == [True, True]
    finally:
        stop(running, timeout=10)
    assert running.process.returncode == -signal.SIGTERM
    assert not any(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE for proc in tree)


def test_start_reports_a_server_that_exits(tmp_path):
    def launch(ctx: Context) -> Launch:
        return Launch([sys.executable, "-c", "import sys; print('missing model file'); sys.exit(3)"],
                      dict(os.environ), ctx.workdir)

    spec = ServerSpec("broken", "broken", [], [], {}, OursAdapter, launch, ready_timeout=20)
    ctx = Context(python=Path(sys.executable), checkpoint=tmp_path, artifact=None, max_length=8, port=free_port(),
                  spare_ports=[], workdir=tmp_path / "broken", settings={})
    with pytest.raises(RuntimeError, match="exited with 3(.|\n)*missing model file"):
        start(spec, ctx, log=lambda _: None)


# -- start retries: a peer that fails its first start is started again with fresh ports -------------------------

def flaky_launch(failures: int):
    """A launch that fails its first ``failures`` starts as PyTriton's handshake race did, then serves; records
    the port of every attempt."""
    ports: list[int] = []

    def launch(ctx: Context) -> Launch:
        ports.append(ctx.port)
        if len(ports) <= failures:
            crash = f"print('ConnectionRefusedError: attempt {len(ports)} on port {ctx.port}'); raise SystemExit(1)"
            return Launch([sys.executable, "-c", crash], dict(os.environ), ctx.workdir)
        return Launch([sys.executable, "-c", FAKE_SERVER, str(ctx.port)], dict(os.environ), ctx.workdir)

    return launch, ports


def fresh_contexts(workdir: Path):
    return lambda: Context(python=Path(sys.executable), checkpoint=workdir, artifact=None, max_length=8,
                           port=free_port(), spare_ports=[], workdir=workdir, settings={"threads": 1})


def test_a_failed_start_is_retried_with_fresh_ports_and_its_log_kept(tmp_path):
    launch, ports = flaky_launch(failures=1)
    spec = ServerSpec("flaky", "flaky", [], [], {"threads": 1}, OursAdapter, launch, ready_timeout=20)
    lines: list[str] = []
    (tmp_path / "flaky").mkdir()
    stale = tmp_path / "flaky" / "server.failed-attempt-2.log"  # an earlier run's, in the same --out
    stale.write_text("an earlier run")
    running, failed = start_with_retries(spec, fresh_contexts(tmp_path / "flaky"), attempts=3, log=lines.append)
    try:
        assert len(ports) == 2 and ports[0] != ports[1]
        assert running.url.endswith(f":{ports[1]}") and running.process.poll() is None
        assert [f.attempt for f in failed] == [1]
        assert failed[0].log == tmp_path / "flaky" / "server.failed-attempt-1.log"
        assert f"ConnectionRefusedError: attempt 1 on port {ports[0]}" in failed[0].log.read_text()
        assert "exited with 1" in failed[0].error
        assert "ConnectionRefusedError" not in running.log_path.read_text()  # the good attempt has its own log
        assert any(str(failed[0].log) in line and "retrying with fresh ports" in line for line in lines)
        assert not stale.exists()
    finally:
        stop(running, timeout=10)


def test_a_start_that_keeps_failing_gives_up_after_the_attempts_with_every_log(tmp_path):
    launch, ports = flaky_launch(failures=5)
    spec = ServerSpec("broken", "broken", [], [], {}, OursAdapter, launch, ready_timeout=20)
    with pytest.raises(StartFailed) as caught:
        start_with_retries(spec, fresh_contexts(tmp_path / "broken"), attempts=2, log=lambda _: None)
    assert len(ports) == 2  # bounded: no third try
    failures = caught.value.failures
    assert [f.attempt for f in failures] == [1, 2]
    for failure, port in zip(failures, ports, strict=True):
        assert f"attempt {failure.attempt} on port {port}" in failure.log.read_text()
        assert str(failure.log) in str(caught.value)


def test_the_run_records_failed_starts_and_starts_the_peer(tmp_path, monkeypatch):
    """Through the side-by-side itself: the peer's report says which attempt started it and where the
    failed one's log is; a peer that never starts is 'start failed' with all its logs."""
    flaky, _ = flaky_launch(failures=1)
    broken, _ = flaky_launch(failures=9)
    monkeypatch.setitem(SERVERS, "flaky", ServerSpec("flaky", "flaky", [], [], {}, OursAdapter, flaky,
                                                     ready_timeout=20))
    monkeypatch.setitem(SERVERS, "broken", ServerSpec("broken", "broken", [], [], {}, OursAdapter, broken,
                                                      ready_timeout=20))
    config = RunConfig(checkpoint=tmp_path, artifact=tmp_path, data=tmp_path / "d.tsv", out=tmp_path / "out",
                       servers=["flaky", "broken"], concurrency=[1], start_attempts=2)
    run = SideBySide(config, log=lambda _: None)
    try:
        for name in ("flaky", "broken"):
            run.servers[name] = {"title": name, "settings": {}, "status": "pending"}
            run.start_one(name, Path(sys.executable), tmp_path, 8)
        flaky_info, broken_info = run.servers["flaky"], run.servers["broken"]
        assert flaky_info["status"] == "started" and list(run.running) == ["flaky"]
        assert [f["attempt"] for f in flaky_info["failed_starts"]] == [1]
        assert Path(flaky_info["failed_starts"][0]["log"]).exists()
        assert flaky_info["log"].endswith("server.log")
        assert broken_info["status"] == "start failed" and len(broken_info["failed_starts"]) == 2
        text = markdown(report_for(sweep()) | {"servers": {**report_for(sweep())["servers"], "flaky": flaky_info,
                                                           "broken": broken_info}})
        assert f"- flaky: started on attempt 2; failed attempt 1: {flaky_info['failed_starts'][0]['log']} (" in text
        assert "broken: start failed" in text and broken_info["failed_starts"][1]["log"] in text
    finally:
        for running in run.running.values():
            stop(running, timeout=10)
