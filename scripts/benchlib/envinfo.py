"""The environment a measurement ran in: CPU, cores, threads, library versions, GPU."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("numpy", "onnxruntime", "onnxruntime-gpu", "tokenizers", "torch", "transformers", "aiohttp")
_PRINTED = {"cpu", "logical_cpus", "usable_cpus", "threads", "python", "platform", "packages", "gpus"}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    """CPUs this process may run on (affinity), which is what thread counts should follow."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed versions, read from package metadata without importing anything."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def gpu_names() -> list[str]:
    """GPU names from nvidia-smi; empty when there is none or no driver."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def environment(threads: int | None = None) -> dict:
    """Everything the header prints, as a dict for the JSON report."""
    env = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "gpus": gpu_names(),
    }
    if threads is not None:
        env["threads"] = threads
    return env


def header(env: dict) -> str:
    """'# '-prefixed lines describing ``env``; keys a caller added (e.g. providers) get a line each."""
    threads = f", threads used: {env['threads']}" if "threads" in env else ""
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items())
    lines = [
        f"# CPU: {env['cpu']} ({env['logical_cpus']} logical, {env['usable_cpus']} usable{threads})",
        f"# python {env['python']} on {env['platform']}",
        f"# {packages}",
        f"# GPU: {'; '.join(env['gpus']) or 'none'}",
    ]
    lines.extend(f"# {key}: {value}" for key, value in env.items() if key not in _PRINTED)
    return "\n".join(lines)

