"""How many torch threads a run uses: the CPUs it may actually run on, unless OMP_NUM_THREADS says otherwise.

torch defaults to every core of the machine, even when the process is pinned to fewer (taskset,
Slurm) or limited by a cgroup CPU quota (containers); threads beyond that only wait on each other.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

log = logging.getLogger("tfmq_exp")


def affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (v2 cpu.max or v1 cfs quota), None when unlimited."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1q, v1p = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if v1q.is_file() and v1p.is_file():
            quota = int(v1q.read_text())
            return None if quota <= 0 else quota / int(v1p.read_text())
    except (OSError, ValueError):
        pass
    return None


def usable_cpus(root: Path = Path("/sys/fs/cgroup")) -> int:
    n = affinity_cpus()
    quota = cgroup_cpus(root)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def configure_threads() -> tuple[int, str]:
    """Set torch's intra-op threads and log how many and why; returns (threads, reason)."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env:
        n, reason = torch.get_num_threads(), f"OMP_NUM_THREADS={env}"
    else:
        n = usable_cpus()
        quota = cgroup_cpus()
        reason = f"CPUs this process may use: affinity {affinity_cpus()}, cgroup quota " + (
            "none" if quota is None else f"{quota:g}")
        torch.set_num_threads(n)
    log.info("torch threads: %d (%s)", n, reason)
    return n, reason
