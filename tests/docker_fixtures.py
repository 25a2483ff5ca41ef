"""Docker for the container tests (tests/test_container.py, tests/test_compose_stack.py).

Finds a client that builds with BuildKit (the Dockerfiles use ``RUN --mount``): ``docker buildx``, or a
client older than 23 with ``DOCKER_BUILDKIT=1`` (Debian's docker.io; a newer client without the buildx
plugin refuses). Builds on ``CONTAINER_BASE_IMAGE`` when set; else on the local Debian base that
scripts/make_base_image.sh makes (root and debootstrap; kept once made, like BuildKit's pip cache, so a
second run builds in seconds); else on the Dockerfiles' own Docker Hub bases.

The tests skip, with one line saying why, only where Docker cannot run: no client, no daemon, no
BuildKit-capable client. Containers they start carry the label ``LABEL`` and are removed when done; a
container of the same name that they did not start is never touched (the tests skip instead). One test
run at a time drives them on a machine (a lock file; another run waits).
Build and run figures go to build/container_report.json (``.ci/run`` prints them).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
LABEL = "org.sentiment-analyzer.test"
LOCAL_BASE = "local/debian-python:bookworm"
REPORT = ROOT / "build" / "container_report.json"
BUILD_TIMEOUT_S = 1800  # a cold CUDA build downloads a ~255 MB wheel
READY_TIMEOUT_S = 240  # model load and warm-up on 2 busy cores
LOCK = Path("/tmp/sentiment-analyzer-container-tests.lock")
LOCK_WAIT_S = 1200


def docker(*args: str, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None,
           client: str = "docker") -> subprocess.CompletedProcess:
    result = subprocess.run([client, *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} -> exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def shell(command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A runbook command exactly as written, through bash (pipes, globs and quotes as an operator types them)."""
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@functools.cache
def build_command() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]] | None:
    """(argv prefix, extra environment) of a build that understands RUN --mount, or None."""
    if docker("buildx", "version", check=False, timeout=30).returncode == 0:
        return ("docker", "buildx", "build", "--load"), ()
    for client in dict.fromkeys(filter(None, [shutil.which("docker"), "/usr/bin/docker"])):
        if not Path(client).exists():
            continue
        version = docker("version", "--format", "{{.Client.Version}}", client=client, check=False, timeout=30)
        major = re.match(r"(\d+)\.", version.stdout.strip())
        if major and int(major.group(1)) < 23:
            return (client, "build"), (("DOCKER_BUILDKIT", "1"),)
    return None


@functools.cache
def docker_problem() -> str | None:
    """Why Docker cannot run here (one line), or None."""
    if shutil.which("docker") is None:
        return "no docker client (Debian: apt-get install docker.io)"
    try:
        info = docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=30)
    except subprocess.TimeoutExpired:
        return "the Docker daemon does not answer `docker info` within 30 s"
    if info.returncode != 0:
        lines = (info.stderr or info.stdout).strip().splitlines()
        return f"no Docker daemon: {lines[-1] if lines else 'docker info failed'}"
    if build_command() is None:
        return "no docker client that builds with BuildKit (the buildx plugin, or a client older than 23)"
    return None


_run_lock = None


def require_docker() -> None:
    """Skip where Docker cannot run; else take the machine-wide lock (the containers' names are fixed, so two
    test runs on one daemon would remove each other's), waiting for another run to finish."""
    global _run_lock
    problem = docker_problem()
    if problem:
        pytest.skip(problem)
    if _run_lock is None:
        lock = LOCK.open("w")
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, f"another container test run held {LOCK} for {LOCK_WAIT_S} s"
                time.sleep(2)
        _run_lock = lock  # held until this process exits


def can_make_local_base() -> bool:
    return os.geteuid() == 0 and shutil.which("debootstrap") is not None


def image_id(tag: str) -> str | None:
    found = docker("image", "inspect", "-f", "{{.Id}}", tag, check=False, timeout=60)
    return found.stdout.strip() if found.returncode == 0 else None


def image_exists(tag: str) -> bool:
    return image_id(tag) is not None


