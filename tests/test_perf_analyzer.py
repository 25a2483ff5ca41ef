"""The side-by-side's perf_analyzer step: its input data, command line, CSV, sweep order, report and CLI.

The real perf_analyzer is installed by the side-by-side itself (outside the project, see
``scripts/benchlib/peers/perf_analyzer.py``); here a stand-in executable takes its arguments and writes
the CSV perf_analyzer writes, so the plumbing around it is tested without installing it.
"""

from __future__ import annotations

import contextlib
import json
import stat
import sys
from pathlib import Path

import pytest

from scripts import side_by_side
from scripts.benchlib.peers import perf_analyzer
from scripts.benchlib.peers.compare import compare
from scripts.benchlib.peers.output import markdown, perf_analyzer_lines
from scripts.benchlib.peers.perf_analyzer import Target, Tool

# As perf_analyzer 2.51 wrote it against this server's OIP v2 HTTP endpoint (tiny model).
CSV = """Concurrency,Inferences/Second,Client Send,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
1,185.833,142,0,4280,8165,9151,12093
2,403.884,47,0,4735,5584,7269,10584
"""
STAND_IN = """#!{python}
import sys
args = sys.argv[1:]
with open({log!r}, "a") as log:
    log.write(" ".join(args) + "\\n")
if "fail" in args[args.index("-m") + 1]:
    print("error: failed to get model metadata: no model named 'fail'")
    sys.exit(1)
concurrency = args[args.index("--concurrency-range") + 1].split(":")[0]
with open(args[args.index("-f") + 1], "w") as out:
    out.write({header!r} + "\\n")
    out.write(f"{{concurrency}},{{100 * int(concurrency)}}.5,1,0,2000,3000,3500,9000\\n")
"""


@pytest.fixture
def tool(tmp_path) -> Tool:
    binary = tmp_path / "perf_analyzer"
    binary.write_text(STAND_IN.format(python=sys.executable, log=str(tmp_path / "calls.log"),
                                      header=CSV.splitlines()[0]))
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return Tool(binary, {}, "Perf Analyzer Version stand-in")


def test_parse_csv_reads_throughput_and_percentiles_in_ms():
    rows = perf_analyzer.parse_csv(CSV)
    assert rows[1] == {"concurrency": 2, "throughput_rps": 403.884, "p50_ms": 4.735, "p90_ms": 5.584,
                       "p95_ms": 7.269, "p99_ms": 10.584}


def test_input_data_is_one_text_per_step_of_shape_one(tmp_path):
    texts = [f"text {i}" for i in range(perf_analyzer.MAX_TEXTS + 5)]
    data = json.loads(perf_analyzer.write_input_data(texts, tmp_path / "d" / "in.json").read_text())["data"]
    assert len(data) == perf_analyzer.MAX_TEXTS
    assert data[3] == {"text": {"content": ["text 3"], "shape": [1]}}


def test_command_measures_one_level_for_the_duration(tool, tmp_path):
    argv = perf_analyzer.command(tool, Target("ours", "grpc", "127.0.0.1:9", "sentiment"), 16, 2.5,
                                 tmp_path / "in.json", tmp_path / "out.csv")
    joined = " ".join(argv)
    for part in ("-m sentiment", "-u 127.0.0.1:9", "-i grpc", "--concurrency-range 16:16",
                 "--measurement-interval 2500", "-b 1", f"-f {tmp_path / 'out.csv'}"):
        assert part in joined


def test_measure_reads_the_csv_and_reports_a_failure_with_the_tools_words(tool, tmp_path):
    ok = perf_analyzer.measure(tool, Target("ours", "http", "h:1", "sentiment"), 4, 1.0, tmp_path / "in.json",
                               tmp_path, cpu_seconds=lambda: 1.0)
    assert ok["error"] is None and ok["throughput_rps"] == 400.5 and ok["p99_ms"] == 9.0
    assert ok["server_cpu_percent"] == 0.0
    failed = perf_analyzer.measure(tool, Target("triton", "http", "h:2", "fail"), 4, 1.0, tmp_path / "in.json",
                                   tmp_path)
    assert failed["error"].startswith("exit 1:") and "no model named 'fail'" in failed["error"]
    assert "failed" in perf_analyzer.line(failed) and "400.5 infer/s" in perf_analyzer.line(ok)


def test_sweep_rotates_the_targets_and_settles_after_each(tool, tmp_path):
    targets = [Target("ours", "http", "a:1", "sentiment"), Target("triton", "grpc", "b:2", "sentiment")]
    events = []

    @contextlib.contextmanager
    def alone(server):
        events.append(f"alone {server}")
        yield
        events.append("others back")

    results = list(perf_analyzer.sweep(tool, targets, [1, 8], 1.0, tmp_path / "in.json", tmp_path / "w",
                                       cpu_seconds=lambda name: 0.0, between=lambda name: events.append(f"settled "
                                       f"{name}"), alone=alone, log=lambda _: None))
    assert [(r["server"], r["concurrency"]) for r in results] == [("ours", 1), ("triton", 1), ("triton", 8),
                                                                    ("ours", 8)]
    assert events == [event for server in ("ours", "triton", "triton", "ours")
                      for event in (f"alone {server}", f"settled {server}", "others back")]
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert "-i grpc" in calls[1] and "-u b:2" in calls[1] and "--concurrency-range 8:8" in calls[2]


def test_report_section_has_a_row_per_server_and_protocol():
    section = {"tool": "Perf Analyzer Version 2.51.0", "results": [
        {"server": "ours", "protocol": "http", "concurrency": 1, "error": None, "throughput_rps": 180.0,
         "p50_ms": 4.3, "p99_ms": 12.1},
        {"server": "ours", "protocol": "grpc", "concurrency": 1, "error": "exit 1: boom"}]}
    text = "\n".join(perf_analyzer_lines(section))
    assert "| ours | http | 180.0 · 4.3/12.1 |" in text and "| ours | grpc | failed |" in text
    assert "ours grpc c=1 failed: exit 1: boom" in text
    assert perf_analyzer_lines({"error": "no libb64"})[-1] == "Not run: no libb64"
    assert perf_analyzer_lines({}) == []


def test_markdown_includes_the_perf_analyzer_section():
    report = {"started": "t", "environment": {"cpu": "cpu", "usable_cpus": 2},
              "config": {"data": "d", "checkpoint": "c", "max_length": 8}, "servers": {}, "phases": [],
              "comparison": compare([], []),
              "perf_analyzer": {"tool": "PA", "results": [{"server": "triton", "protocol": "http", "concurrency": 8,
                                                           "error": None, "throughput_rps": 1.0, "p50_ms": 2.0,
                                                           "p99_ms": 3.0}]}}
    assert "| triton | http | 1.0 · 2.0/3.0 |" in markdown(report)


@pytest.mark.parametrize("value, expected", [("none", []), ("grpc", ["grpc"]), ("http,grpc", ["http", "grpc"])])
def test_cli_chooses_the_protocols(value, expected):
    assert side_by_side.parse_args(["--perf-analyzer", value]).perf_analyzer == expected
    assert side_by_side.config_from(side_by_side.parse_args(["--perf-analyzer", value])).perf_analyzer == expected


def test_cli_refuses_an_unknown_protocol():
    with pytest.raises(SystemExit):
        side_by_side.parse_args(["--perf-analyzer", "rest"])


def test_install_without_installing_says_what_is_missing(tmp_path):
    with pytest.raises(perf_analyzer.InstallError, match="no perf_analyzer at .*run without --no-install"):
        perf_analyzer.install(Path(tmp_path / "none"), install=False)
