"""`sentiment-analyzer doctor`: the runbook's "application won't start" checks, each with a fix.

Checks: every environment value, model files and their sha256, the execution
provider for DEVICE, the port, the database, and the writable directories.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from server.config import ConfigError, Settings, load_settings


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not bind ``host:port``, or None when it could."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} is already in use on {host}"
            return f"cannot bind {host}:{port}: {exc.strerror}"
    return None


def check_model(settings: Settings) -> Check:
    from server.artifact import ArtifactError, load_artifact

    try:
        artifact = load_artifact(settings.model_path)
    except ArtifactError as exc:
        return Check("model", False, str(exc),
                     "restore the artifact (git checkout models/default), point MODEL_PATH at a valid one, "
                     "or rebuild it with `make model`")
    return Check("model", True, f"{artifact.name} {artifact.version} at {artifact.directory}, "
                                f"variants {artifact.variants()}, sha256 verified")


def check_device(settings: Settings) -> Check:
    from server.engine import EngineStartError, resolve_device

    try:
        device = resolve_device(settings)
    except EngineStartError as exc:
        return Check("device", False, str(exc), "install onnxruntime-gpu (pip install '.[gpu]') or set DEVICE=auto")
    return Check("device", True, f"DEVICE={settings.device} -> {device}")


def check_port(settings: Settings) -> Check:
    problem = port_problem(settings.host, settings.port)
    if problem:
        return Check("port", False, problem,
                     f"stop the process holding it (`ss -ltnp | grep :{settings.port}`) or set PORT to a free port")
    return Check("port", True, f"{settings.host}:{settings.port} is free")


def check_database(settings: Settings) -> Check:
    from sqlalchemy import text

    from server.store.db import make_engine, redact

    try:
        engine = make_engine(settings)
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # any driver error means "not reachable" here
        return Check("database", False, f"{redact(settings.database_url)}: {str(exc).splitlines()[0]}",
                     "check the server (`pg_isready -h HOST`), credentials and DATABASE_URL; predictions are "
                     "still served while it is down (records spool to SPOOL_DIR)")
    return Check("database", True, f"{redact(settings.database_url)} reachable")


def check_writable(settings: Settings) -> Check:
    targets = [settings.spool_dir] + ([settings.log_file.parent] if settings.log_file else [])
    for directory in targets:
        directory = Path(directory)
        probe = directory if directory.exists() else directory.parent
        if not os.access(probe, os.W_OK):
            return Check("disk", False, f"{directory} is not writable",
                         "fix the permissions or set SPOOL_DIR / LOG_FILE to a writable place")
    return Check("disk", True, "spool and log directories writable")


CHECKS: list[Callable[[Settings], Check]] = [check_model, check_device, check_port, check_database, check_writable]


def run_doctor(overrides: dict[str, object] | None = None, print_fn: Callable[[str], None] = print) -> int:
    """Print one line per check (and its fix); 0 when all pass, 1 otherwise."""
    try:
        settings = load_settings(**(overrides or {}))
    except ConfigError as exc:
        print_fn(f"[FAIL] configuration: {exc}")
        print_fn("       fix: correct the variable named above (see the README's configuration table)")
        return 1
    print_fn("[ok  ] configuration: every environment value is valid")
    failed = 0
    for check in CHECKS:
        result = check(settings)
        print_fn(f"[{'ok' if result.ok else 'FAIL':<4}] {result.name}: {result.detail}")
        if not result.ok:
            failed += 1
            print_fn(f"       fix: {result.fix}")
    return 1 if failed else 0
