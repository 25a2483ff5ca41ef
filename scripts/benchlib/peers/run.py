"""The side-by-side run: prepare the model, install and start every server, warm up, measure round-robin, stop.

Order of a run:
  1. the peers' checkpoint: the HF checkpoint directory linked file by file into ``<out>/model``, with its
     tokenizer capped at the artifact's max sequence length (so every server truncates alike) and asked
     for ``input_ids`` and ``attention_mask`` only (DistilBERT takes no token types);
  2. each peer's venv (``<peers-root>/<name>``), created and installed unless already done;
  3. every server started (one at a time, each waiting until a real prediction comes back; a start that
     fails is tried again with fresh ports, up to ``start_attempts`` in all, each failed attempt's log kept
     as ``server.failed-attempt-<n>.log`` beside ``server.log``), then warmed up with a short closed loop at
     the highest concurrency; then the idle CPU of each is recorded;
  4. the generator's ceiling (closed loop on our ``GET /ready``, a trivial endpoint);
  5. closed loop: for each concurrency, every server in turn (the order rotates by one per level), so
     drift of the machine over the run hits all alike; after each phase the run waits until the server
     is idle again (its backlog must not eat into the next server's phase);
  6. open loop (Poisson) at fractions of our saturation throughput (0.5 always), every server in turn;
  7. Triton's perf_analyzer at each concurrency on the servers that speak OIP v2 (ours, Triton), over HTTP
     and gRPC (``perf_analyzer`` module);
  8. stop everything; compare; write JSON, markdown and PNG.
All servers stay up during the whole sweep (each one's idle CPU is in the report), but while one is measured
(its phases, the generator's ceiling, perf_analyzer) the others are stopped (SIGSTOP, their whole process trees)
unless ``--keep-others-running``: idling, Ray's daemons took 17 % of a CPU, and every other server's phases
showed 10-17 % of "other CPU" taken from it (2026-12-07, 2-vCPU VM).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil

from models.data import load_labeled
from scripts.benchlib.envinfo import environment, header
from scripts.benchlib.loadrun import LoadTestConfig, run_loadtest
from scripts.benchlib.peers import perf_analyzer
from scripts.benchlib.peers.compare import HALF, compare, saturation, verdict_lines
from scripts.benchlib.peers.output import settings_cell, write_outputs
from scripts.benchlib.peers.servers import (
    SERVERS,
    START_ATTEMPTS,
    Context,
    FailedStart,
    Running,
    StartFailed,
    git_revision,
    pause,
    reported_versions,
    resume,
    server_info,
    start_with_retries,
    stop,
)
from scripts.benchlib.peers.venvs import InstallError, ensure_venv, installed_versions
from scripts.benchlib.serverproc import ROOT, free_port

TOKENIZER_CONFIG = "tokenizer_config.json"
OTHER_CPU_LIMIT = 25.0  # % of one CPU used by processes other than the measured server and the generator
SEND_LAG_LIMIT_MS = 10.0  # p99 lateness of the generator's sends
OVERLOAD_SHARE = 0.9  # open loop: answering less than this share of the offered rate is overload


@dataclass
class RunConfig:
    checkpoint: Path
    artifact: Path
    data: Path
    out: Path
    servers: list[str]
    concurrency: list[int]
    duration: float = 15.0
    warmup: float = 2.0
    server_warmup: float = 5.0
    open_fractions: list[float] = field(default_factory=lambda: [HALF])
    peers_root: Path = Path("/work/peers")
    python: str | None = None
    reinstall: bool = False
    install: bool = True
    overrides: dict[str, dict] = field(default_factory=dict)
    max_length: int | None = None
    timeout: float = 30.0
    max_connections: int = 512
    seed: int = 0
    settle_cpu_percent: float = 15.0
    settle_timeout: float = 120.0
    perf_analyzer: list[str] = field(default_factory=lambda: list(perf_analyzer.PROTOCOLS))  # [] = not run
    start_attempts: int = START_ATTEMPTS  # per server, each with fresh ports; failed attempts' logs are kept
    pause_others: bool = True  # the servers not measured are stopped meanwhile (module docstring)


def artifact_max_length(artifact: Path) -> int:
    return int(json.loads((artifact / "manifest.json").read_text())["max_sequence_length"])


def artifact_mismatch(artifact: Path, checkpoint: Path, root: Path = ROOT) -> str | None:
    """Why ``artifact`` was not built from ``checkpoint`` (None when it was, or when its manifest cannot say).

    The comparison only means something when ours serves the same weights as the peers. The manifest's
    ``source.checkpoint`` names the directory it was built from (as given: relative to where the build ran,
    normally the repository root); a ``models.finetune`` checkpoint also has ``dev_result.json``, which a
    fine-tune still running rewrites whenever it finds a better step, so it must equal the manifest's
    ``source.selected``.
    """
    manifest = artifact / "manifest.json"
    if not manifest.is_file():
        return f"--artifact {artifact} has no manifest.json (build it with python -m models.build)"
    source = json.loads(manifest.read_text()).get("source")
    built_from = source.get("checkpoint") if isinstance(source, dict) else source
    if not built_from:
        return None
    candidates = [Path(built_from), root / built_from]
    if not any(c.exists() and c.resolve() == checkpoint.resolve() for c in candidates):
        return (f"--artifact {artifact} was built from {built_from}, not from --checkpoint {checkpoint}: build one "
                f"from it (python -m models.build --checkpoint {checkpoint} --out DIR --variants int8)")
    selected, result = (source.get("selected") if isinstance(source, dict) else None), checkpoint / "dev_result.json"
    if selected is not None and result.is_file() and json.loads(result.read_text()) != selected:
        return (f"--checkpoint {checkpoint} changed since --artifact {artifact} was built from it (its "
                f"dev_result.json is {result.read_text().strip()}, the artifact's {json.dumps(selected)}): rebuild "
                "the artifact once the fine-tune has finished")
    return None


def prepare_checkpoint(checkpoint: Path, dest: Path, max_length: int) -> Path:
    """``dest`` links every file of ``checkpoint`` except the tokenizer config, rewritten for ``max_length``."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for item in checkpoint.resolve().iterdir():
        if item.name != TOKENIZER_CONFIG:
            (dest / item.name).symlink_to(item)
    config_path = checkpoint / TOKENIZER_CONFIG
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config["model_max_length"] = max_length
    config["model_input_names"] = ["input_ids", "attention_mask"]
    (dest / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2))
    return dest


