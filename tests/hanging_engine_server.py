"""``python -m tests.hanging_engine_server``: ``sentiment-analyzer serve`` whose engine hangs once ``HANG_FILE`` exists.

Test-only, never shipped: the drain's time limit needs an engine call that never returns, in a real process
stopped by a real SIGTERM. Until the file exists (model load, warm-up) the engine runs normally. With ``HANG_S``
set, each engine call made while the file exists waits that many seconds instead of forever (a slow engine: a
server held busy, tests/test_client_left.py).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import numpy as np

import server.app
from server.cli import main


class HangingEngine:
    def __init__(self, engine, hang_file: Path, hang_s: float | None = None) -> None:
        self.engine = engine
        self.hang_file = hang_file
        self.hang_s = hang_s  # None: forever

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if self.hang_file.exists():
            threading.Event().wait(self.hang_s)  # without HANG_S, never returns
        return self.engine.run(input_ids, attention_mask)


def with_hanging_engine(create_app, hang_file: Path, hang_s: float | None = None):
    return lambda settings: create_app(settings, wrap_engine=lambda engine: HangingEngine(engine, hang_file, hang_s))


if __name__ == "__main__":
    hang_s = float(os.environ["HANG_S"]) if os.environ.get("HANG_S") else None
    server.app.create_app = with_hanging_engine(server.app.create_app, Path(os.environ["HANG_FILE"]), hang_s)
    sys.exit(main(["serve"]))
