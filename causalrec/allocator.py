"""glibc heap tuning for large CPU tensors (B15): no RecBole, no torch; ``recbole.patches`` applies it to
``Trainer.fit``."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

# ------------------------------------------------------------------------------ CPU allocator (B15)
# glibc serves every block above 32 MiB with a fresh mmap and unmaps it on free (mallopt cannot raise that
# threshold further). A SASRec batch (2048 x 50 x 256 floats = 105 MB per activation) allocates dozens of such
# tensors per step, so each step re-faults gigabytes of zeroed pages: on retail-sim 42 % of a training step was
# kernel time (4 M page faults per 4 steps). Serving them from the heap and not trimming it removes that.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # <malloc.h>
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
MALLOC_ENV = "CAUSALREC_MALLOC_TUNING"
_heap_lock = threading.Lock()
_heap_depth = 0


def _glibc():
    """glibc's ``mallopt``/``malloc_trim``, or None where B15 must not act: not glibc, turned off with
    ``CAUSALREC_MALLOC_TUNING=0``, or the user tuned malloc (``GLIBC_TUNABLES``, ``MALLOC_*_``, a preloaded
    jemalloc/tcmalloc)."""
    import ctypes
    import platform

    if os.environ.get(MALLOC_ENV, "1").lower() in ("0", "false", "no", "off"):
        return None
    if "malloc" in os.environ.get("GLIBC_TUNABLES", "") or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return None
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def heap_allocator_active() -> bool:
    """Whether ``heap_allocator`` is in effect now."""
    return _heap_depth > 0


@contextlib.contextmanager
def heap_allocator() -> Iterator[None]:
    """Inside, glibc serves large blocks from its heap and keeps freed memory for reuse (no mmap per tensor,
    no page faults per step); on exit its default settings come back and the freed memory is returned to the
    OS (``malloc_trim``). Process-wide while active (mallopt is global); nests. A no-op where ``_glibc()`` is
    None. The cost: the process's memory stays at its peak while inside (RecBole's SASRec on retail-sim:
    3.6 GB instead of 3.1 GB peak)."""
    global _heap_depth
    libc = _glibc()
    if libc is None:
        yield
        return
    with _heap_lock:
        if _heap_depth == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # an int: glibc's mallopt takes one
        _heap_depth += 1
    try:
        yield
    finally:
        with _heap_lock:
            _heap_depth -= 1
            if _heap_depth == 0:
                for param, value in _GLIBC_DEFAULTS.items():
                    libc.mallopt(param, value)
                libc.malloc_trim(0)
