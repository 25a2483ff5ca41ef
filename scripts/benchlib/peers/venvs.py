"""Each peer in its own virtual environment outside the project (default ``/work/peers/<name>``).

``ensure_venv`` creates the venv with the given base interpreter and ``pip install``s the peer's
pinned requirements; a marker file holding the requirements makes a second call a no-op. torch is
always pinned (``torch==2.13.0``: the local CPU wheel; an unpinned torch would pull a CUDA build of
several GB). ``installed_versions`` reads versions from the venv's package metadata.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

MARKER = ".side_by_side-requirements"
VERSION_SCRIPT = """
import json, sys
from importlib import metadata
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
print(json.dumps(out))
"""


class InstallError(RuntimeError):
    """A peer's venv could not be created or its requirements installed; the message ends with pip's tail."""


def base_python() -> str:
    """The interpreter this (possibly virtual) environment was made from: peers' venvs start from it."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidate = Path(sys.base_prefix) / "bin" / version
    return str(candidate) if candidate.exists() else getattr(sys, "_base_executable", sys.executable)


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path, requirements: list[str], python: str | None = None, reinstall: bool = False,
                log=print, timeout: float = 3600.0) -> Path:
    """The venv's python, after creating the venv and installing ``requirements`` unless already done."""
    marker, wanted = venv / MARKER, "\n".join(requirements) + "\n"
    py = venv_python(venv)
    if py.exists() and not reinstall and marker.exists() and marker.read_text() == wanted:
        return py
    venv.mkdir(parents=True, exist_ok=True)
    install_log = venv / "install.log"
    with install_log.open("a") as out:
        if not py.exists():
            log(f"creating venv {venv}")
            _run([python or base_python(), "-m", "venv", str(venv)], out, install_log, timeout)
        log(f"installing into {venv}: {' '.join(requirements)}")
        _run([str(py), "-m", "pip", "install", *requirements], out, install_log, timeout)
    marker.write_text(wanted)
    return py


def _run(argv: list[str], out, install_log: Path, timeout: float) -> None:
    out.write(f"$ {' '.join(argv)}\n")
    out.flush()
    try:
        code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    if code != 0:
        tail = "\n".join(install_log.read_text(errors="replace").splitlines()[-15:])
        raise InstallError(f"{argv[0]} {' '.join(argv[1:4])} ... failed ({code}); see {install_log}:\n{tail}")


def installed_versions(python: Path | str, names: list[str]) -> dict[str, str]:
    """``{package: version}`` for those of ``names`` installed where ``python`` runs."""
    out = subprocess.run([str(python), "-c", VERSION_SCRIPT, *names], capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else {}


def libdir(python: Path | str) -> str:
    """The LIBDIR (where libpython lives) of ``python``: Triton's Python backend must load that libpython."""
    if str(python) == sys.executable:
        return sysconfig.get_config_var("LIBDIR") or ""
    code = "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60).stdout.strip()
