"""Triton's own load tool, ``perf_analyzer``, against every server of the side-by-side that speaks OIP v2.

Ours (run with GRPC_PORT) and the Triton peer are measured alike, over HTTP and over gRPC: one text per
request from the run's data file (BYTES ``text`` of shape [1]: Triton's model adds its batch dimension,
ours takes the shape as given, so one input-data file serves both), closed loop at each concurrency level,
the targets in turn at each level (the order rotates by one per level, as the load test's phases do). Each
measurement is perf_analyzer's own: windows of a third of ``--duration`` (at least 1 s) until three in a row
agree within ``STABILITY_PERCENT`` (at most ``MAX_TRIALS`` windows), so a steady level takes about
``--duration``; throughput and the client-side p50/p90/p95/p99 come from its CSV.

Which perf_analyzer: the ``perf-analyzer`` wheel on PyPI is built for glibc 2.38 and does not load on older
systems (Debian 12 has 2.36). The one inside the ``tritonclient`` 2.51.0 wheel runs from glibc 2.34 on and is
of the same Triton release as the Triton peer's server (PyTriton 0.7.0 bundles tritonserver 2.51). It loads
two libraries: ``libcudart.so.12`` (PyPI ``nvidia-cuda-runtime-cu12``; no GPU is used) and ``libb64.so.0d``
(Debian ``libb64-0d``: the system's when installed, else unpacked into the venv with ``apt-get download`` and
``dpkg-deb -x``, which change nothing outside it). All of it lives in ``<peers-root>/perf_analyzer``.
"""

from __future__ import annotations

import csv
import ctypes.util
import io
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from scripts.benchlib.peers.venvs import InstallError, ensure_venv

REQUIREMENTS = ["tritonclient==2.51.0", "nvidia-cuda-runtime-cu12>=12.0,<13"]
LIBB64 = "libb64.so.0d"
LIBB64_PACKAGE = "libb64-0d"
PROTOCOLS = ("http", "grpc")
STABILITY_PERCENT = 50  # perf_analyzer's default, 10, is rarely met on a shared 2-core machine
MAX_TRIALS = 10
WINDOWS = 3  # perf_analyzer's stability needs three windows in a row
MAX_TEXTS = 1000  # input-data steps: enough variety, a file perf_analyzer reads in a moment


@dataclass(frozen=True)
class Tool:
    binary: Path
    env: dict[str, str]
    version: str


@dataclass(frozen=True)
class Target:
    """One server over one protocol: what perf_analyzer is pointed at."""

    server: str
    protocol: str
    url: str  # host:port, as perf_analyzer's -u takes it
    model: str


