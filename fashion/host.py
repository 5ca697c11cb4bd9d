"""What this host lets the process use: the CPUs it may run on, not the machine's count.

``os.cpu_count()`` is the host's CPU count; in a container with ``--cpus 2`` or a pod with a CPU limit of 2 on
a 64-core node it says 64, and anything sized by it (threads, streams, workers) oversubscribes the quota.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def usable_cores(cpu_max: Path = CPU_MAX) -> int:
    """The CPUs this process may use: its affinity (a cpuset), capped by a cgroup v2 CPU quota (a
    container's ``--cpus``, a pod's CPU limit, rounded up), not the host's count."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return cores
