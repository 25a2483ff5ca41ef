"""docker/compose.yaml run for real: server + PostgreSQL + Prometheus, a database outage, a restart.

The stack is docker/compose.yaml with docker/compose.local.yaml on top (PostgreSQL and Prometheus built
from Debian's packages, since Docker Hub may be out of reach; Grafana, which has no package, stays off),
under its own project name and on free host ports. Everything else is the real file's: the compose
network and service names, the healthchecks, the volumes, Prometheus's configuration and alert rules.
COMPOSE_FILE and COMPOSE_PROJECT_NAME are set, so the runbooks' compose commands run as written
(``docker-compose restart sentiment-analyzer``); ``docker compose`` (v2) and ``docker-compose`` (1.x, Debian's)
take the same arguments and whichever is installed runs them.

Checked: Prometheus scrapes the server and has loaded every rule group of alerts.yml, and evaluates
every Grafana dashboard query without error (Grafana itself cannot run here); ``stop postgres`` ->
/health degraded while predictions go on -> ``start postgres`` -> the spool replayed, every answered
prediction in PostgreSQL exactly once; ``restart sentiment-analyzer`` -> ready again. The outage figures
go to build/container_report.json.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from scripts.benchlib.serverproc import free_port
from tests.docker_fixtures import (
    Container,
    base_image,
    build_image,
    docker,
    json_log_problems,
    record,
    require_docker,
)
from tests.docker_fixtures import shell as plain_shell
from tests.test_dashboard_metrics import GRAFANA_VARIABLES, dashboard_exprs
from tests.waiting import wait_for

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parent.parent
DOCKER_DIR = ROOT / "docker"
FILES = [DOCKER_DIR / "compose.yaml", DOCKER_DIR / "compose.local.yaml"]
PROJECT = "sentiment-analyzer-test"
CONTAINERS = ("sentiment-analyzer", "sentiment-postgres", "sentiment-prometheus")
ALERTS = DOCKER_DIR / "prometheus" / "alerts.yml"
WAIT_S = 120  # how long a step of the stack may take, unless it says otherwise
POLL_S = 0.5  # docker and Prometheus, asked no more often than this


def compose_cli() -> str | None:
    """`docker-compose` (1.x or a v2 binary) or `docker compose` (the v2 plugin), whichever runs."""
    if shutil.which("docker-compose"):
        return "docker-compose"
    if plain_shell("docker compose version", timeout=30).returncode == 0:
        return "docker compose"
    return None


class Stack:
    def __init__(self, cli: str) -> None:
        self.cli = cli
        self.server_port, self.prometheus_port = free_port(), free_port()
        self.env = {**os.environ, "COMPOSE_FILE": os.pathsep.join(map(str, FILES)), "COMPOSE_PROJECT_NAME": PROJECT,
                    "SENTIMENT_PORT": str(self.server_port), "PROMETHEUS_PORT": str(self.prometheus_port),
                    "GRAFANA_PORT": str(free_port())}
        self.server = Container("sentiment-analyzer", self.server_port)
        self.prometheus_url = f"http://127.0.0.1:{self.prometheus_port}"
        self.answered: list[str] = []  # ids of every prediction the stack answered

    def sh(self, command: str, timeout: float = 180):
        """A runbook command as written; `docker compose` / `docker-compose` run by whichever is installed."""
        command = re.sub(r"^docker[ -]compose\b", self.cli, command)
        return subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT, env=self.env)

    def ok(self, command: str, timeout: float = 180) -> str:
        result = self.sh(command, timeout)
        assert result.returncode == 0, f"{command} -> exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result.stdout + result.stderr

    def predict(self, text: str) -> float:
        started = time.monotonic()
        response = httpx.post(self.server.url + "/predict", json={"text": text}, timeout=60)
        assert response.status_code == 200, response.text
        self.answered.append(response.json()["predictions"][0]["id"])
        return time.monotonic() - started

    def health(self) -> dict:
        return httpx.get(self.server.url + "/health", timeout=10).json()

    def psql(self, sql: str) -> str:
        return docker("exec", "sentiment-postgres", "psql", "-U", "sentiment", "-d", "sentiment", "-tAc", sql).stdout

    def prometheus(self, path: str, **params: str) -> dict:
        body = httpx.get(self.prometheus_url + path, params=params, timeout=30).json()
        assert body["status"] == "success", body
        return body["data"]


def foreign_containers() -> list[str]:
    """Containers holding the stack's fixed names that are not this test project's."""
    foreign = []
    for name in CONTAINERS:
        projects = docker("ps", "-a", "--filter", f"name=^/{name}$", "--format",
                          'project={{.Label "com.docker.compose.project"}}', timeout=60).stdout.split()
        if any(project != f"project={PROJECT}" for project in projects):
            foreign.append(name)
    return foreign


@pytest.fixture(scope="module")
def stack():
    require_docker()
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither docker-compose nor `docker compose` is installed")
    base = base_image()
    build_image("docker/Dockerfile", "sentiment-analyzer:cpu", {"PYTHON_IMAGE": base} if base else None)
    standin_base = {"BASE_IMAGE": base or "debian:bookworm"}
    for service, dockerfile in (("postgres", "postgres.Dockerfile"), ("prometheus", "prometheus.Dockerfile")):
        image = yaml.safe_load(FILES[1].read_text())["services"][service]["image"]
        build_image(str(DOCKER_DIR / "standin" / dockerfile), image, standin_base, context=DOCKER_DIR / "standin")
    stack = Stack(cli)
    stack.sh("docker-compose down -v --remove-orphans")  # a run of ours that did not finish
    foreign = foreign_containers()
    if foreign:
        pytest.skip(f"containers {foreign} exist that are not this test's stack; not touching them")
    try:
        started = time.monotonic()
        stack.ok("docker-compose up -d", timeout=600)
        stack.server.wait_ready()
        record("compose:up_ready_s", round(time.monotonic() - started, 1))
        yield stack
    finally:
        stack.sh("docker-compose down -v --remove-orphans", timeout=300)


def test_stack_is_wired_as_compose_yaml_says(stack) -> None:
    health = stack.health()
    assert health["status"] == "ok" and health["database"]["backend"] == "postgresql", health
    metrics = httpx.get(stack.server.url + "/metrics", timeout=10).text
    assert re.search(r"^sentiment_memory_limit_bytes 2\.147483648e\+09$", metrics, re.M), "mem_limit 2g not seen"
    assert "5432" in stack.ok("docker exec sentiment-analyzer netstat -an | grep 5432")  # the runbook, as written
    assert "accepting connections" in stack.ok("docker exec sentiment-postgres pg_isready -U sentiment -d sentiment")
    wait_for(lambda: "(healthy)" in stack.ok("docker compose -f docker/compose.yaml ps postgres"), "postgres healthy",
             timeout=WAIT_S, every=POLL_S)
    stack.server.wait_healthy(timeout=120)  # the compose healthcheck, on the PORT the server listens on
    stack.predict("Compose stack, first prediction.")


def test_prometheus_scrapes_the_server_and_loads_every_rule_group(stack) -> None:
    def server_target() -> dict | None:
        targets = stack.prometheus("/api/v1/targets")["activeTargets"]
        found = [t for t in targets if t["labels"]["job"] == "sentiment-analyzer" and t["health"] == "up"]
        return found[0] if found else None

    target = wait_for(server_target, "Prometheus scraping sentiment-analyzer:8000", timeout=90, every=POLL_S)
    assert target["scrapeUrl"] == "http://sentiment-analyzer:8000/metrics", target
    expected = {group["name"]: len(group["rules"]) for group in yaml.safe_load(ALERTS.read_text())["groups"]}

    def evaluated() -> list[dict] | None:
        groups = stack.prometheus("/api/v1/rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return groups if rules and all(rule["health"] != "unknown" for rule in rules) else None

    groups = wait_for(evaluated, "every alert rule evaluated once", timeout=90, every=2)
    assert {group["name"]: len(group["rules"]) for group in groups} == expected
    failing = [(rule["name"], rule.get("lastError")) for group in groups for rule in group["rules"]
               if rule["health"] != "ok"]
    assert not failing, failing


def test_every_dashboard_query_evaluates_in_prometheus(stack) -> None:
    """The dashboard is otherwise only schema-checked: each panel's query, Grafana variables filled in as Grafana
    would, must be accepted and evaluated by this Prometheus over the live server's series."""
    wait_for(lambda: stack.prometheus("/api/v1/query", query="count(sentiment_ready)")["result"],
             "sentiment_ready scraped", timeout=WAIT_S, every=POLL_S)
    errors, with_data, exprs = [], 0, dashboard_exprs()
    for expr in exprs:
        if expr.startswith("label_values("):  # a Grafana function: the series it lists
            series, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", expr).groups()
            data = stack.prometheus("/api/v1/label/" + label + "/values", **{"match[]": series})
            assert data, f"{expr}: no values"
            continue
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        body = httpx.get(stack.prometheus_url + "/api/v1/query", params={"query": expr}, timeout=30).json()
        if body["status"] != "success":
            errors.append(f"{expr}: {body.get('error')}")
        elif body["data"]["result"]:
            with_data += 1
    assert not errors, "\n".join(errors)
    record("compose:dashboard_queries", {"evaluated": len(exprs), "with_data": with_data})