def install(venv: Path, python: str | None = None, reinstall: bool = False, log=print, install: bool = True) -> Tool:
    """perf_analyzer and the libraries it loads, in ``venv`` (created unless ``install`` is false)."""
    if install:
        ensure_venv(venv, REQUIREMENTS, python, reinstall, log)
    binary = venv / "bin" / "perf_analyzer"
    if not binary.exists():
        raise InstallError(f"no perf_analyzer at {binary}" + ("" if install else " (run without --no-install)"))
    libraries = sorted(str(p) for p in venv.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"))
    if ctypes.util.find_library("b64") is None:
        libraries.append(str(_unpacked_libb64(venv / "libb64", log)))
    existing = os.environ.get("LD_LIBRARY_PATH")
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(libraries + ([existing] if existing else []))}
    out = subprocess.run([str(binary), "--version"], env=env, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise InstallError(f"{binary} does not run: {(out.stderr or out.stdout).strip()[-500:]}")
    said = (out.stdout + out.stderr).strip().splitlines()
    return Tool(binary, env, said[0] if said else "perf_analyzer (version not reported)")


def _unpacked_libb64(dest: Path, log) -> Path:
    """The directory holding libb64.so.0d, unpacked from Debian's package into ``dest`` unless already there."""
    found = list(dest.glob(f"usr/lib/*/{LIBB64}"))
    if not found:
        log(f"unpacking Debian's {LIBB64_PACKAGE} into {dest} (perf_analyzer loads {LIBB64})")
        with tempfile.TemporaryDirectory() as tmp:
            try:
                subprocess.run(["apt-get", "download", LIBB64_PACKAGE], cwd=tmp, check=True, capture_output=True,
                               text=True, timeout=300)
                package = next(Path(tmp).glob(f"{LIBB64_PACKAGE}_*.deb"))
                subprocess.run(["dpkg-deb", "-x", str(package), str(dest)], check=True, capture_output=True,
                               text=True, timeout=300)
            except (OSError, StopIteration, subprocess.SubprocessError) as error:
                detail = str(getattr(error, "stderr", None) or error).strip()
                raise InstallError(f"{LIBB64} is neither installed nor could be unpacked ({detail[-300:]}); run "
                                   f"`apt-get update` first, or `apt-get install {LIBB64_PACKAGE}`") from None
        found = list(dest.glob(f"usr/lib/*/{LIBB64}"))
        if not found:
            raise InstallError(f"Debian's {LIBB64_PACKAGE} holds no {LIBB64}")
    return found[0].parent


def write_input_data(texts: list[str], path: Path) -> Path:
    """perf_analyzer's --input-data file: one step per text, ``text`` of shape [1]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = [{"text": {"content": [text], "shape": [1]}} for text in texts[:MAX_TEXTS]]
    path.write_text(json.dumps({"data": steps}))
    return path


def command(tool: Tool, target: Target, concurrency: int, interval_s: float, input_data: Path,
            csv_path: Path) -> list[str]:
    return [str(tool.binary), "-m", target.model, "-u", target.url, "-i", target.protocol,
            "--input-data", str(input_data), "-b", "1", "--concurrency-range", f"{concurrency}:{concurrency}",
            "--measurement-interval", str(int(interval_s * 1000)), "--stability-percentage", str(STABILITY_PERCENT),
            "--max-trials", str(MAX_TRIALS), "-f", str(csv_path)]


def parse_csv(text: str) -> list[dict]:
    """perf_analyzer's ``-f`` CSV: per concurrency, infer/s and client latency percentiles (µs) -> ms."""
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        parsed = {"concurrency": int(row["Concurrency"]), "throughput_rps": float(row["Inferences/Second"])}
        for percentile in ("p50", "p90", "p95", "p99"):
            parsed[f"{percentile}_ms"] = float(row[f"{percentile} latency"]) / 1000
        rows.append(parsed)
    return rows


def measure(tool: Tool, target: Target, concurrency: int, interval_s: float, input_data: Path, workdir: Path,
            cpu_seconds: Callable[[], float] | None = None) -> dict:
    """One level of one target: the CSV's figures, or ``error`` with perf_analyzer's last words."""
    csv_path = workdir / f"{target.server}-{target.protocol}-c{concurrency}.csv"
    argv = command(tool, target, concurrency, interval_s, input_data, csv_path)
    result: dict = {"server": target.server, "protocol": target.protocol, "concurrency": concurrency,
                    "command": " ".join(argv), "error": None}
    cpu0, t0 = (cpu_seconds() if cpu_seconds else 0.0), time.perf_counter()
    try:
        out = subprocess.run(argv, env=tool.env, capture_output=True, text=True,
                             timeout=interval_s * (MAX_TRIALS + 2) + 120)
    except subprocess.TimeoutExpired:
        result["error"] = "perf_analyzer did not finish in time"
        return result
    if cpu_seconds:
        result["server_cpu_percent"] = 100.0 * (cpu_seconds() - cpu0) / (time.perf_counter() - t0)
    rows = parse_csv(csv_path.read_text()) if out.returncode == 0 and csv_path.exists() else []
    if not rows:
        result["error"] = f"exit {out.returncode}: " + " ".join((out.stdout + out.stderr).split())[-600:]
        return result
    result.update({k: v for k, v in rows[0].items() if k != "concurrency"})
    return result


def line(result: dict) -> str:
    head = f"perf_analyzer {result['server']:<8} {result['protocol']:<4} c={result['concurrency']}:"
    if result["error"]:
        return f"{head} failed: {result['error']}"
    return (f"{head} {result['throughput_rps']:.1f} infer/s, ms p50 {result['p50_ms']:.1f} p90 {result['p90_ms']:.1f} "
            f"p99 {result['p99_ms']:.1f}, server CPU {result.get('server_cpu_percent', 0):.0f}%")


def sweep(tool: Tool, targets: list[Target], levels: list[int], duration_s: float, input_data: Path, workdir: Path,
          cpu_seconds: Callable[[str], float], between: Callable[[str], None],
          alone: Callable[[str], AbstractContextManager] = lambda _server: nullcontext(), log=print) -> Iterator[dict]:
    """Every target at every level, the targets in turn per level (rotated by one each level); yields each result
    as it comes, so an interrupted run keeps what it measured. Each measurement and the wait for its server to
    be idle again (``between``) run inside ``alone(server)``."""
    workdir.mkdir(parents=True, exist_ok=True)
    for index, level in enumerate(levels):
        shift = index % len(targets) if targets else 0
        for target in targets[shift:] + targets[:shift]:
            with alone(target.server):
                result = measure(tool, target, level, max(1.0, duration_s / WINDOWS), input_data, workdir,
                                 lambda server=target.server: cpu_seconds(server))
                log(line(result))
                between(target.server)
            yield result
