"""The number of threads the process may use, and the one pool that splits work by rows.

``count()`` is, unless ``set_count(n)`` (the commands' ``--threads``) or ``QCONVERT_THREADS`` says otherwise,
the CPUs this process may run on: its affinity mask (``taskset``), capped by the cgroup CPU quota (v2
``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``, rounded up). ``split`` cuts [0, n) into one
contiguous range per thread, so each range's result is what one thread would compute: results do not depend
on the thread count (tests/test_threads.py). ``sync_libraries()`` gives numpy's BLAS (prefill products) and
torch, when loaded, the same count.
"""
from __future__ import annotations

import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from threadpoolctl import ThreadpoolController

_CGROUP = Path("/sys/fs/cgroup")
_override: int | None = None
_detected: int | None = None  # available(), read once: count() is asked for every product the decoder runs
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_blas: ThreadpoolController | None = None
_blas_count: int | None = None


def _quota(root: Path = _CGROUP) -> int | None:
    """CPUs allowed by the cgroup CPU quota (rounded up), or None when unlimited / unknown."""
    try:
        text = (root / "cpu.max").read_text().split()  # v2: "max 100000" or "200000 100000"
        if text and text[0] != "max":
            return max(1, math.ceil(int(text[0]) / int(text[1])))
        return None
    except (OSError, ValueError, IndexError):
        pass
    for d in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            q = int((d / "cpu.cfs_quota_us").read_text())
            p = int((d / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return max(1, math.ceil(q / p)) if q > 0 and p > 0 else None
    return None


def available(root: Path = _CGROUP) -> int:
    """The CPUs this process may use: affinity mask capped by the cgroup quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    q = _quota(root)
    return max(1, min(n, q) if q else n)


def count() -> int:
    """Threads every kernel uses: ``set_count``'s value, else ``QCONVERT_THREADS``, else ``available()`` (as it
    was at the first call)."""
    global _detected
    if _override is not None:
        return _override
    env = os.environ.get("QCONVERT_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    if _detected is None:
        _detected = available()
    return _detected


def set_count(n: int | None) -> None:
    """Use ``n`` threads from now on (None: back to the default)."""
    global _override
    if n is not None and n < 1:
        raise ValueError(f"--threads must be at least 1, got {n}")
    _override = n


def sync_libraries() -> int:
    """Make numpy's BLAS and torch (when it is loaded) use ``count()`` threads; returns the count. Cheap when
    nothing changed, so callers run it before each BLAS or torch product."""
    global _blas, _blas_count
    n = count()
    if n != _blas_count:
        if _blas is None:
            _blas = ThreadpoolController()
        _blas.limit(limits=n, user_api="blas")
        _blas_count = n
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def pool() -> ThreadPoolExecutor | None:
    """The shared pool of ``count() - 1`` workers (the caller is the last thread), or None for one thread."""
    global _pool, _pool_size
    n = count() - 1
    if n < 1:
        return None
    if _pool is None or _pool_size != n:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_size = ThreadPoolExecutor(n, thread_name_prefix="qconvert"), n
    return _pool


def split(fn: Callable[[int, int], None], n: int, min_rows: int = 1) -> None:
    """Run ``fn(start, stop)`` over [0, n) in contiguous ranges of at least ``min_rows`` rows, one per thread
    (the caller takes the first); numpy and the C kernels release the GIL, so the ranges run at once."""
    parts = min(count(), n // max(1, min_rows))
    p = pool() if parts > 1 else None
    if p is None:
        fn(0, n)
        return
    cuts = [n * i // parts for i in range(parts + 1)]
    futs = [p.submit(fn, cuts[i], cuts[i + 1]) for i in range(1, parts)]
    try:
        fn(cuts[0], cuts[1])
    finally:
        for f in futs:
            f.result()
