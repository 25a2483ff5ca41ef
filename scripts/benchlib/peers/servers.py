"""The servers of the side-by-side: what each installs, how it starts, its settings, and its lifecycle.

Every server runs the same checkpoint (ours: the ONNX artifact built from it) on the same CPU with
the same batching knobs where it has them (``max_batch_size``, ``max_wait_ms``, worker/instance count,
intra-op ``threads``). Defaults are each one's best settings found on 2 cores (short runs of the
fine-tuned model at concurrency 16, 2026-11-27; saturation req/s in brackets):
- PyTorch peers run the checkpoint with dynamic int8 quantization of the Linear layers (``int8``,
  ``torch.ao.quantization.quantize_dynamic``; Infinity's own ``--dtype int8`` does the same), as ours
  runs its int8 ONNX variant: Triton 1x2 threads fp32 [107] -> int8 [152], at ~1-2 points of accuracy
  (each server's accuracy is in the report); ``--set <peer>.int8=false`` serves fp32;
- two single-threaded model workers where the server has them (Triton instances, TorchServe workers,
  Ray replicas) rather than one with 2 threads: Triton [152 -> 203], TorchServe [145 -> 259], Ray
  [78 -> 96]; Infinity runs one engine and keeps 2 threads [1 thread: 115, 2: 122];
- batches of up to 32 and a 2 ms batch wait (Infinity has no wait knob: its batcher polls every 5 ms);
- per-request access logs off, as ours has none (TorchServe: a WARN-only log4j2 config and no
  system-metrics collector; Ray Serve: no access log; Infinity: log level warning);
- our prediction cache and store off (peers have neither); ours otherwise on its own defaults
  (``engine_workers``/``threads`` 0 = auto: two single-threaded engine workers on 2 cores).
``--set name.key=value`` overrides any of them.

Every process is started in its own session (process group) so that its helpers (tritonserver,
TorchServe's JVM and Python workers, Ray's daemons) stop with it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from scripts.benchlib.peers.adapters import (
    Adapter,
    InfinityAdapter,
    OursAdapter,
    RayAdapter,
    TorchServeAdapter,
    TritonAdapter,
)
from scripts.benchlib.peers.venvs import libdir
from scripts.benchlib.workload import Draw

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
TORCH_PIN = "torch==2.13.0"
TRANSFORMERS_PIN = "transformers==4.57.6"
PROBE_TEXT = "a charming and often affecting journey"


@dataclass
class Context:
    """What a server needs to start: its python, the model, a port (and spare ports), a work directory."""

    python: Path
    checkpoint: Path  # the HF checkpoint as the peers load it (tokenizer capped at max_length)
    artifact: Path | None
    max_length: int
    port: int
    spare_ports: list[int]
    workdir: Path
    settings: dict


@dataclass
class Launch:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    cleanup: list[Path] = field(default_factory=list)  # removed after the server stops


@dataclass
class ServerSpec:
    name: str
    title: str
    requirements: list[str]  # empty: runs in the project's own environment
    packages: list[str]  # whose versions the report records
    settings: dict
    adapter: Callable[[], Adapter]
    launch: Callable[[Context], Launch]
    spare_ports: int = 0
    ready_timeout: float = 300.0
    info_path: str | None = None  # GET it once started: what the server says about itself (version, model)
    oip_model: str | None = None  # speaks Open Inference Protocol v2 as this model: HTTP on port, gRPC on spare 0


def _base_env(ctx: Context, venv_bin: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    if venv_bin is not None:
        env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(venv_bin.parent)
    threads = str(ctx.settings.get("threads", 2))
    env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    return env


def _ours(ctx: Context) -> Launch:
    s = ctx.settings
    env = {k: v for k, v in _base_env(ctx, None).items() if not k.startswith(("MODEL_", "DEVICE", "PORT", "HOST"))}
    env.update({
        "HOST": "127.0.0.1", "PORT": str(ctx.port), "DEVICE": "cpu", "MODEL_PATH": str(ctx.artifact),
        "MODEL_VARIANT": str(s["variant"]), "INTRA_OP_THREADS": str(s["threads"]),
        "ENGINE_WORKERS": str(s["engine_workers"]),
        "MAX_BATCH_SIZE": str(s["max_batch_size"]), "MAX_WAIT_MS": str(s["max_wait_ms"]),
        "ENABLE_MODEL_CACHING": "true" if s["cache"] else "false",
        "STORE_PREDICTIONS": "true" if s["store"] else "false",
        "DATABASE_URL": f"sqlite:///{ctx.workdir}/predictions.db", "SPOOL_DIR": str(ctx.workdir / "spool"),
        "LOG_FORMAT": "text", "LOG_LEVEL": str(s["log_level"]), "GRPC_PORT": str(ctx.spare_ports[0]),
    })
    return Launch([sys.executable, "-m", "server.cli", "serve"], env, ROOT)


def _triton(ctx: Context) -> Launch:
    s = ctx.settings
    env = _base_env(ctx, ctx.python.parent)
    # PyTriton's Python backend stub must load the libpython of the interpreter running it.
    lib = libdir(ctx.python)
    env["LD_LIBRARY_PATH"] = f"{lib}{os.pathsep}{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else lib
    grpc, metrics = ctx.spare_ports
    workspace = ctx.workdir / "pytriton"  # PyTriton creates it and refuses one that exists (a killed run's)
    shutil.rmtree(workspace, ignore_errors=True)
    argv = [str(ctx.python), str(HERE / "serve_triton.py"), "--model", str(ctx.checkpoint), "--port", str(ctx.port),
            "--grpc-port", str(grpc), "--metrics-port", str(metrics),
            "--max-batch-size", str(s["max_batch_size"]), "--max-wait-ms", str(s["max_wait_ms"]),
            "--threads", str(s["threads"]), "--instances", str(s["instances"]), "--max-length", str(ctx.max_length),
            "--workspace", str(workspace)] + (["--int8"] if s["int8"] else [])
    return Launch(argv, env, ctx.workdir, cleanup=[workspace])


def _infinity(ctx: Context) -> Launch:
    s = ctx.settings
    argv = [str(ctx.python.parent / "infinity_emb"), "v2", "--model-id", str(ctx.checkpoint),
            "--served-model-name", "sentiment", "--engine", "torch", "--device", "cpu",
            "--batch-size", str(s["max_batch_size"]), "--host", "127.0.0.1", "--port", str(ctx.port),
            "--no-model-warmup", "--log-level", "info" if s["access_log"] else "warning",
            "--dtype", "int8" if s["int8"] else "float32"]
    if not s["compile"]:
        argv.append("--no-compile")
    if not s["bettertransformer"]:
        argv.append("--no-bettertransformer")
    env = _base_env(ctx, ctx.python.parent)
    env["INFINITY_ANONYMOUS_USAGE_STATS"] = "0"
    env["DO_NOT_TRACK"] = "1"
    return Launch(argv, env, ctx.workdir)


def _torchserve(ctx: Context) -> Launch:
    s = ctx.settings
    venv_bin = ctx.python.parent
    build, store = ctx.workdir / "mar", ctx.workdir / "model-store"
    for d in (build, store):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    (build / "settings.json").write_text(json.dumps(
        {"checkpoint": str(ctx.checkpoint), "threads": s["threads"], "max_length": ctx.max_length,
         "int8": bool(s["int8"])}))
    subprocess.run([str(venv_bin / "torch-model-archiver"), "--model-name", "sentiment", "--version", "1.0",
                    "--handler", str(HERE / "torchserve_handler.py"), "--extra-files", str(build / "settings.json"),
                    "--export-path", str(store)], check=True, capture_output=True, timeout=300)
    management, metrics = ctx.spare_ports
    model = {"sentiment": {"1.0": {
        "defaultVersion": True, "marName": "sentiment.mar", "minWorkers": s["workers"], "maxWorkers": s["workers"],
        "batchSize": s["max_batch_size"], "maxBatchDelay": int(round(s["max_wait_ms"])), "responseTimeout": 120,
    }}}
    properties = {
        "inference_address": f"http://127.0.0.1:{ctx.port}",
        "management_address": f"http://127.0.0.1:{management}",
        "metrics_address": f"http://127.0.0.1:{metrics}",
        "model_store": str(store), "load_models": "sentiment.mar", "models": json.dumps(model),
        "default_workers_per_model": str(s["workers"]), "job_queue_size": str(s["job_queue_size"]),
        "number_of_netty_threads": str(s["netty_threads"]), "netty_client_threads": str(s["netty_threads"]),
        "disable_token_authorization": "true", "enable_envvars_config": "false",
        "install_py_dep_per_model": "false", "vmargs": "-Xmx2g -XX:+UseContainerSupport",
        "disable_system_metrics": "false" if s["access_log"] else "true",
    }
    config = ctx.workdir / "config.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in properties.items()))
    argv = [str(venv_bin / "torchserve"), "--start", "--foreground", "--ncs", "--disable-token-auth",
            "--model-store", str(store), "--ts-config", str(config)]
    if not s["access_log"]:  # TorchServe's default logs every request and every batch (DEBUG); keep warnings only
        quiet = ctx.workdir / "log4j2.xml"
        quiet.write_text(QUIET_LOG4J2)
        argv += ["--log-config", str(quiet)]
    env = _base_env(ctx, venv_bin)
    env["LOG_LOCATION"] = str(ctx.workdir / "logs")
    env["METRICS_LOCATION"] = str(ctx.workdir / "logs")
    return Launch(argv, env, ctx.workdir)


QUIET_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT"><PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/></Console>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="off"/>
    <Logger name="TS_METRICS" level="off"/>
    <Logger name="MODEL_METRICS" level="off"/>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Root level="warn"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""


def _ray(ctx: Context) -> Launch:
    s = ctx.settings
    argv = [str(ctx.python), str(HERE / "serve_ray.py"), "--model", str(ctx.checkpoint), "--port", str(ctx.port),
            "--max-batch-size", str(s["max_batch_size"]), "--max-wait-ms", str(s["max_wait_ms"]),
            "--threads", str(s["threads"]), "--replicas", str(s["replicas"]),
            "--max-ongoing-requests", str(s["max_ongoing_requests"]), "--max-length", str(ctx.max_length)]
    if s["access_log"]:
        argv.append("--access-log")
    if s["int8"]:
        argv.append("--int8")
    env = _base_env(ctx, ctx.python.parent)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_AUTH_MODE"] = "disabled"  # Ray 2.5x+ turns token auth on by default; a loopback benchmark needs none
    # Ray's session directory holds AF_UNIX sockets, whose paths must stay under 108 bytes: a short one in /tmp.
    tmp = Path(tempfile.mkdtemp(prefix="sbs-ray-"))
    env["RAY_TMPDIR"] = str(tmp)
    return Launch(argv, env, ctx.workdir, cleanup=[tmp])


SERVERS: dict[str, ServerSpec] = {spec.name: spec for spec in (
    ServerSpec(
        "ours", "Sentiment Analyzer Pro (ONNX Runtime)", [],
        ["sentiment-analyzer-pro", "onnxruntime", "tokenizers", "fastapi", "uvicorn"],
        {"max_batch_size": 32, "max_wait_ms": 2.0, "workers": 1, "engine_workers": 0, "threads": 0, "variant": "auto",
         "cache": False, "store": False, "log_level": "INFO"},
        OursAdapter, _ours, spare_ports=1, info_path="/health", oip_model="sentiment"),
    ServerSpec(
        "triton", "NVIDIA Triton via PyTriton (PyTorch)", [TORCH_PIN, TRANSFORMERS_PIN, "nvidia-pytriton==0.7.0"],
        ["nvidia-pytriton", "tritonclient", "torch", "transformers"],
        {"max_batch_size": 32, "max_wait_ms": 2.0, "instances": 2, "threads": 1, "int8": True},
        TritonAdapter, _triton, spare_ports=2, info_path="/v2", oip_model="sentiment"),
    ServerSpec(
        "infinity", "Infinity (PyTorch engine)",
        [TORCH_PIN, TRANSFORMERS_PIN, "infinity-emb[server,torch]==0.0.78"],
        ["infinity-emb", "torch", "transformers", "uvicorn"],
        {"max_batch_size": 32, "max_wait_ms": None, "workers": 1, "threads": 2, "int8": True, "compile": False,
         "bettertransformer": False, "access_log": False},
        InfinityAdapter, _infinity, info_path="/models"),
    ServerSpec(
        "torchserve", "TorchServe (PyTorch, custom handler)",
        [TORCH_PIN, TRANSFORMERS_PIN, "torchserve==0.12.0", "torch-model-archiver==0.12.0"],
        ["torchserve", "torch-model-archiver", "torch", "transformers"],
        {"max_batch_size": 32, "max_wait_ms": 2.0, "workers": 2, "threads": 1, "int8": True, "netty_threads": 2,
         "job_queue_size": 2048, "access_log": False},
        TorchServeAdapter, _torchserve, spare_ports=2),
    ServerSpec(
        "ray", "Ray Serve (PyTorch, @serve.batch)", [TORCH_PIN, TRANSFORMERS_PIN, "ray[serve]==2.60.0"],
        ["ray", "torch", "transformers", "fastapi", "uvicorn"],
        {"max_batch_size": 32, "max_wait_ms": 2.0, "replicas": 2, "threads": 1, "int8": True,
         "max_ongoing_requests": 256, "access_log": False},
        RayAdapter, _ray, info_path="/-/routes"),
)}


@dataclass
class Running:
    name: str
    url: str
    process: subprocess.Popen
    adapter: Adapter
    log_path: Path
    cleanup: list[Path] = field(default_factory=list)
    grpc_url: str | None = None  # host:port of its OIP v2 gRPC endpoint, if it has one
    procs: dict[int, psutil.Process] = field(default_factory=dict)  # every process seen in the tree

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def tree(self) -> list[psutil.Process]:
        """The server's process and all its descendants now (remembered, so stop can find strays)."""
        try:
            root = psutil.Process(self.process.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for proc in procs:
            self.procs.setdefault(proc.pid, proc)
        return procs

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the process tree so far (exited helpers drop out)."""
        total = 0.0
        for proc in self.tree():
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                continue
        return total


def start(spec: ServerSpec, ctx: Context, log=print) -> Running:
    """Launch the server and wait until it answers a real prediction; raises RuntimeError with its log's tail."""
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    launch = spec.launch(ctx)
    log_path = ctx.workdir / "server.log"
    with log_path.open("w") as out:
        out.write(f"$ {' '.join(launch.argv)}\n")
        out.flush()
        process = subprocess.Popen(launch.argv, env=launch.env, cwd=launch.cwd, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    running = Running(spec.name, f"http://127.0.0.1:{ctx.port}", process, spec.adapter(), log_path, launch.cleanup,
                      grpc_url=f"127.0.0.1:{ctx.spare_ports[0]}" if spec.oip_model else None)
    try:
        wait_ready(running, spec.ready_timeout)
    except BaseException:
        stop(running)
        raise
    running.tree()
    log(f"{spec.name}: ready at {running.url} (pid {process.pid})")
    return running


START_ATTEMPTS = 3
FAILED_LOG = "server.failed-attempt-{}.log"  # beside server.log, one per failed attempt


@dataclass(frozen=True)
class FailedStart:
    """One start attempt that did not come up: its error and where its log was kept."""

    attempt: int
    error: str
    log: Path


class StartFailed(RuntimeError):
    """Every start attempt of a server failed; ``failures`` holds each one's error and kept log."""

    def __init__(self, name: str, failures: list[FailedStart]) -> None:
        self.failures = failures
        logs = ", ".join(str(f.log) for f in failures)
        super().__init__(f"{name} failed to start {len(failures)} time(s) (logs: {logs}); "
                         f"the last attempt: {failures[-1].error if failures else '-'}")


def kept_log(workdir: Path, attempt: int) -> Path:
    """Where a failed attempt's ``server.log`` is kept, so the next attempt does not overwrite it."""
    return workdir / FAILED_LOG.format(attempt)


def start_with_retries(spec: ServerSpec, make_context: Callable[[], Context], attempts: int = START_ATTEMPTS,
                       log=print) -> tuple[Running, list[FailedStart]]:
    """``start`` up to ``attempts`` times, each with a fresh context (fresh ports), keeping each failed log.

    Why: a peer can fail to start for reasons of its own that the next try does not meet (PyTriton 0.7.0
    failed 1 run in 5 when its two model instances raced for the handshake socket). Returns the running
    server and the failed attempts before it; raises ``StartFailed`` when none came up. Interrupts
    (SIGTERM, Ctrl-C) are not retried.
    """
    failures: list[FailedStart] = []
    for attempt in range(1, attempts + 1):
        ctx = make_context()
        server_log = ctx.workdir / "server.log"
        stale = [server_log, *ctx.workdir.glob(FAILED_LOG.format("*"))] if attempt == 1 else [server_log]
        for path in stale:  # a previous run's logs in the same --out: not this run's to keep or report
            path.unlink(missing_ok=True)
        try:
            return start(spec, ctx, log), failures
        except Exception as exc:  # noqa: BLE001 - whatever it was, a fresh start may not meet it
            kept = kept_log(ctx.workdir, attempt)
            if server_log.exists():
                server_log.replace(kept)
            else:  # it failed before launching (e.g. TorchServe's archiver): the error is all there is
                kept.parent.mkdir(parents=True, exist_ok=True)
                kept.write_text(f"{type(exc).__name__}: {exc}\n")
            failures.append(FailedStart(attempt, str(exc)[-2000:], kept))
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            more = "retrying with fresh ports" if attempt < attempts else "giving up"
            log(f"{spec.name}: start attempt {attempt} of {attempts} failed ({last[-300:]}); log kept at {kept}; "
                f"{more}")
    raise StartFailed(spec.name, failures)


def server_info(running: Running, path: str | None) -> object:
    """The JSON the server answers on ``path`` (its own account of version and model); None if it does not."""
    if not path:
        return None
    try:
        response = httpx.get(running.url + path, timeout=10.0)
        return response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def reported_versions(name: str, info: object) -> dict[str, str]:
    """Versions a server reports itself, beyond its Python packages: Triton's server build, TorchServe's JVM."""
    versions: dict[str, str] = {}
    if name == "triton" and isinstance(info, dict) and info.get("version"):
        versions["tritonserver"] = str(info["version"])
    if name == "torchserve" and shutil.which("java"):
        try:
            out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
            first = (out.stderr or out.stdout).splitlines()
            if first:
                versions["java"] = first[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return versions


def git_revision() -> str | None:
    """This checkout's commit (with ``+dirty`` for local changes): the version of ``ours``."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def probe(running: Running, client: httpx.Client) -> list[str]:
    """One real prediction through the adapter: the labels it parsed."""
    adapter = running.adapter
    body = adapter.encode(Draw([PROBE_TEXT], [1], 0))
    response = client.post(running.url + adapter.path, content=body, headers={"Content-Type": adapter.content_type})
    response.raise_for_status()
    return adapter.labels(response.content)


def wait_ready(running: Running, timeout: float) -> None:
    deadline, last = time.monotonic() + timeout, "no answer yet"
    with httpx.Client(timeout=10.0) as client:
        while time.monotonic() < deadline:
            if running.process.poll() is not None:
                raise RuntimeError(f"{running.name} exited with {running.process.returncode}:\n{running.log_tail()}")
            try:
                health = client.get(running.url + running.adapter.health_path)
                if health.status_code == 200:
                    probe(running, client)
                    return
                last = f"{running.adapter.health_path} answered {health.status_code}"
            except (httpx.HTTPError, ValueError, KeyError, TypeError, IndexError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.5)
    raise RuntimeError(f"{running.name} not ready within {timeout:.0f} s ({last}):\n{running.log_tail()}")


def stop(running: Running, timeout: float = 30.0) -> int | None:
    """SIGTERM the server's process group, SIGKILL it after ``timeout``, then any remembered helper left over."""
    running.tree()
    pgid = running.process.pid  # start_new_session: the group id is the leader's pid
    _signal_group(pgid, signal.SIGTERM)
    _signal_group(pgid, signal.SIGCONT)  # a stopped process (``pause`` cut short by an interrupt) holds SIGTERM
    resume(list(running.procs.values()))  # and the helpers that left the group
    try:
        running.process.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal_group(pgid, signal.SIGKILL)
        running.process.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(running.procs):
        time.sleep(0.2)
    _signal_group(pgid, signal.SIGKILL)
    for proc in _alive(running.procs):  # helpers that left the group (or ignored SIGTERM)
        try:
            proc.kill()  # psutil checks the pid still names the same process
        except psutil.Error:
            pass
    for path in running.cleanup:
        shutil.rmtree(path, ignore_errors=True)
    return running.process.returncode


def pause(running: Running, stopped: list[psutil.Process]) -> None:
    """Stop (SIGSTOP) every process of the server's tree, so that it takes no CPU while another server is measured;
    each is added to ``stopped`` (for ``resume``) before its signal is sent, so an interrupt meanwhile loses none."""
    for proc in running.tree():
        stopped.append(proc)
        try:
            proc.suspend()
        except psutil.Error:  # gone meanwhile: resume skips it too
            continue


def resume(procs: list[psutil.Process]) -> None:
    """Continue (SIGCONT) the processes ``pause`` stopped."""
    for proc in procs:
        try:
            proc.resume()  # psutil checks the pid still names the same process
        except psutil.Error:
            continue


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(procs: dict[int, psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs.values():
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            continue
    return alive
