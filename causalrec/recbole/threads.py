"""How many torch threads a run uses: the config key ``num_threads`` (an int, ``auto`` or None).

torch (OpenMP) starts one thread per core and spins at every parallel region's barrier. When another process holds
one of those cores, the thread that shares it arrives late at every barrier and the run slows many times (measured:
33x for the main command's SFT beside one single-threaded job; benchmarks/threads.py). ``auto`` counts the cores
that are busy when the run starts and leaves them alone (and stays within a container's CPU quota); on a quiet
machine it is torch's own count. A job that starts later is caught by ``ThreadGovernor``: after every optimizer step
and every evaluation batch (``tick``) it looks (at most every 10 s) at what other processes used since its last
look, and moves the count when two looks in a row agree.
"""

from __future__ import annotations

import logging
import math
import os
import time

_log = logging.getLogger(__name__)
_SAMPLE_SECONDS = 0.25
_CHECK_SECONDS = 10.0
_TAKEN_WHILE_RUNNING = 0.25  # of a core, for ThreadGovernor (at start: half)


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


def auto_threads(cores: int, busy: float, taken_from: float = 0.5) -> int:
    """Threads for ``cores`` cores of which ``busy`` are in use: one per core left free (a core counts as taken from
    ``taken_from`` of its time), at least one."""
    return max(1, cores - math.floor(busy + 1.0 - taken_from))


def _omp_threads() -> int | None:
    """``OMP_NUM_THREADS`` where the environment sets a count (the user's choice, and the test suite's)."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(omp) if omp.isdigit() and int(omp) >= 1 else None


def measured(value) -> bool:
    """Whether ``num_threads: value`` is decided by measuring the machine (``auto`` without ``OMP_NUM_THREADS``),
    so that ``ThreadGovernor`` may keep adjusting it."""
    return value == "auto" and _omp_threads() is None


def resolve_num_threads(value) -> int | None:
    """The thread count ``num_threads`` asks for: an int as given; ``auto``: ``OMP_NUM_THREADS`` where the
    environment sets it (the user's choice, and the test suite's), else one per core free now; None: leave torch's
    setting alone."""
    if value is None:
        return None
    if value == "auto":
        omp = _omp_threads()
        if omp is not None:
            return omp
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


def ceiling_threads(cores: list[int] | None = None) -> int:
    """The most threads ``auto`` uses: one per allowed core, within the cgroup's CPU quota."""
    n = len(cores if cores is not None else allowed_cores())
    quota = quota_cores()
    return min(n, quota) if quota is not None else n


class ThreadGovernor:
    """Keeps an ``auto`` thread count right while a run goes on.

    ``check()`` measures how many of ``cores`` other processes kept busy since the last measurement (the cores'
    busy time from /proc/stat minus this process's own CPU time) and sets torch's thread count to ``auto_threads``
    of it, within ``ceiling``, once two measurements in a row ask for the same new count (one busy burst does not
    move it). ``tick()`` calls ``check()`` at most every ``interval_s`` seconds. Both must run on the thread that
    runs torch: OpenMP's thread count belongs to the calling thread.
    """

    def __init__(
        self,
        threads: int,
        cores: list[int] | None = None,
        *,
        ceiling: int | None = None,
        interval_s: float = _CHECK_SECONDS,
        stat_path: str = "/proc/stat",
        clock=time.monotonic,
        cpu_clock=time.process_time,
        set_threads=None,
    ):
        import torch

        self.threads = threads
        self.cores = cores if cores is not None else allowed_cores()
        self.ceiling = ceiling if ceiling is not None else ceiling_threads(self.cores)
        self.interval_s = interval_s
        self._stat_path = stat_path
        self._clock, self._cpu_clock = clock, cpu_clock
        self._set_threads = set_threads or torch.set_num_threads
        self._ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._pending: int | None = None
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        """(wall s, this process's CPU s, the cores' busy s), or None without /proc/stat."""
        try:
            times = _cpu_times(self._stat_path)
        except (OSError, ValueError, IndexError):
            return None
        busy = sum(times[c][0] for c in self.cores if c in times) / self._ticks
        return self._clock(), self._cpu_clock(), busy

    def others(self, before, after) -> float:
        """Cores other processes kept busy between two samples."""
        wall = after[0] - before[0]
        if wall <= 0:
            return 0.0
        return max(0.0, ((after[2] - before[2]) - (after[1] - before[1])) / wall)

    def check(self) -> int | None:
        """Measure now; returns the new thread count when it changed, else None."""
        now = self._sample()
        if now is None or self._last is None or now[0] <= self._last[0]:
            return None  # no time passed: nothing measured
        busy = self.others(self._last, now)
        self._last = now
        # a quarter of a core is enough: while the run holds every core, a process in another session (scheduler
        # autogroup) gets about half of one beside two spinning threads, sometimes a little less
        target = min(self.ceiling, auto_threads(len(self.cores), busy, taken_from=_TAKEN_WHILE_RUNNING))
        _log.debug(
            "thread governor: %.2f of %d cores busy with other work; %d thread(s), target %d",
            busy,
            len(self.cores),
            self.threads,
            target,
        )
        if target == self.threads:
            self._pending = None
            return None
        if target != self._pending:
            self._pending = target  # wait for a second look
            return None
        _log.info(
            "num_threads auto: %d -> %d thread(s), %.1f of %d cores busy with other work",
            self.threads,
            target,
            busy,
            len(self.cores),
        )
        self._set_threads(target)
        self.threads, self._pending = target, None
        return target

    def tick(self, *_args, **_kwargs) -> None:
        """``check()`` when ``interval_s`` has passed since the last look (an optimizer step post-hook)."""
        if self._last is not None and self._clock() - self._last[0] >= self.interval_s:
            self.check()


_governor: tuple[ThreadGovernor, object] | None = None


def govern_threads(threads: int | None) -> ThreadGovernor | None:
    """Start watching an ``auto`` count (``threads``; None: stop): ``tick`` after every optimizer step, the
    training loops of RecBole and of TRL alike. One governor per process; a new run replaces the last one's."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    global _governor
    if _governor is not None:
        _governor[1].remove()
        _governor = None
    if threads is None:
        return None
    governor = ThreadGovernor(threads)
    handle = register_optimizer_step_post_hook(governor.tick)
    _governor = (governor, handle)
    return governor


def tick() -> None:
    """The running governor's ``tick`` (without one: nothing), for loops that take no optimizer step: evaluation's
    batches (``tick_between_batches``)."""
    if _governor is not None:
        _governor[0].tick()


def tick_between_batches(collector) -> None:
    """``tick`` before each batch a RecBole ``Collector`` collects: every evaluation (validation inside ``fit``,
    the test) goes through it batch by batch, for classical and LLM models alike."""
    collect = collector.eval_batch_collect

    def eval_batch_collect(*args, **kwargs):
        tick()
        return collect(*args, **kwargs)

    collector.eval_batch_collect = eval_batch_collect
