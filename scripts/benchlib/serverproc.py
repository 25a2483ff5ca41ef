"""Run `sentiment-analyzer serve` in a subprocess on a free port: real uvicorn, real sockets.

Used by the integration tests and the server benchmarks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    env: dict[str, str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(env_overrides: dict[str, str], tmp_path: Path, wait_ready: bool = True,
                 timeout: float = 60.0, output: int | None = None) -> LiveServer:
    """``sentiment-analyzer serve`` in a subprocess on a free port (real uvicorn, real sockets); its standard output
    and error go to ``log_path``, or to ``output`` (e.g. ``subprocess.PIPE``) when given."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_", "DEVICE", "PORT", "HOST"))}
    env.update({
        "HOST": "127.0.0.1", "PORT": str(port), "DEVICE": "cpu", "INTRA_OP_THREADS": "1",
        "DATABASE_URL": f"sqlite:///{tmp_path}/live.db", "SPOOL_DIR": str(tmp_path / "spool"),
        "LOG_FORMAT": "text",
    })
    env.update(env_overrides)
    log_path = tmp_path / f"server-{port}.log"
    with log_path.open("w") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env, cwd=ROOT,
                                   stdout=log if output is None else output, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", process, env, log_path)
    if wait_ready:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
            try:
                if httpx.get(server.url + "/ready", timeout=1).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        process.kill()
        raise RuntimeError(f"server not ready within {timeout} s:\n{server.log()}")
    return server


def wait_exit(server: LiveServer, timeout: float = 60.0) -> int:
    """The exit code of a server expected to stop by itself (a start-up refused); killed, with its log in the
    error, if it is still running after ``timeout`` seconds."""
    try:
        return server.process.wait(timeout)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
        raise RuntimeError(f"server did not exit within {timeout} s:\n{server.log()}") from None


def stop_server(server: LiveServer, timeout: float = 30.0) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode


