"""A real cgroup made as an operator would (root, no namespace of its own), and what a process inside it reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.cgroup import CGROUP_ROOT

ROOT = Path(__file__).resolve().parents[1]


def read_inside_new_cgroup(v1_controller: str, limits: dict[str, str], expression: str) -> str:
    """Make a cgroup (v2 where mounted, else under v1's ``v1_controller``), write ``limits`` (v2 file name: value,
    or v1's where v1), and print the ``server.cgroup`` ``expression`` from a process moved into it; skipped where
    no cgroup can be made. The cgroup is removed after."""
    group = (CGROUP_ROOT if is_v2() else CGROUP_ROOT / v1_controller) / f"sentiment-test-{v1_controller}-{os.getpid()}"
    try:
        group.mkdir()
        for name, value in limits.items():
            (group / name).write_text(value)
    except OSError as error:
        pytest.skip(f"cannot make a {v1_controller} cgroup here: {error}")
    try:
        reader = subprocess.run(
            ["sh", "-c", f"echo $$ > {group}/cgroup.procs && exec {sys.executable} -c "
                         f"'import server.cgroup as c; print({expression})'"],
            capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert reader.returncode == 0, reader.stderr
        return reader.stdout.strip()
    finally:
        group.rmdir()


def is_v2() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists()
