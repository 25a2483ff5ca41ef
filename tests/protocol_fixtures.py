"""A real server for the protocol tests: uvicorn in a subprocess, AUTH_MODE=required, SQLite, one predict key."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from scripts.benchlib.serverproc import LiveServer, start_server


@dataclass
class KeyedServer:
    live: LiveServer
    database: Path
    key: str
    key_id: str

    @property
    def url(self) -> str:
        return self.live.url

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def start_keyed_server(artifact: Path, tmp: Path, **env: str) -> KeyedServer:
    database = tmp / "store.db"
    live = start_server({"MODEL_PATH": str(artifact), "DATABASE_URL": f"sqlite:///{database}",
                         "AUTH_MODE": "required", "LOG_LEVEL": "WARNING", **env}, tmp)
    created = subprocess.run([sys.executable, "-m", "server.cli", "keys", "create", "--database-url",
                              f"sqlite:///{database}", "--name", "protocol-tests", "--role", "predict"],
                             capture_output=True, text=True, timeout=60, check=True)
    key_id = re.search(r"id=(\S+)", created.stdout)
    assert key_id, created.stdout
    return KeyedServer(live, database, created.stdout.strip().splitlines()[-1], key_id.group(1))


def stored_rows(database: Path, request_id: str, count: int, timeout: float = 30.0) -> list[dict]:
    """The prediction rows of ``request_id`` once there are ``count`` (the writer commits within about a second)."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
            connection.row_factory = sqlite3.Row
            rows = [dict(row) for row in connection.execute(
                "SELECT * FROM predictions WHERE request_id = ? ORDER BY created_at", (request_id,))]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)