@functools.cache
def base_image() -> str | None:
    """The base both Dockerfiles build on; None: their own defaults from Docker Hub."""
    if os.environ.get("CONTAINER_BASE_IMAGE"):
        return os.environ["CONTAINER_BASE_IMAGE"]
    if image_exists(LOCAL_BASE) or can_make_local_base():
        started = time.monotonic()
        made = subprocess.run([str(ROOT / "scripts" / "make_base_image.sh"), LOCAL_BASE], capture_output=True,
                              text=True, timeout=900, cwd=ROOT)
        assert made.returncode == 0, f"scripts/make_base_image.sh failed:\n{made.stdout}\n{made.stderr}"
        record("base_image", {"tag": LOCAL_BASE, "seconds": round(time.monotonic() - started, 1),
                              "output": made.stdout.strip().splitlines()[-1:]})
        return LOCAL_BASE
    return None


def build_image(dockerfile: str, tag: str, build_args: dict[str, str] | None = None,
                context: Path = ROOT) -> dict:
    """Build with BuildKit (layers and the pip cache mount kept by the daemon); returns seconds and size."""
    argv, extra_env = build_command()
    args = [arg for name, value in (build_args or {}).items() for arg in ("--build-arg", f"{name}={value}")]
    previous = image_id(tag)
    started = time.monotonic()
    result = subprocess.run([*argv, "--network", "host", "--progress", "plain", *args, "-f", dockerfile, "-t", tag,
                             str(context)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, cwd=ROOT,
                            env={**os.environ, **dict(extra_env)})
    seconds = round(time.monotonic() - started, 1)
    assert result.returncode == 0, f"building {tag} from {dockerfile} failed:\n{result.stderr[-6000:]}"
    if previous and previous != image_id(tag):  # the image this tag named before, else left behind on every change
        docker("rmi", previous, check=False, timeout=120)
    size = int(docker("image", "inspect", "-f", "{{.Size}}", tag).stdout)
    figures = {"dockerfile": dockerfile, "seconds": seconds, "size_bytes": size,
               "size_mib": round(size / 2**20), "base": (build_args or {}) or "default"}
    record(f"build:{tag}", figures)
    return figures


_report: dict[str, object] = {}


def record(key: str, value: object) -> None:
    """Add a measured figure to build/container_report.json (this run's figures only; .ci/run prints them)."""
    _report[key] = value
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(_report, indent=2, sort_keys=True) + "\n")


def claim_name(name: str) -> None:
    """Remove a leftover test container named ``name``; skip if someone else's container has that name."""
    found = docker("ps", "-a", "--filter", f"name=^/{name}$", "--format", '{{.ID}} {{.Label "' + LABEL + '"}}',
                   timeout=60).stdout.split()
    if not found:
        return
    if len(found) < 2:
        pytest.skip(f"a container named {name} exists that the tests did not start; not touching it")
    docker("rm", "-f", name, timeout=120)


@dataclass
class Container:
    """One server container on the host network at ``port`` (the runbook's commands name it by ``name``)."""

    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def state(self) -> dict:
        return json.loads(docker("inspect", "--format", "{{json .State}}", self.name).stdout)

    def logs(self) -> str:
        result = docker("logs", self.name, timeout=60)
        return result.stdout + result.stderr

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Seconds until /ready answers 200; fails with the log tail if the container exits or never gets there."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            state = self.state()
            if state["Status"] in ("exited", "dead"):
                raise AssertionError(f"{self.name} exited ({state['ExitCode']}):\n{self.logs()[-4000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return round(time.monotonic() - started, 1)
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{self.name} not ready within {timeout} s:\n{self.logs()[-4000:]}")

    def wait_exited(self, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state()
            if state["Status"] == "exited":
                return state
            time.sleep(0.3)
        raise AssertionError(f"{self.name} still {self.state()['Status']} after {timeout} s")

    def wait_healthy(self, timeout: float = 120) -> None:
        """Docker's own HEALTHCHECK says healthy (its first probe runs one interval after the start)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.state().get("Health", {}).get("Status")
            if health == "healthy":
                return
            time.sleep(1)
        raise AssertionError(f"{self.name} HEALTHCHECK is {self.state().get('Health')} after {timeout} s")


def json_log_problems(text: str) -> list[str]:
    """Lines of ``text`` that are not one JSON object each (LOG_FORMAT=json promises every line is)."""
    problems = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            if not isinstance(json.loads(line), dict):
                problems.append(line)
        except ValueError:
            problems.append(line)
    return problems
