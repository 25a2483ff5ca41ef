"""The container's limits as its cgroup states them (v2 first, then v1), not the host's.

Memory: v2 ``memory.max`` or v1 ``memory.limit_in_bytes``. "max", or a number above physical RAM (v1 writes
~2**63 for "unlimited"), means no cgroup limit, and physical RAM is the limit then. Its peak: v2
``memory.peak`` (Linux 5.19+) or v1 ``memory.max_usage_in_bytes``.
CPU: v2 ``cpu.max`` ("quota period") or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``.
"""

from __future__ import annotations

import math
from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def memory_limit_bytes(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The container's memory limit in bytes (cgroup v2, then v1), or physical RAM when there is none."""
    physical = psutil.virtual_memory().total
    for path in (cgroup_root / "memory.max", cgroup_root / "memory" / "memory.limit_in_bytes"):
        limit = _read_limit(path)
        if limit is not None and 0 < limit < physical:
            return limit
    return physical


def memory_peak_bytes(cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """The container's peak memory use as its cgroup counts it: what the OOM killer holds against the limit, page
    cache included (the kernel reclaims that before it kills). None outside a memory-limited cgroup, or where
    the kernel keeps no peak."""
    physical = psutil.virtual_memory().total
    v1 = cgroup_root / "memory"
    for limit_file, peak_file in ((cgroup_root / "memory.max", cgroup_root / "memory.peak"),
                                  (v1 / "memory.limit_in_bytes", v1 / "memory.max_usage_in_bytes")):
        limit = _read_limit(limit_file)
        if limit is not None and 0 < limit < physical:
            return _read_limit(peak_file)
    return None


def cpu_quota_cores(cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """The container's CPU limit in whole cores (cgroup v2 ``cpu.max``, then v1 CFS quota), rounded up, or None.

    A container limited to 2 CPUs still sees every host core in its affinity mask; sizing thread pools by
    the mask would oversubscribe the quota and get the process throttled.
    """
    v1 = cgroup_root / "cpu"
    for quota_file, period_file in ((cgroup_root / "cpu.max", None),
                                    (v1 / "cpu.cfs_quota_us", v1 / "cpu.cfs_period_us")):
        try:
            fields = quota_file.read_text().split()
            if period_file is not None:
                fields.append(period_file.read_text().strip())
            quota, period = fields[0], int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
        if quota in ("max", "-1") or period <= 0:
            return None
        return max(1, math.ceil(int(quota) / period))
    return None
