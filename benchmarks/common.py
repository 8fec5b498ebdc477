"""Shared pieces of the benchmarks: timing, memory measurement, child processes, machine facts, output.

Measurement rules, used by every benchmark:

* Variants that are compared run in the same process, interleaved (A B A B ...), and the summary reports
  medians and ratios of medians: the machine is shared, so absolute times drift, ratios much less.
* Peak memory of a torch computation is measured two ways. ``rss_peak_delta_bytes``: the high-water mark of
  the process's resident memory during it (kernel ``VmHWM``, reset just before) above the resident memory at
  its start (free heap first returned to the OS with ``malloc_trim``), i.e. physical memory actually touched.
  ``tensor_peak_bytes``: the peak of the bytes held by tensors allocated during it, replayed from the
  allocation stream of ``torch.profiler`` (``profile_memory=True``), which also counts allocated-but-untouched
  buffers. Python's ``tracemalloc`` does not see torch's C++ allocations, and plain RSS keeps freed heap
  memory (glibc), so neither measures a training step.
* Peak memory of a whole command is the peak RSS of its process (``ru_maxrss`` from ``os.wait4``, which
  includes the command's own children), in a fresh process per measurement, forked from a small wrapper: a
  child forked straight from the benchmark process would start its ru_maxrss at the benchmark's own RSS.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

_log = logging.getLogger("benchmarks")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
ONLINE_RETAIL = SHARED_DATASETS / "online_retail_uci" / "online_retail.csv.gz"
SCHEMA_VERSION = 1


# ------------------------------------------------------------------------------------------- timing
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def timings(values: Sequence[float]) -> dict[str, Any]:
    """Summary of repeated timings in seconds: median, min, max, n (and the raw values)."""
    vals = [float(v) for v in values]
    return {
        "median_s": median(vals),
        "min_s": min(vals) if vals else None,
        "max_s": max(vals) if vals else None,
        "n": len(vals),
        "values_s": [round(v, 6) for v in vals],
    }


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def timed_cpu(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result). With one thread, CPU time is what the work costs
    when the core is not shared: other jobs on the machine inflate wall time much more than CPU time."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def interleaved(
    variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time each variant ``repeats`` times, rotating the order every round (A B C, B C A, ...), after
    ``warmup`` untimed rounds; returns (wall seconds, CPU seconds) per variant."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            w, c, _ = timed_cpu(variants[name])
            wall[name].append(w)
            cpu[name].append(c)
    return wall, cpu


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


# ------------------------------------------------------------------------------------------- memory
def tensor_peak_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Peak bytes held by CPU tensors allocated while ``fn`` runs (relative to its start), and its result.

    Replays the allocation events of ``torch.profiler`` (each carries the allocator's running total, which
    starts at 0 when profiling starts); tensors that existed before (parameters, optimizer state) are not
    counted, tensors freed before the peak are. One profiled run; the profiler slows it, so time separately.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    peak = 0

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    for event in walk(prof.profiler.kineto_results.experimental_event_tree()):
        if event.tag == _EventType.Allocation and str(event.extra_fields.device) == "cpu":
            peak = max(peak, int(event.extra_fields.total_allocated))
    return peak, out


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def rss_peak_delta_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Peak resident memory (physical pages actually touched) while ``fn`` runs, above the resident memory
    just before it, and its result (Linux only).

    Free heap memory is first returned to the OS (glibc ``malloc_trim``), so the starting RSS is live memory,
    then the kernel's high-water mark is reset (``/proc/self/clear_refs``, value 5) and read after ``fn``
    (``VmHWM``). Unlike tensor bytes, it does not count allocated-but-never-touched buffers.
    """
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_bytes("VmRSS")
    out = fn()
    return _status_bytes("VmHWM") - before, out


def tensor_bytes(tensors: Iterable) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------------ child processes
@dataclass
class ChildResult:
    """A finished child process: exit code, wall seconds, CPU seconds (user + system, its children included),
    peak RSS (bytes), output (both streams)."""

    returncode: int
    wall_s: float
    peak_rss_bytes: int
    output: str
    timed_out: bool = False
    cpu_s: float = 0.0


# Runs the command and reports its rusage. A child's ru_maxrss starts at the RSS of the process that forked it
# (Linux records the old memory's high-water mark at exec), so the measured command is forked from this small
# interpreter, not from the benchmark process (which may hold gigabytes by then).
_WRAPPER = """
import json, os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
code = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as fh:
    json.dump({"returncode": code, "maxrss_kb": usage.ru_maxrss, "cpu_s": usage.ru_utime + usage.ru_stime}, fh)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_child(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
) -> ChildResult:
    """Run ``cmd`` (output to a temp file, no pipe deadlock); peak RSS and CPU time are those of that command and
    its own children (``os.wait4`` in a small wrapper process, see ``_WRAPPER``). On timeout the wrapper's whole
    process group (wrapper and command) is killed."""
    import signal
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-child-") as tmp:
        report = Path(tmp) / "rusage.json"
        with open(Path(tmp) / "output.log", "w+b") as log:
            start = time.perf_counter()  # the child inherits this process's niceness
            proc = subprocess.Popen(
                [sys.executable, "-c", _WRAPPER, str(report), *cmd],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
            killed = threading.Event()
            timer = None
            if timeout:

                def kill():
                    killed.set()
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)

                timer = threading.Timer(timeout, kill)
                timer.start()
            try:
                proc.wait()
            finally:
                if timer is not None:
                    timer.cancel()
            wall = time.perf_counter() - start
            log.seek(0)
            output = log.read().decode("utf-8", errors="replace")
        usage = json.loads(report.read_text()) if report.is_file() else {}
    return ChildResult(
        int(usage.get("returncode", proc.returncode)),
        wall,
        int(usage.get("maxrss_kb", 0)) * 1024,
        output,
        killed.is_set(),
        float(usage.get("cpu_s", 0.0)),
    )


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
        }
    )
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------ machine
def machine_info() -> dict[str, Any]:
    import torch

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) * 1024
    versions = {}
    for name in ("torch", "transformers", "trl", "faiss-cpu", "pandas", "numpy"):
        with contextlib.suppress(Exception):
            import importlib.metadata as md

            versions[name] = md.version(name)
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "memory_bytes": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "nice": os.nice(0),
        "versions": versions,
    }


def set_threads(n: int) -> None:
    """Intra-op threads for torch (and faiss, when imported)."""
    import torch

    torch.set_num_threads(n)
    with contextlib.suppress(Exception):
        import faiss

        faiss.omp_set_num_threads(n)


# ------------------------------------------------------------------------------------------- output
def write_json(path: Path, payload: Any) -> None:
    """Atomic: temp file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return lines


def mib(n: float | int | None) -> float | None:
    return None if n is None else float(n) / 2**20


def skipped(name: str, message: str, config: dict[str, Any]) -> dict[str, Any]:
    """The payload of a benchmark that measured nothing (its data or platform is missing), saying why."""
    log_progress("%s: skipped: %s", name, message)
    return {"benchmark": name, "skipped": message, "config": config, "goals": [], "results": {}, "notes": []}


def log_progress(message: str, *args) -> None:
    _log.info(message, *args)
    sys.stderr.flush()
