"""Shared fixtures: a tiny real artifact, settings pointing at temp dirs, and a live uvicorn server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.benchlib.serverproc import LiveServer, free_port, start_server, stop_server
from server.config import Settings, load_settings
from tests.model_fixtures import build_tiny_artifact

pytest_plugins = ["tests.store_fixtures"]


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    return build_tiny_artifact(tmp_path_factory.mktemp("artifact") / "tiny")


@pytest.fixture
def make_settings(tiny_artifact, tmp_path):
    """Settings for an in-process app: tiny model, SQLite and spool in a temp dir, CPU."""

    def make(**overrides) -> Settings:
        values = dict(
            model_path=tiny_artifact, device="cpu", database_url=f"sqlite:///{tmp_path}/store.db",
            spool_dir=tmp_path / "spool", port=free_port(), intra_op_threads=1,
        )
        values.update(overrides)
        return load_settings(**values)

    return make


@pytest.fixture
def live_server(tiny_artifact, tmp_path) -> Iterator[LiveServer]:
    server = start_server({"MODEL_PATH": str(tiny_artifact)}, tmp_path)
    yield server
    stop_server(server)
