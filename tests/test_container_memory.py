"""Never OOM-killed: the CPU image under ``--memory 600m``, ``1g`` and ``2g``, loaded as the issue measured it.

Each limit gets a fresh container (the runbook's image, its defaults: every memory setting derived from the
limit). It must start (600m used to be OOM-killed during warm-up), then take a burst of three concurrent
requests of 256 long texts each (~560 words, cut to the model's 512 tokens; ~0.9 MB of JSON, within
MAX_REQUEST_BYTES), then a sustained mix of short, batched and long requests from several clients for
``SUSTAIN_S`` seconds. Asserted: never OOM-killed and still running, every request answered 200 (or 503 with
Retry-After, should it have to shed), and the container's cgroup peak (``memory.peak`` / v1
``memory.max_usage_in_bytes``, read inside it) below the limit. The server's planned peak, its measured peak
(VmHWM of PID 1) and the cgroup's go to build/container_report.json. ``REQUEST_TIMEOUT_S`` is raised so that
the burst, ~400,000 tokens for two cores, is answered rather than timed out on a busy CI machine.

A setting that cannot fit the limit (``MAX_BATCH_TOKENS=16384`` at 1g) stops start-up with exit code 2 and
one line naming the limit it needs, without a traceback.

Needs Docker (tests/docker_fixtures.py); skipped with one line where it cannot run.
"""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from scripts.benchlib.serverproc import free_port
from tests.docker_fixtures import LABEL, Container, base_image, build_image, claim_name, docker, record, require_docker

pytestmark = pytest.mark.container

IMAGE = "sentiment-analyzer:cpu"
LIMITS = {"600m": 600 * 2**20, "1g": 2**30, "2g": 2 * 2**30}
SUSTAIN_S = 60
CLIENTS = 4
LONG_WORDS = 560
REQUEST_BYTES_LIMIT = 1_048_576  # MAX_REQUEST_BYTES's default
WORDS = ("the film story acting performance director camera music scene character moment audience plot dialogue "
         "moving dull brilliant tedious charming awkward bold quiet warm cold sharp slow fast funny bleak tender "
         "never always almost rather quite simply often barely deeply truly and but with without although because "
         "while after before an a of in on its their this that every some few many long short first last").split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def long_texts(rng: random.Random, count: int) -> list[str]:
    return [sentence(rng, LONG_WORDS) for _ in range(count)]


@pytest.fixture(scope="module")
def cpu_image() -> dict:
    require_docker()
    base = base_image()
    return build_image("docker/Dockerfile", IMAGE, {"PYTHON_IMAGE": base} if base else None)


def start(name: str, memory: str, *env: str) -> Container:
    claim_name(name)
    port = free_port()
    docker("run", "-d", "--name", name, "--label", f"{LABEL}=1", "--network", "host", "--memory", memory,
           "--memory-swap", memory, "-e", f"PORT={port}", "-e", "REQUEST_TIMEOUT_S=900", *env, IMAGE)
    return Container(name, port)


def answered(response: httpx.Response) -> bool:
    """200, or a 503 that says when to come back (load shed)."""
    return response.status_code == 200 or (response.status_code == 503 and "retry-after" in response.headers)


def post(client: httpx.Client, url: str, texts: list[str]) -> httpx.Response:
    return client.post(url + "/predict", json={"texts": texts}, timeout=900)


def burst(container: Container, seed: int) -> list[httpx.Response]:
    rng = random.Random(seed)
    bodies = [long_texts(rng, 256) for _ in range(3)]
    for texts in bodies:
        size = len(json.dumps({"texts": texts}))
        assert 800_000 < size < REQUEST_BYTES_LIMIT, size
    with httpx.Client() as client, ThreadPoolExecutor(3) as pool:
        return list(pool.map(lambda texts: post(client, container.url, texts), bodies))