def settle(server: Running, threshold: float, timeout: float, window: float = 0.5) -> tuple[float, bool]:
    """Wait until the server's process tree uses under ``threshold`` % of one CPU (its backlog is done).

    Returns (seconds waited, whether it got there within ``timeout``).
    """
    began = time.perf_counter()
    while time.perf_counter() - began < timeout:
        cpu0, t0 = server.cpu_seconds(), time.perf_counter()
        time.sleep(window)
        if 100.0 * (server.cpu_seconds() - cpu0) / (time.perf_counter() - t0) < threshold:
            return time.perf_counter() - began, True
    return time.perf_counter() - began, False


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle, over all cores."""
    times = psutil.cpu_times()  # guest time is already counted in user/nice on Linux
    return sum(getattr(times, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))


def own_cpu_seconds() -> float:
    """This process's CPU seconds (the load generator's)."""
    times = os.times()
    return times.user + times.system


def overloaded(phase: dict) -> bool:
    """An open-loop phase whose server answered clearly less than the offered rate."""
    return phase["mode"] == "open" and (phase.get("goodput_rps") or 0.0) < OVERLOAD_SHARE * phase["level"]


def disturbance(phase: dict) -> str | None:
    """Why a phase's numbers may not be the server's own: other CPU load, or a generator that sent late.

    A late generator is not held against an overloaded phase: there the server itself takes the CPUs
    the generator shares with it (the phase is overloaded either way).
    """
    reasons = []
    if phase.get("other_cpu_percent", 0.0) > OTHER_CPU_LIMIT:
        reasons.append(f"other processes used {phase['other_cpu_percent']:.0f}% of a CPU")
    lag = phase["send_lag"].get("p99_ms")
    if lag is not None and lag > SEND_LAG_LIMIT_MS and not overloaded(phase):
        reasons.append(f"the generator sent late (p99 {lag:.0f} ms)")
    return "; ".join(reasons) or None


def idle_cpu(server: Running, seconds: float) -> float:
    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
    time.sleep(seconds)
    return 100.0 * (server.cpu_seconds() - cpu0) / (time.perf_counter() - t0)


def _failed_starts(failures: list[FailedStart]) -> list[dict]:
    return [{"attempt": f.attempt, "error": f.error, "log": str(f.log)} for f in failures]


def phase_line(phase: dict) -> str:
    lat = phase["latency"]
    ms = f"p50 {lat['p50_ms']:.1f} p90 {lat['p90_ms']:.1f} p99 {lat['p99_ms']:.1f}" if lat["count"] else "-"
    other = {k: v for k, v in phase["by_status"].items() if k != "200"} | phase["errors"]
    acc = f"{phase['accuracy']:.3f}" if phase["accuracy"] is not None else "-"
    note = " [OVERLOADED]" if phase.get("overloaded") else ""
    note += f" [DISTURBED: {phase['disturbed']}]" if phase.get("disturbed") else ""
    return (f"{phase['server']:<10} {phase['mode']} {phase['level']:g}: {phase['goodput_rps'] or 0:.1f} req/s ok, "
            f"ms {ms}, failed {other or 0}, accuracy {acc}, server CPU {phase['server_cpu_percent']:.0f}%, "
            f"client CPU {phase['client_cpu_percent']:.0f}%, other CPU {phase.get('other_cpu_percent', 0):.0f}%{note}")


class SideBySide:
    def __init__(self, config: RunConfig, log=print) -> None:
        self.config, self.log = config, log
        self.running: dict[str, Running] = {}
        self.servers: dict[str, dict] = {}
        self.phases: list[dict] = []
        self.perf_report: dict = {}

    # -- setup -------------------------------------------------------------------------------------------
    def settings_of(self, name: str) -> dict:
        return {**SERVERS[name].settings, **self.config.overrides.get(name, {})}

    def install(self, name: str) -> Path | None:
        spec = SERVERS[name]
        info = self.servers[name]
        if not spec.requirements:  # ours: the project's own environment
            info["python"] = sys.executable
            return Path(sys.executable)
        venv = self.config.peers_root / name
        try:
            if self.config.install:
                python = ensure_venv(venv, spec.requirements, self.config.python, self.config.reinstall, self.log)
            else:
                python = venv / "bin" / "python"
                if not python.exists():
                    raise InstallError(f"no venv at {venv} (run without --no-install)")
        except InstallError as exc:
            info.update(status="install failed", error=str(exc))
            self.log(f"{name}: install failed: {exc}")
            return None
        info.update(python=str(python), venv=str(venv), requirements=spec.requirements)
        return python

    def start_one(self, name: str, python: Path, checkpoint: Path, max_length: int) -> None:
        spec, info = SERVERS[name], self.servers[name]
        workdir = (self.config.out / "servers" / name).resolve()

        def fresh_context() -> Context:  # new ports each attempt: a failed one may still hold its own
            return Context(python=python, checkpoint=checkpoint, artifact=self.config.artifact.resolve(),
                           max_length=max_length, port=free_port(),
                           spare_ports=[free_port() for _ in range(spec.spare_ports)], workdir=workdir,
                           settings=info["settings"])

        began = time.perf_counter()
        try:
            self.running[name], failures = start_with_retries(spec, fresh_context, self.config.start_attempts,
                                                              self.log)
        except StartFailed as exc:  # one server failing must not stop the others
            info.update(status="start failed", error=str(exc)[-2000:], failed_starts=_failed_starts(exc.failures))
            self.log(f"{name}: start failed: {str(exc)[-1500:]}")
            return
        info.update(status="started", start_seconds=time.perf_counter() - began, url=self.running[name].url,
                    log=str(self.running[name].log_path), failed_starts=_failed_starts(failures),
                    server_info=server_info(self.running[name], spec.info_path))
        info.setdefault("versions", {}).update(reported_versions(name, info["server_info"]))

    # -- measuring ---------------------------------------------------------------------------------------
    @contextmanager
    def alone(self, name: str) -> Iterator[None]:
        """While the block runs, every running server but ``name`` is stopped (``pause_others``), so that what
        one measures is that server's, not the others' idling too; they are continued however the block ends."""
        paused: list[psutil.Process] = []
        try:
            if self.config.pause_others:
                for other, server in self.running.items():
                    if other != name:
                        pause(server, paused)
            yield
        finally:
            resume(paused)  # an interrupt that cuts it short: ``stop`` continues every server it ends

    def loadtest(self, name: str, mode: str, level: float, duration: float, warmup: float) -> dict:
        server = self.running[name]
        adapter = server.adapter
        config = LoadTestConfig(
            url=server.url, data=self.config.data, mode=mode, levels=[level], duration=duration, warmup=warmup,
            predict_path=adapter.path, baseline_path=None, max_connections=self.config.max_connections,
            timeout=self.config.timeout, seed=self.config.seed, protocol=adapter)
        with self.alone(name):
            cpu0, own0, busy0, t0 = (server.cpu_seconds(), own_cpu_seconds(), machine_busy_seconds(),
                                     time.perf_counter())
            report = run_loadtest(config, log=lambda _line: None)
            phase = report["phases"][0]
            wall = time.perf_counter() - t0
            server_cpu, own_cpu = server.cpu_seconds() - cpu0, own_cpu_seconds() - own0
            # Everything else the machine ran meanwhile (servers left running, anything not ours): interference.
            busy = machine_busy_seconds() - busy0
            phase["settle_seconds"], phase["settled"] = settle(server, self.config.settle_cpu_percent,
                                                               self.config.settle_timeout)
        phase["server"] = name
        phase["server_cpu_percent"] = 100.0 * server_cpu / wall
        phase["other_cpu_percent"] = max(0.0, 100.0 * (busy - server_cpu - own_cpu) / wall)
        phase["overloaded"] = overloaded(phase)
        phase["disturbed"] = disturbance(phase)
        if not phase["settled"]:
            self.log(f"{name}: still busy {phase['settle_seconds']:.0f} s after the phase (a backlog it keeps "
                     "working on after the clients gave up); the next phase may be disturbed")
        return phase

    def measure(self, name: str, mode: str, level: float) -> None:
        try:
            phase = self.loadtest(name, mode, level, self.config.duration, self.config.warmup)
        except Exception as exc:  # noqa: BLE001
            self.log(f"{name}: {mode} {level:g} failed: {exc}")
            self.servers[name].setdefault("phase_errors", []).append(f"{mode} {level:g}: {exc}")
            return
        self.phases.append(phase)
        self.log(phase_line(phase))

    def round_robin(self, mode: str, levels: list[float]) -> None:
        names = list(self.running)
        for index, level in enumerate(levels):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                self.measure(name, mode, level)

    def generator_ceiling(self) -> dict | None:
        name = "ours" if "ours" in self.running else next(iter(self.running), None)
        if name is None:
            return None
        server = self.running[name]
        config = LoadTestConfig(url=server.url, data=self.config.data, levels=[], protocol=server.adapter,
                                baseline_path=server.adapter.health_path, baseline_duration=3.0)
        with self.alone(name):
            baseline = run_loadtest(config, log=lambda _line: None)["baseline"]
        self.log(f"generator: {baseline['throughput_rps']:.0f} req/s on GET {baseline['path']} of {name} "
                 f"({baseline['client_cpu_ms_per_request']:.2f} ms client CPU per request)")
        return baseline

    # -- the whole run -----------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.config
        started = datetime.now(UTC).isoformat(timespec="seconds")
        env = environment()
        self.log(header(env))
        max_length = cfg.max_length or artifact_max_length(cfg.artifact)
        checkpoint = prepare_checkpoint(cfg.checkpoint, (cfg.out / "model").resolve(), max_length)
        for name in cfg.servers:
            self.servers[name] = {"title": SERVERS[name].title, "settings": self.settings_of(name), "status": "pending"}
        pythons = {name: self.install(name) for name in cfg.servers}
        for name, python in pythons.items():
            if python is not None:
                self.servers[name]["versions"] = installed_versions(python, SERVERS[name].packages)
        if "ours" in self.servers:
            self.servers["ours"]["versions"] = {"git": git_revision(), **self.servers["ours"].get("versions", {})}
        generator, interrupted = None, None
        try:
            for name, python in pythons.items():
                if python is not None:
                    self.start_one(name, python, checkpoint, max_length)
            for name, server in self.running.items():  # a server may go on initialising after its first answer
                waited, quiet = settle(server, cfg.settle_cpu_percent, cfg.settle_timeout)
                self.servers[name]["quiesce_seconds"] = waited
                if not quiet:
                    self.log(f"{name}: still busy {waited:.0f} s after start")
            for name in list(self.running):
                self.log(f"{name}: settings {settings_cell(self.servers[name]['settings'])}; "
                         f"versions {self.servers[name].get('versions')}")
                self.server_warmup(name)
            for name, server in self.running.items():
                self.servers[name]["idle_cpu_percent"] = idle_cpu(server, 2.0)
            generator = self.generator_ceiling()
            self.round_robin("closed", [float(c) for c in cfg.concurrency])
            self.round_robin("open", self.open_rates())
            self.perf_analyzer_phases()
        except BaseException as exc:  # noqa: BLE001 - SIGTERM/Ctrl-C too: stop the servers, write what we have
            interrupted = exc
            self.log(f"interrupted: {type(exc).__name__}: {exc}")
        finally:
            for name, server in list(self.running.items()):
                code = stop(server)
                if self.servers[name]["status"] == "started":
                    self.servers[name]["status"] = "measured" if any(p["server"] == name for p in self.phases) \
                        else "not measured"
                self.servers[name]["exit_code"] = code
        ours = saturation(self.phases, "ours")
        comparison = compare(self.phases, list(cfg.servers), "ours", round(HALF * ours["rps"], 3) if ours else None)
        report = {
            "started": started, "environment": env,
            "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
                       "max_length": max_length},
            "servers": self.servers, "generator": generator, "phases": self.phases, "comparison": comparison,
            "perf_analyzer": self.perf_report,
            "interrupted": None if interrupted is None else f"{type(interrupted).__name__}: {interrupted}",
        }
        disturbed = [p for p in self.phases if p.get("disturbed")]
        if disturbed:
            self.log(f"WARNING: {len(disturbed)} of {len(self.phases)} phases were disturbed (other CPU load or a late "
                     "generator); see the markdown's † notes")
        for line in verdict_lines(comparison):
            self.log(line)
        for path in write_outputs(report, cfg.out):
            self.log(f"wrote {path}")
        if interrupted is not None and not isinstance(interrupted, Exception):
            raise interrupted  # SystemExit / KeyboardInterrupt: exit as asked, after cleaning up
        return report

    def open_rates(self) -> list[float]:
        """Open-loop rates: the configured fractions (0.5 always) of our saturation (else the best server's)."""
        ours = saturation(self.phases, "ours")
        anchor = ours or max(filter(None, (saturation(self.phases, n) for n in self.running)),
                             key=lambda s: s["rps"], default=None)
        if not anchor:
            return []
        return sorted({round(f * anchor["rps"], 3) for f in {*self.config.open_fractions, HALF}})

    def perf_analyzer_phases(self) -> None:
        """perf_analyzer over each protocol asked for, on every running server that speaks OIP v2."""
        cfg = self.config
        targets = [perf_analyzer.Target(name, protocol, running.url.removeprefix("http://") if protocol == "http"
                                        else running.grpc_url, SERVERS[name].oip_model)
                   for name, running in self.running.items() if SERVERS[name].oip_model
                   for protocol in cfg.perf_analyzer]
        if not targets:
            return
        try:
            tool = perf_analyzer.install(cfg.peers_root / "perf_analyzer", cfg.python, cfg.reinstall, self.log,
                                         cfg.install)
        except InstallError as exc:
            self.perf_report = {"error": str(exc)}
            self.log(f"perf_analyzer: install failed: {exc}")
            return
        workdir = (cfg.out / "perf_analyzer").resolve()
        input_data = perf_analyzer.write_input_data(load_labeled(cfg.data).texts, workdir / "input_data.json")
        self.perf_report = {"tool": tool.version, "duration_s": cfg.duration, "results": []}
        for result in perf_analyzer.sweep(
                tool, targets, cfg.concurrency, cfg.duration, input_data, workdir,
                cpu_seconds=lambda name: self.running[name].cpu_seconds(),
                between=lambda name: settle(self.running[name], cfg.settle_cpu_percent, cfg.settle_timeout),
                alone=self.alone, log=self.log):
            self.perf_report["results"].append(result)

    def server_warmup(self, name: str) -> None:
        """A short closed loop at the highest concurrency (every batch size gets exercised), not recorded."""
        if self.config.server_warmup <= 0:
            return
        try:
            phase = self.loadtest(name, "closed", float(max(self.config.concurrency)), self.config.server_warmup, 0.0)
            self.servers[name]["warmup"] = {"requests": phase["requests"], "ok": phase["ok"]}
        except Exception as exc:  # noqa: BLE001
            self.log(f"{name}: warm-up failed: {exc}\n{traceback.format_exc()}")


def run_side_by_side(config: RunConfig, log=print) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return SideBySide(config, log).run()
