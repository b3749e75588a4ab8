"""How many CPU threads TVM's kernels use.

TVM's runtime, left alone, uses half the logical CPUs on x86 (it assumes every core has two hardware
threads): on a 2-core machine without SMT that is one thread. It also pins its workers to cores, which
turns any other busy process on a pinned core into a straggler that the whole parallel loop waits for.
We start TVM with one worker per physical core, unpinned, unless the user's environment says otherwise.
TVM reads these variables when a thread first launches parallel work, so this must run before that.
"""

from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    """Distinct physical cores this process may run on (logical CPUs when the topology is unknown)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = set()
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            return len(allowed) or os.cpu_count() or 1
    return len(cores) or os.cpu_count() or 1


def configure_threads(threads: int | None = None) -> int:
    """Set TVM's thread count (default: TVM_NUM_THREADS if set, else the physical cores); returns it."""
    if threads is not None and threads < 1:
        from ..errors import MegrezError

        raise MegrezError(f"--threads must be at least 1, got {threads}")
    if threads is None:
        threads = int(os.environ.get("TVM_NUM_THREADS") or physical_cores())
    os.environ["TVM_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    return threads
