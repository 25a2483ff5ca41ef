"""The servers of one scenario run, and what can be observed of them from outside.

A ``Harness`` starts ``sentiment-analyzer serve`` processes (real uvicorn, real
sockets; ``scripts.benchlib.serverproc``) on one SPOOL_DIR and one database,
kills or stops them, and on exit kills every one still running and ends any
outage it left, so a failed scenario leaves nothing behind. Everything it
observes is black-box: /health, the process's peak RSS from /proc, the bytes
under SPOOL_DIR, the exit code and log of a process.
"""

from __future__ import annotations

import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from scripts.benchlib.chaos.traffic import Traffic
from scripts.benchlib.serverproc import LiveServer, start_server, stop_server


class Database(Protocol):
    """What a scenario needs of a database (``scripts.benchlib.databases.Database`` and the test fixtures')."""

    backend: str
    url: str

    def down(self) -> None: ...

    def up(self) -> None: ...


class Unsupported(Exception):
    """This machine cannot run the scenario (e.g. no permission to mount a tmpfs); the message says why."""


@dataclass
class Setup:
    """What every scenario run is given: the model, the database, a fresh directory, the durability mode."""

    artifact: Path
    database: Database
    workdir: Path
    mode: str | None = None  # STORE_DURABILITY; None: the server's default
    clients: int = 8
    kill_after: int = 200  # answers before a SIGKILL (at a random moment after them)
    jitter_s: float = 0.5  # the SIGKILL comes uniformly within this long after kill_after answers
    timeout_s: float = 30.0  # bound on every wait (a server's start, recovery, a condition)
    seed: int = 0
    full_spool_bytes: int = 2 << 20  # the tmpfs size, or SPOOL_MAX_BYTES, of the full-spool scenarios
    large_spool_bytes: int = 100 << 20  # the spool the large-spool scenario builds before a restart
    env: dict[str, str] = field(default_factory=dict)  # extra server settings

    @property
    def mode_name(self) -> str:
        return self.mode or "default"

    @property
    def spool_dir(self) -> Path:
        return self.workdir / "spool"


class Harness:
    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.servers: list[LiveServer] = []
        self.traffics: list[Traffic] = []

    def __enter__(self) -> Harness:
        self.setup.workdir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *_: object) -> None:
        for traffic in self.traffics:  # left running by a failure: it would go on hitting ports others reuse
            traffic.stop()
        for server in self.servers:
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait()
        self.setup.database.up()

    def env(self, **overrides: str) -> dict[str, str]:
        """The settings of a server of this run; ``overrides`` (e.g. DATABASE_URL) on top.

        DRAIN_GRACE_S=0: a scenario stops a server only once its traffic has stopped, so the 3 s the listener
        stays open for load balancers would only slow every run down.
        """
        env = {"MODEL_PATH": str(self.setup.artifact), "DATABASE_URL": self.setup.database.url,
               "SPOOL_DIR": str(self.setup.spool_dir), "DB_AUTO_MIGRATE": "true", "DB_POOL_TIMEOUT_S": "1",
               "DRAIN_GRACE_S": "0", **self.setup.env}
        if self.setup.mode:
            env["STORE_DURABILITY"] = self.setup.mode
        env.update(overrides)
        return env

    def start(self, wait_ready: bool = True, **overrides: str) -> LiveServer:
        server = start_server(self.env(**overrides), self.setup.workdir, wait_ready=wait_ready,
                              timeout=self.setup.timeout_s * 2)
        self.servers.append(server)
        return server

    def traffic(self, server: LiveServer, clients: int | None = None, **options: Any) -> Traffic:
        """Start clients against ``server`` (``Traffic``'s options); they are stopped on exit at the latest."""
        traffic = Traffic(server.url, clients or self.setup.clients, **options).start()
        self.traffics.append(traffic)
        return traffic

    @staticmethod
    def kill(server: LiveServer) -> None:
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()

    def stop(self, server: LiveServer) -> int:
        """SIGTERM (the graceful stop an orchestrator does); its exit code."""
        return stop_server(server, timeout=self.setup.timeout_s)

    def refusal(self, server: LiveServer) -> int | None:
        """The exit code of a server (started with ``wait_ready=False``) expected to refuse to start; None when it
        became ready instead (it is killed) or neither happened within the timeout."""
        deadline = time.monotonic() + self.setup.timeout_s * 2
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                return server.process.returncode
            try:
                if httpx.get(server.url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill(server)
        return None


def health(url: str) -> dict[str, Any] | None:
    try:
        return httpx.get(url + "/health", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return None


def recovered(state: dict[str, Any] | None) -> bool:
    """/health says ok, the spool is empty and no record waits in memory, in the same answer: with no traffic,
    every record of an answered request should be in the database."""
    database = (state or {}).get("database") or {}
    return (bool(state) and state.get("status") == "ok" and database.get("spool_rows") == 0
            and not database.get("queue_depth"))


def degraded(state: dict[str, Any] | None) -> bool:
    """/health answered, and not ok."""
    return bool(state) and state.get("status") not in (None, "ok")


def wait_health(url: str, condition, timeout_s: float) -> tuple[bool, dict[str, Any] | None, float]:
    """Poll /health until ``condition(health)``: (whether it held, the last /health, seconds waited)."""
    started = time.monotonic()
    state = health(url)
    while not condition(state) and time.monotonic() - started < timeout_s:
        time.sleep(0.1)
        state = health(url)
    return condition(state), state, time.monotonic() - started


def memory_bytes(pid: int, field: str) -> int:
    """A memory figure of a process from /proc (Linux): VmRSS (resident now) or VmHWM (peak resident so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def directory_bytes(directory: Path) -> int:
    """Bytes of the regular files under ``directory`` (0 when it does not exist)."""
    if not directory.exists():
        return 0
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


@contextmanager
def tmpfs(directory: Path, size_bytes: int):
    """A tmpfs of ``size_bytes`` mounted at ``directory`` (needs root or CAP_SYS_ADMIN), unmounted on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(directory)],
                                 capture_output=True, text=True)
        problem = (mounted.stderr.strip() or f"mount exited with {mounted.returncode}") if mounted.returncode else ""
    except OSError as error:
        problem = str(error)
    if problem:
        raise Unsupported(f"cannot mount a tmpfs at {directory}: {problem} (needs root or CAP_SYS_ADMIN)")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "--lazy", str(directory)], check=False)
