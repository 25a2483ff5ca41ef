"""Chaos runs against a real server: SIGKILL, database outages, a full spool disk, two processes on one
SPOOL_DIR, a restart on another DATABASE_URL, NUL text, a large spool at start. For every request the
clients sent, counts from both sides whether an answered prediction was recorded exactly once.

    python scripts/chaos.py --backend sqlite,postgresql --mode ack,async --runs 5 \\
        --update-doc docs/RELIABILITY.md

Prints a table (scenario, backend, durability mode, load, requests answered / stored / lost / duplicated)
and writes it as markdown (bench_results/chaos/chaos.md). Needs the dev extras (aiohttp, pytest-postgresql,
psycopg) and, for PostgreSQL, its server binaries (apt-get install postgresql); the tmpfs scenario needs root.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.benchlib.chaos.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
