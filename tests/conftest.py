"""Shared fixtures: a tiny real artifact, settings pointing at temp dirs, and a live uvicorn server."""

from __future__ import annotations

import subprocess
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


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs (we run as root in CI); skipped where mounting is not allowed."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}); the injected "
                    "ENOSPC tests cover the same code")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)
