"""The images, built and run: the operators' runbook's docker commands, as written, against a real container.

The CPU image runs as the runbook names it, ``sentiment-analyzer``, with a 2 GiB memory limit, on the
host network at a free PORT. The tests run in file order against that one container; each leaves it
running and ready except the last CPU test (``docker stop``). Every command an operator types
(``docker ps | grep sentiment-analyzer``, ``docker logs sentiment-analyzer 2>&1 | grep ERROR``, ...)
goes through bash exactly as docs/RUNBOOK.md and the operators' runbook write it. The commands that name
the old stack's internals (a joblib model, psycopg2, ``src.config``) are run too, to show how they fail,
next to the equivalents docs/RUNBOOK.md gives for them. The CUDA image is built on the same base and
run without a GPU: it serves on CPU after a WARNING.

Needs Docker (tests/docker_fixtures.py says which client and base); skipped with one line where Docker
cannot run. Build and start times and image sizes go to build/container_report.json.
"""

from __future__ import annotations

import json
import re
import select
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from scripts.benchlib.serverproc import free_port
from tests.docker_fixtures import (
    LABEL,
    Container,
    base_image,
    build_image,
    claim_name,
    docker,
    json_log_problems,
    record,
    require_docker,
    shell,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parent.parent
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"
NAME = "sentiment-analyzer"
LOG_FILE = "/app/logs/sentiment_analyzer.log"
MEMORY_LIMIT = 2 * 2**30
MAX_IMAGE_BYTES = {"cpu": 1 * 2**30, "cuda": 2 * 2**30}  # on the Debian base; the CUDA base adds its libraries
WAIT_S = 60  # how long a container step may take
POLL_S = 0.5  # docker and the server, asked no more often than this


def run_container(name: str, image: str, port: int, *extra: str) -> Container:
    claim_name(name)
    docker("run", "-d", "--name", name, "--label", f"{LABEL}=1", "--network", "host", "--stop-timeout", "45",
           "-e", f"PORT={port}", *extra, image)
    return Container(name, port)


@pytest.fixture(scope="module")
def cpu_image() -> dict:
    require_docker()
    base = base_image()
    return build_image("docker/Dockerfile", "sentiment-analyzer:cpu", {"PYTHON_IMAGE": base} if base else None)


@pytest.fixture(scope="module")
def server(cpu_image):
    container = run_container(NAME, "sentiment-analyzer:cpu", free_port(), "--memory", "2g")
    try:
        record("run:cpu:first_ready_s", container.wait_ready())
        yield container
    finally:
        docker("rm", "-f", NAME, check=False, timeout=120)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


def predict(container: Container, text: str, timeout: float = 60) -> dict:
    response = httpx.post(container.url + "/predict", json={"text": text}, timeout=timeout)
    assert response.status_code == 200, response.text
    return response.json()


def metric(container: Container, sample: str) -> float:
    text = httpx.get(container.url + "/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    assert match, f"/metrics has no {sample}"
    return float(match.group(1))


# ------------------------------------------------------------------ the image


def test_image_runs_as_non_root_and_is_a_sensible_size(cpu_image, server) -> None:
    assert cpu_image["size_bytes"] < MAX_IMAGE_BYTES["cpu"], cpu_image
    assert docker("inspect", "-f", "{{.Config.User}}", "sentiment-analyzer:cpu").stdout.strip() == "10001:10001"
    assert ok(shell("docker exec sentiment-analyzer id -u")).strip() == "10001"
    pid1 = ok(shell("docker exec sentiment-analyzer ps -o user=,args= -p 1")).split()
    assert pid1 == ["app", "python", "/opt/venv/bin/sentiment-analyzer", "serve"], pid1


def test_serves_and_reads_its_memory_limit(server) -> None:
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    assert health.json()["provider"] == "CPUExecutionProvider"
    (prediction,) = predict(server, "An absolute delight from start to finish.")["predictions"]
    assert prediction["label"] == "POSITIVE", prediction
    assert metric(server, "sentiment_memory_limit_bytes") == MEMORY_LIMIT
    assert 0 < metric(server, "sentiment_process_resident_memory_bytes") < MEMORY_LIMIT


def test_status_snapshot_inside_the_container(server) -> None:
    """docs/RUNBOOK.md, first five minutes: `sentiment-analyzer status --url URL`, run where the server is."""
    out = ok(shell(f"docker exec sentiment-analyzer sentiment-analyzer status --url http://127.0.0.1:{server.port}"))
    assert re.search(r"proposed severity P[0-3]", out), out
    assert "ready yes; health ok" in out, out
    assert "of 2048 MiB" in out, out  # the container's limit, read by the server from its cgroup


def test_log_file_at_the_runbook_path(server) -> None:
    lines = ok(shell(f"docker exec sentiment-analyzer tail -n 20 {LOG_FILE}")).splitlines()
    assert lines and not json_log_problems("\n".join(lines)), lines
    assert any('"ready: ' in line for line in ok(shell(f"docker exec sentiment-analyzer cat {LOG_FILE}")).splitlines())
    # `tail -f` as written: it prints the file's end and follows it (stopped here once a line came)
    follow = subprocess.Popen(["bash", "-c", f"docker exec sentiment-analyzer tail -f {LOG_FILE}"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert select.select([follow.stdout], [], [], 30)[0], "tail -f printed nothing within 30 s"
        first = follow.stdout.readline()
        assert json.loads(first)["level"], first
    finally:
        follow.kill()
        follow.wait(30)


# ------------------------------------------------------------------ the runbook's checks, as written


def test_docker_logs_grep_error_finds_an_injected_error(server) -> None:
    created = ok(shell("docker exec sentiment-analyzer sentiment-analyzer keys create --name oncall --role admin"))
    key = created.strip().splitlines()[-1]
    unauthorized = httpx.post(server.url + "/admin/reload", json={"model_path": "/app/models/missing"}, timeout=30)
    assert unauthorized.status_code == 401, unauthorized.text
    failed = httpx.post(server.url + "/admin/reload", json={"model_path": "/app/models/missing"}, timeout=60,
                        headers={"Authorization": f"Bearer {key}"})
    assert failed.status_code == 409, failed.text
    injected = "model reload from /app/models/missing failed"
    wait_for(lambda: injected in server.logs(), "the failed reload in docker logs", timeout=WAIT_S, every=POLL_S)
    assert injected in ok(shell("docker logs sentiment-analyzer 2>&1 | grep ERROR"))
    assert injected in ok(shell("docker logs sentiment-analyzer 2>&1 | grep ERROR | tail -20"))
    assert injected in ok(shell(f"docker exec sentiment-analyzer grep ERROR {LOG_FILE} | tail -20"))
    security = ok(shell('docker logs sentiment-analyzer 2>&1 | grep -E "(401|403|security)" | tail -10'))
    assert "security: 401" in security and "/admin/reload" in security, security


def test_container_status_and_resources(server) -> None:
    listed = ok(shell("docker ps | grep sentiment-analyzer"))
    assert re.search(r"\bUp\b", listed) and "sentiment-analyzer:cpu" in listed, listed
    tail = ok(shell("docker logs sentiment-analyzer --tail=100")).splitlines()
    assert 0 < len(tail) <= 100 and json.loads(tail[-1])["level"], tail
    stats = ok(shell("docker stats --no-stream sentiment-analyzer"))
    assert re.search(r"/ 2GiB", stats), stats
    by_memory = ok(shell("docker exec sentiment-analyzer ps aux --sort=-%mem")).splitlines()
    assert by_memory[0].split()[:2] == ["USER", "PID"] and "sentiment-analyzer serve" in by_memory[1], by_memory
    listing = ok(shell("docker exec sentiment-analyzer ls -la /app/models/"))
    assert re.search(r"^d.* default$", listing, re.M), listing
    settings = ok(shell('docker exec sentiment-analyzer env | grep -E "^(FLASK|MODEL|LOG)"')).splitlines()
    assert {"MODEL_PATH=/app/models/default", f"LOG_FILE={LOG_FILE}", "LOG_FORMAT=json"} <= set(settings), settings
    sockets = ok(shell(f"docker exec sentiment-analyzer netstat -an | grep ':{server.port} '"))
    assert "LISTEN" in sockets, sockets


# The operators' runbook's commands that name the old stack, what they do here, and docs/RUNBOOK.md's
# equivalent for each: (as written, what it prints here, the equivalent).
OLD_STACK = [
    ("docker exec sentiment-analyzer du -sh /app/models/*", "cannot access '/app/models/*'",
     "docker exec sentiment-analyzer sh -c 'du -sh /app/models/*'"),
    ("docker exec sentiment-analyzer python -c \"import psycopg2; "
     "conn = psycopg2.connect('postgresql://user:pass@db:5432/sentiment_db')\"", "No module named 'psycopg2'",
     "docker exec sentiment-analyzer sentiment-analyzer db current"),
    ("docker exec sentiment-analyzer python -c \"from src.config import get_db_connection; get_db_connection()\"",
     "No module named 'src'", "docker exec sentiment-analyzer sentiment-analyzer db current"),
    ("docker exec sentiment-analyzer python -c \"import joblib; "
     "model = joblib.load('/app/models/sentiment_model.joblib')\"", "No module named 'joblib'",
     "docker exec sentiment-analyzer sentiment-analyzer doctor"),
    ('docker exec sentiment-analyzer pkill -f "python.*webapp"', "",
     "docker kill --signal=HUP sentiment-analyzer"),
]


@pytest.mark.parametrize("as_written, fails_with, equivalent", OLD_STACK, ids=lambda v: v[:40])
def test_old_stack_command_fails_and_its_equivalent_is_documented(server, as_written, fails_with,
                                                                  equivalent) -> None:
    result = shell(as_written)
    assert result.returncode != 0, result.stdout
    assert fails_with in result.stdout + result.stderr, result.stderr
    assert equivalent in RUNBOOK.read_text(), f"docs/RUNBOOK.md does not give {equivalent!r}"


def test_old_stack_equivalents_work(server) -> None:
    sizes = ok(shell("docker exec sentiment-analyzer sh -c 'du -sh /app/models/*'"))
    assert re.search(r"^\S+\s+/app/models/default$", sizes, re.M), sizes
    assert "up to date" in ok(shell("docker exec sentiment-analyzer sentiment-analyzer db current"))
    # doctor loads the model file and runs smoke predictions; in a running container its port check names the
    # port the server itself holds (docs/RUNBOOK.md says so) and it exits 1 for that alone
    doctor = shell("docker exec sentiment-analyzer sentiment-analyzer doctor")
    checks = {name: state for state, name in re.findall(r"^\[(ok|FAIL)\s*\] (\w+):", doctor.stdout, re.M)}
    assert checks.pop("port") == "FAIL" and f"port {server.port} is already in use" in doctor.stdout, doctor.stdout
    assert set(checks.values()) == {"ok"} and {"model", "database", "disk"} <= set(checks), doctor.stdout
    assert "sha256 verified, smoke predictions ok" in doctor.stdout and doctor.returncode == 1
    reloads = 'sentiment_model_reloads_total{result="ok"}'
    before = metric(server, reloads)
    ok(shell("docker kill --signal=HUP sentiment-analyzer"))
    wait_for(lambda: metric(server, reloads) == before + 1, "a model reload after SIGHUP", timeout=WAIT_S, every=POLL_S)
    assert server.state()["Status"] == "running"


def test_docker_healthcheck_turns_healthy(server) -> None:
    server.wait_healthy()
    assert "(healthy)" in ok(shell("docker ps | grep sentiment-analyzer"))


# ------------------------------------------------------------------ restarts and stops


def test_docker_restart_comes_back_ready(server) -> None:
    ok(shell("docker restart sentiment-analyzer", timeout=120))
    record("run:cpu:restart_ready_s", server.wait_ready())
    assert "shutdown: answered" in server.logs()
    predict(server, "Back after a restart.")


def test_pkill_term_python_stops_gracefully(server) -> None:
    ok(shell("docker exec sentiment-analyzer pkill -TERM python"))
    state = server.wait_exited()
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state
    assert "SIGTERM: draining" in server.logs()
    ok(shell("docker restart sentiment-analyzer", timeout=120))  # the runbook's next line
    server.wait_ready()


def test_docker_kill_then_start_keeps_every_answered_prediction(server) -> None:
    """STORE_DURABILITY=ack: an answered prediction is on the spool's disk, so SIGKILL loses none of them."""
    ids = [predict(server, f"Killed mid-shift, review {n} of ten.")["predictions"][0]["id"] for n in range(10)]
    ok(shell("docker kill sentiment-analyzer"))
    state = server.wait_exited()
    assert state["ExitCode"] == 137, state
    ok(shell("docker start sentiment-analyzer"))
    record("run:cpu:start_after_kill_ready_s", server.wait_ready())

    def stored() -> int:
        query = ("import sqlite3, sys; db = sqlite3.connect('/app/data/predictions.db'); print(db.execute("
                 "'select count(*) from predictions where id in (%s)' % ','.join('?' * len(sys.argv[1:])), "
                 "sys.argv[1:]).fetchone()[0])")
        return int(docker("exec", NAME, "python", "-c", query, *ids).stdout)

    wait_for(lambda: stored() == len(ids), f"all {len(ids)} predictions answered before the kill in the database",
             timeout=WAIT_S, every=POLL_S)


def test_docker_stop_answers_in_flight_requests_and_exits_0(server) -> None:
    """Requests the server has taken in when `docker stop` sends SIGTERM are all answered; then it exits 0."""
    text = " ".join(["The plot wanders, yet the acting carries every long and patient scene."] * 12)
    clients = 12

    def one(n: int) -> tuple[int, float]:
        response = httpx.post(server.url + "/predict", json={"texts": [f"{n}.{k} {text}" for k in range(6)]},
                              timeout=120)
        return response.status_code, time.monotonic()

    texts = clients * 6
    dispatched_before = metric(server, "sentiment_batch_size_sum")

    def admitted() -> float:
        """Texts of these requests taken in: queued for the engine or already in a batch (all distinct: no cache
        hits). A request still on its way when the signal comes is a new one, rightly refused with 503."""
        return metric(server, "sentiment_queue_depth") + metric(server, "sentiment_batch_size_sum") - dispatched_before

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(one, n) for n in range(clients)]
        wait_for(lambda: admitted() >= texts, f"all {texts} texts taken in", timeout=60, every=0.02)
        stop_issued = time.monotonic()
        stopped = shell("docker stop sentiment-analyzer", timeout=120)
        answers = [future.result(timeout=120) for future in futures]
    ok(stopped)
    assert [status for status, _ in answers] == [200] * clients, answers
    assert any(finished > stop_issued for _, finished in answers), "no request was in flight at the stop"
    state = server.state()
    assert state["Status"] == "exited" and state["ExitCode"] == 0, state
    assert re.search(r"shutdown: answered \d+ requests during drain, abandoned 0", server.logs())


def test_every_docker_logs_line_is_json(server) -> None:
    """LOG_FORMAT=json: every line of every run above (start, restarts, kill, stop), stdout and stderr alike."""
    logs = server.logs()
    assert '"ready: ' in logs and "shutdown: answered" in logs, logs[-3000:]
    problems = json_log_problems(logs)
    assert not problems, "non-JSON lines in docker logs:\n" + "\n".join(problems[:10])


# ------------------------------------------------------------------ the CUDA image, here without a GPU


def test_cuda_image_serves_on_cpu_without_a_gpu(cpu_image) -> None:
    base = base_image()
    figures = build_image("docker/Dockerfile.cuda", "sentiment-analyzer:cuda", {"CUDA_IMAGE": base} if base else None)
    assert figures["size_bytes"] < MAX_IMAGE_BYTES["cuda"], figures
    container = run_container("sentiment-analyzer-cuda", "sentiment-analyzer:cuda", free_port())
    try:
        record("run:cuda:ready_s", container.wait_ready())
        health = httpx.get(container.url + "/health", timeout=10).json()
        assert health["provider"] == "CPUExecutionProvider" and health["model"]["variant"] == "int8", health
        assert predict(container, "Dreadful, I walked out.")["predictions"][0]["label"] == "NEGATIVE"
        ok(shell("docker stop sentiment-analyzer-cuda", timeout=120))
        assert container.state()["ExitCode"] == 0
        logs = container.logs()
        fallbacks = [line for line in logs.splitlines() if "CUDA unusable, falling back to CPU" in line]
        assert fallbacks and all(json.loads(line)["level"] == "WARNING" for line in fallbacks), logs[-3000:]
        record("run:cuda:fallback_warnings", len(fallbacks))
        problems = json_log_problems(logs)
        assert not problems, "non-JSON lines in docker logs:\n" + "\n".join(problems[:10])
    finally:
        docker("rm", "-f", "sentiment-analyzer-cuda", check=False, timeout=120)