def sustained(container: Container, seconds: float, seed: int) -> list[httpx.Response]:
    """CLIENTS clients, each sending requests back to back: one short text, 32 short texts, one long text or 16
    long texts, at random."""

    def client_loop(index: int) -> list[httpx.Response]:
        rng, responses = random.Random(seed * 100 + index), []
        deadline = time.monotonic() + seconds
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                kind = rng.random()
                if kind < 0.4:
                    texts = [sentence(rng, rng.randint(5, 30))]
                elif kind < 0.7:
                    texts = [sentence(rng, rng.randint(5, 30)) for _ in range(32)]
                elif kind < 0.9:
                    texts = long_texts(rng, 1)
                else:
                    texts = long_texts(rng, 16)
                responses.append(post(client, container.url, texts))
        return responses

    with ThreadPoolExecutor(CLIENTS) as pool:
        return [r for rs in pool.map(client_loop, range(CLIENTS)) for r in rs]


def cgroup_peak(name: str) -> int:
    """The container's peak memory as its cgroup counts it, read inside it (v2, else v1)."""
    out = docker("exec", name, "sh", "-c", "cat /sys/fs/cgroup/memory.peak 2>/dev/null || "
                 "cat /sys/fs/cgroup/memory/memory.max_usage_in_bytes").stdout
    return int(out.split()[0])


def server_peak(name: str) -> int:
    """VmHWM of PID 1, the server: its own resident peak."""
    status = docker("exec", name, "cat", "/proc/1/status").stdout
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


@pytest.mark.parametrize("memory", list(LIMITS))
def test_never_oom_killed_under_a_burst_of_long_texts_and_a_sustained_mix(cpu_image, memory: str) -> None:
    name = f"sentiment-analyzer-memory-{memory}"
    container = start(name, memory)
    try:
        ready_s = container.wait_ready()
        health = httpx.get(container.url + "/health", timeout=30).json()
        plan = health["memory"]["plan"]
        assert health["memory"]["limit_bytes"] == LIMITS[memory]
        assert plan["peak_bytes"] <= plan["ceiling_bytes"] < LIMITS[memory], plan

        started = time.monotonic()
        burst_responses = burst(container, seed=len(memory))
        burst_s = time.monotonic() - started
        unanswered = [(r.status_code, r.text[:200]) for r in burst_responses if not answered(r)]
        assert not unanswered, unanswered
        mix = sustained(container, SUSTAIN_S, seed=len(memory))
        unanswered = [(r.status_code, r.text[:200]) for r in mix if not answered(r)]
        assert not unanswered, unanswered[:5]

        state = container.state()
        assert not state["OOMKilled"] and state["Status"] == "running", state
        peak, process_peak = cgroup_peak(name), server_peak(name)
        record(f"memory:{memory}", {
            "ready_s": ready_s, "burst_s": round(burst_s, 1), "burst_status": [r.status_code for r in burst_responses],
            "sustained_requests": len(mix), "sustained_503": sum(r.status_code == 503 for r in mix),
            "cgroup_peak_mib": round(peak / 2**20), "server_peak_mib": round(process_peak / 2**20),
            "planned_peak_mib": round(plan["peak_bytes"] / 2**20), "ceiling_mib": round(plan["ceiling_bytes"] / 2**20),
            "plan": {k: plan[k] for k in ("engine_workers", "batch_tokens", "batch_texts_at_max_length", "max_queue",
                                          "cache_max_bytes", "base_bytes")},
            "bytes_per_token_at_512": plan["cost_model"]["bytes_per_token_at_length"].get("512"),
        })
        assert peak < LIMITS[memory], f"cgroup peak {peak} reached the limit {LIMITS[memory]}"
    finally:
        docker("rm", "-f", name, check=False, timeout=120)


def test_a_setting_that_cannot_fit_stops_start_up_in_one_line(cpu_image) -> None:
    name = "sentiment-analyzer-memory-misfit"
    container = start(name, "1g", "-e", "MAX_BATCH_TOKENS=16384")
    try:
        state = container.wait_exited(timeout=240)
        logs = container.logs()
        assert state["ExitCode"] == 2 and not state["OOMKilled"], (state, logs[-3000:])
        (line,) = [line for line in logs.splitlines() if "cannot start" in line]
        assert "MAX_BATCH_TOKENS" in line and "--memory" in line, line
        assert "Traceback" not in logs, logs[-3000:]
    finally:
        docker("rm", "-f", name, check=False, timeout=120)