def test_database_outage_spools_and_replays_every_prediction_once(stack) -> None:
    for n in range(5):
        stack.predict(f"Before the outage, review {n}.")
    stopped_at = time.monotonic()
    stack.ok("docker-compose stop postgres")
    during: list[float] = []

    degraded_at: list[float] = []

    def down() -> dict | None:  # degraded first, maybe, while a call waits on the stopped server ("not answered")
        during.append(stack.predict(f"During the outage, review {len(during)}."))
        health = stack.health()
        if health["status"] == "degraded" and not degraded_at:
            degraded_at.append(time.monotonic())
        return health if health["database"]["state"] == "down" else None

    health = wait_for(down, "/health saying the database is down with PostgreSQL stopped", timeout=120, every=POLL_S)
    detected_s = degraded_at[0] - stopped_at
    assert any("database" in reason for reason in health["reasons"]), health
    assert health["database"]["state"] == "down" and health["database"]["spool_rows"] > 0, health
    for _ in range(20):  # predictions go on, answered from the spool's durability
        during.append(stack.predict(f"During the outage, review {len(during)}."))
    spooled = stack.health()["database"]["spool_rows"]

    started_at = time.monotonic()
    stack.ok("docker-compose start postgres")
    wait_for(lambda: (h := stack.health())["status"] == "ok" and h["database"]["spool_rows"] == 0,
             "spool replayed into PostgreSQL", timeout=180, every=POLL_S)
    replayed_s = time.monotonic() - started_at
    ids = ",".join(f"'{i}'" for i in stack.answered)
    total, distinct, ours = stack.psql(f"select count(*), count(distinct id), count(*) filter (where id in ({ids})) "
                                       "from predictions").strip().split("|")
    assert int(total) == int(distinct) == int(ours) == len(stack.answered), (total, distinct, ours,
                                                                             len(stack.answered))
    record("compose:outage", {
        "degraded_after_s": round(detected_s, 1), "predictions_during_outage": len(during),
        "outage_latency_max_s": round(max(during), 3),
        "outage_latency_median_s": round(sorted(during)[len(during) // 2], 3), "spooled_rows": spooled,
        "replayed_after_start_s": round(replayed_s, 1), "rows_in_postgres": int(total),
        "predictions_answered": len(stack.answered),
    })


def test_compose_restart_comes_back_ready(stack) -> None:
    started = time.monotonic()
    stack.ok("docker-compose restart sentiment-analyzer")  # the operators' runbook, as written
    stack.server.wait_ready()
    record("compose:restart_ready_s", round(time.monotonic() - started, 1))
    assert stack.health()["status"] == "ok"
    stack.predict("After the restart.")
    rows = stack.psql("select count(*) from predictions").strip()
    wait_for(lambda: stack.psql("select count(*) from predictions").strip() == str(len(stack.answered)),
             f"the prediction after the restart in PostgreSQL (had {rows})", timeout=WAIT_S, every=POLL_S)
    problems = json_log_problems(stack.server.logs())
    assert not problems, "non-JSON lines in docker logs:\n" + "\n".join(problems[:10])
