"""How many torch threads a run uses: the config key ``num_threads`` (an int, ``auto`` or None).

torch (OpenMP) starts one thread per core and spins at every parallel region's barrier. When another process holds
one of those cores, the thread that shares it arrives late at every barrier and the run slows many times (measured:
33x for the main command's SFT beside one single-threaded job; benchmarks/threads.py). ``auto`` counts the cores
that are busy when the run starts and leaves them alone (and stays within a container's CPU quota); on a quiet
machine it is torch's own count.
"""

from __future__ import annotations

import logging
import math
import os
import time

_log = logging.getLogger(__name__)
_SAMPLE_SECONDS = 0.25


def allowed_cores() -> list[int]:
    """The CPUs this process may run on (its affinity mask; all of them where the OS has none)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return list(range(os.cpu_count() or 1))


def _cpu_times(path: str = "/proc/stat") -> dict[int, tuple[int, int]]:
    """``{cpu: (busy jiffies, total jiffies)}`` from /proc/stat (idle and iowait count as not busy)."""
    times = {}
    with open(path) as f:
        for line in f:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            values = [int(v) for v in fields[:8]]
            idle = values[3] + values[4]
            times[int(name[3:])] = (sum(values) - idle, sum(values))
    return times


def busy_cores(cores: list[int], sample_s: float = _SAMPLE_SECONDS, path: str = "/proc/stat") -> float:
    """How many of ``cores`` other processes keep busy, measured over ``sample_s`` seconds (this process sleeps
    meanwhile, so it does not count itself). Without /proc/stat: the 1-minute load average, capped at the cores."""
    try:
        before = _cpu_times(path)
        time.sleep(sample_s)
        after = _cpu_times(path)
    except (OSError, ValueError, IndexError):
        try:
            return min(float(len(cores)), os.getloadavg()[0])
        except (AttributeError, OSError):
            return 0.0
    busy = 0.0
    for cpu in cores:
        if cpu in before and cpu in after:
            d_busy, d_total = (a - b for a, b in zip(after[cpu], before[cpu]))
            busy += d_busy / d_total if d_total > 0 else 0.0
    return busy


def quota_cores(root: str = "/sys/fs/cgroup") -> int | None:
    """The CPU quota of this process's cgroup in whole cores (a container's ``--cpus``), or None where none is set:
    the affinity mask still lists every host core there, and torch's default would start a thread on each."""
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        quota, period = open(os.path.join(root, "cpu.max")).read().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:  # cgroup v1: a quota of -1 means none
        quota = int(open(os.path.join(root, "cpu", "cpu.cfs_quota_us")).read())
        period = int(open(os.path.join(root, "cpu", "cpu.cfs_period_us")).read())
        return None if quota <= 0 or period <= 0 else max(1, math.ceil(quota / period))
    except (OSError, ValueError):
        return None


def auto_threads(cores: int, busy: float) -> int:
    """Threads for ``cores`` cores of which ``busy`` are in use: one per core left free (a core counts as busy from
    half its time), at least one."""
    return max(1, cores - math.floor(busy + 0.5))


def resolve_num_threads(value) -> int | None:
    """The thread count ``num_threads`` asks for: an int as given; ``auto``: ``OMP_NUM_THREADS`` where the
    environment sets it (the user's choice, and the test suite's), else one per core free now; None: leave torch's
    setting alone."""
    if value is None:
        return None
    if value == "auto":
        omp = os.environ.get("OMP_NUM_THREADS", "").strip()
        if omp.isdigit() and int(omp) >= 1:
            return int(omp)
        cores = allowed_cores()
        busy = busy_cores(cores)
        threads = auto_threads(len(cores), busy)
        quota = quota_cores()
        if quota is not None and quota < threads:
            threads = quota
            _log.info("num_threads auto: %d thread(s), the cgroup's CPU quota", threads)
        else:
            _log.info("num_threads auto: %d thread(s), %.1f of %d cores busy at start", threads, busy, len(cores))
        return threads
    return int(value)
