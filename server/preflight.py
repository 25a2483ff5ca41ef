"""Checks made before the server listens: each failure is one logged line and its own exit code."""

from __future__ import annotations

import logging

from server.config import Settings
from server.exitcodes import ExitCode

log = logging.getLogger("server.cli")


def preflight(settings: Settings) -> int:
    """0 when the server can start; otherwise the exit code of the first failure (already logged)."""
    from server.artifact import ArtifactError, load_artifact
    from server.doctor import port_problem
    from server.engine import EngineStartError, resolve_device

    problem = port_problem(settings.host, settings.port)
    if problem:
        log.error("cannot start: %s; stop the other process or set PORT to a free port", problem)
        return ExitCode.PORT
    try:  # fail fast with one line, before uvicorn wraps the error in a lifespan traceback
        load_artifact(settings.model_path)
    except ArtifactError as exc:
        log.error("cannot start: %s", exc)
        return ExitCode.MODEL
    try:
        resolve_device(settings)
    except EngineStartError as exc:
        log.error("cannot start: %s", exc)
        return ExitCode.DEVICE
    return ExitCode.OK
