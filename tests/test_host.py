"""fashion.host: what the process may use, and how its memory is handed out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fashion.host import KEEP_FREED_ENV, usable_cores

# A 64 MiB array (above glibc's largest mmap threshold, as a batch's activations are), freed: does the
# process keep its pages for the next one, or hand them back to the kernel to be mapped and zeroed again?
FREED_AND_KEPT = """
import json
import numpy as np
from fashion.host import keep_freed_memory
def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
applied = keep_freed_memory()
a = np.ones(64 << 20, dtype=np.uint8)
held = rss_mib()
del a
print(json.dumps({"applied": applied, "given_back_mib": held - rss_mib()}))
"""


def freed(keep: str) -> dict[str, object]:
    env = {**os.environ, KEEP_FREED_ENV: keep}
    command = [sys.executable, "-c", FREED_AND_KEPT]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc: Linux only")
def test_freed_activations_stay_with_the_process_instead_of_being_unmapped_and_zeroed_again():
    """PyTorch's CPU inference frees and re-allocates activations above glibc's mmap threshold every
    batch; kept, the next batch reuses the pages instead of faulting in freshly zeroed ones."""
    kept = freed("1")
    if not kept["applied"]:
        pytest.skip("this libc has no mallopt (not glibc)")
    default = freed("0")
    assert default["applied"] is False
    assert default["given_back_mib"] > 60  # unmapped at once
    assert kept["given_back_mib"] < 4


def test_usable_cores_are_the_affinity_capped_by_a_cgroup_cpu_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == affinity
    cpu_max.write_text("50000 100000\n")  # half a CPU: one
    assert usable_cores(cpu_max) == 1
    cpu_max.write_text(f"{(affinity + 8) * 100000} 100000\n")  # a quota above the affinity
    assert usable_cores(cpu_max) == affinity
    assert usable_cores(tmp_path / "absent") == affinity
