"""The container's limits as its cgroup states them (v2 first, then v1), not the host's.

Memory: v2 ``memory.max`` or v1 ``memory.limit_in_bytes``, of the process's own cgroup (``/proc/self/cgroup``)
and of each one above it, the lowest binding: a server in a limited cgroup without a namespace of its own (a
systemd unit's ``MemoryMax=``, ``docker run --cgroupns=host``, a cgroup made by hand) sees the whole hierarchy
at the mount, whose root has no limit; read there alone, its memory plan was the machine's RAM and one legitimate
request got it OOM-killed (red team helper-69). In a container with its own cgroup namespace, its cgroup is the
mount's root. "max", or a number above physical RAM (v1 writes ~2**63 for "unlimited"), means no limit, and
physical RAM is the limit then. Its peak, in the cgroup whose limit binds: v2 ``memory.peak`` (Linux 5.19+) or
v1 ``memory.max_usage_in_bytes``.
CPU: v2 ``cpu.max`` ("quota period") or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, over the same levels.
"""

from __future__ import annotations

import errno
import functools
import math
from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


OUT_OF_FILES = (errno.EMFILE, errno.ENFILE)


def _read_limit(path: Path) -> int | None:
    """The number in ``path``; None where it says "max", holds no number or cannot be read (a level without the
    file). Out of file descriptors is raised, not taken for "no limit": the memory guard would then have weighed
    the RSS against the machine's RAM, and lifted its pressure in the middle of a flood of connections."""
    try:
        text = path.read_text().strip()
    except OSError as error:
        if error.errno in OUT_OF_FILES:
            raise
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def memory_limit_bytes(cgroup_root: Path = CGROUP_ROOT, own_cgroups: Path = PROC_SELF_CGROUP) -> int:
    """The memory limit binding this process in bytes (cgroup v2, then v1), or physical RAM when there is none."""
    binding = _binding_memory_limit(cgroup_root, own_cgroups)
    return binding[0] if binding else _physical_bytes()


@functools.cache
def _physical_bytes() -> int:
    """Physical RAM, read once (/health and every scrape read the limit: 36 us a time for this part alone)."""
    return psutil.virtual_memory().total


def memory_peak_bytes(cgroup_root: Path = CGROUP_ROOT, own_cgroups: Path = PROC_SELF_CGROUP) -> int | None:
    """The peak memory use of the cgroup whose limit binds, as it counts it: what the OOM killer holds against the
    limit, page cache included (the kernel reclaims that before it kills). None outside a memory-limited cgroup,
    or where the kernel keeps no peak."""
    binding = _binding_memory_limit(cgroup_root, own_cgroups)
    return _read_limit(binding[1]) if binding else None


def _binding_memory_limit(cgroup_root: Path, own_cgroups: Path) -> tuple[int, Path] | None:
    """The lowest memory limit below physical RAM over the process's cgroups and their ancestors, with the file
    holding that cgroup's peak; None when no level sets one."""
    physical = _physical_bytes()
    found = []
    for limit_file, peak_file in _memory_files(cgroup_root, own_cgroups):
        limit = _read_limit(limit_file)
        if limit is not None and 0 < limit < physical:
            found.append((limit, peak_file))
    return min(found, key=lambda pair: pair[0]) if found else None


def _memory_files(cgroup_root: Path, own_cgroups: Path) -> list[tuple[Path, Path]]:
    """(limit file, peak file) of each cgroup level that can bind this process: v2 first, then v1's memory
    controller, each from the process's own cgroup up to the mount's root (the root alone when the process's
    cgroup is not under this mount: a container that mounts its own cgroup at the root without a namespace)."""
    v2, v1 = _own_levels(cgroup_root, own_cgroups, "memory")
    return [(directory / "memory.max", directory / "memory.peak") for directory in v2] + \
        [(directory / "memory.limit_in_bytes", directory / "memory.max_usage_in_bytes") for directory in v1]


def _own_levels(cgroup_root: Path, own_cgroups: Path, v1_controller: str) -> tuple[list[Path], list[Path]]:
    """The directories of the process's cgroup and of each one above it: v2's, then v1's ``v1_controller``'s."""
    v2_path, v1_path = _own_cgroup_paths(own_cgroups, v1_controller)
    return _up_to(cgroup_root, v2_path), _up_to(cgroup_root / v1_controller, v1_path)


def _own_cgroup_paths(own_cgroups: Path, v1_controller: str) -> tuple[str, str]:
    """The process's cgroup paths, v2 and v1's ``v1_controller`` ("/" where unknown)."""
    v2 = v1 = "/"
    try:
        lines = own_cgroups.read_text().splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            v2 = path
        elif v1_controller in controllers.split(","):
            v1 = path
    return v2, v1


@functools.lru_cache(maxsize=16)  # the directories change only when the process moves to another cgroup
def _up_to(mount: Path, path: str) -> list[Path]:
    """``mount``/``path`` and each directory above it up to ``mount``; ``mount`` alone when that one is not there
    (or ``path`` leads above the mount: a cgroup outside this namespace)."""
    parts = [part for part in path.split("/") if part]
    own = mount.joinpath(*parts)
    if ".." in parts or not own.is_dir():
        return [mount]
    levels = [own]
    while levels[-1] != mount:
        levels.append(levels[-1].parent)
    return levels


def cpu_quota_cores(cgroup_root: Path = CGROUP_ROOT, own_cgroups: Path = PROC_SELF_CGROUP) -> int | None:
    """The CPU limit binding this process in whole cores, rounded up, or None: the lowest quota over its own cgroup
    and each one above it (cgroup v2 ``cpu.max``, then v1's CFS quota), as for memory (a systemd unit's
    ``CPUQuota=`` or ``docker run --cgroupns=host --cpus`` sets it below the mount's root; read there alone it was
    missed: red team helper-76).

    A container limited to 2 CPUs still sees every host core in its affinity mask; sizing thread pools by
    the mask would oversubscribe the quota and get the process throttled.
    """
    v2, v1 = _own_levels(cgroup_root, own_cgroups, "cpu")
    levels = [(directory / "cpu.max", None) for directory in v2] + \
        [(directory / "cpu.cfs_quota_us", directory / "cpu.cfs_period_us") for directory in v1]
    found = [cores for quota_file, period_file in levels if (cores := _quota_cores(quota_file, period_file))]
    return min(found, default=None)


def _quota_cores(quota_file: Path, period_file: Path | None) -> int | None:
    """One level's quota in whole cores (v2: "quota period" in one file; v1: two files), None when it sets none."""
    try:
        fields = quota_file.read_text().split()
        if period_file is not None:
            fields.append(period_file.read_text().strip())
        quota, period = int(fields[0]) if fields[0] != "max" else -1, int(fields[1])
        return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
    except (OSError, IndexError, ValueError, OverflowError):  # unreadable, or no number a kernel would write
        return None
