"""Memory-mapped tensor bytes for the decoders, and the two I/O helpers every reader shares.

The decoders work on weights as stored: ``MappedFile.view`` gives a read-only numpy view of a byte range
of the file (nothing is read until it is touched), and ``release`` drops a view's pages from the process
again (``madvise(MADV_DONTNEED)``: the page cache keeps them, so the next touch is a cheap re-map, and
under memory pressure the kernel can reclaim them). A decoder that releases each layer after use holds
one layer of weights, whatever the model's size. Conversions keep reading with ``pread_exact`` (no
mapping: only the chunk being converted is ever in memory).
"""
from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np

from formats.errors import QConvertError

PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_READ_MAX = 1 << 30  # one read() on Linux returns at most ~2 GiB: read in pieces below that

_MAPPED: dict[int, tuple[int, int]] = {}  # live mappings: id -> [start, end) address range
try:
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _libc.madvise.restype = ctypes.c_int
except (OSError, AttributeError):  # not glibc: release() becomes a no-op
    _libc = None


def pread_exact(fd: int, n: int, offset: int, path: str, what: str) -> np.ndarray:
    """``n`` bytes at ``offset`` of an open file as a uint8 array, in reads of at most 1 GiB each (a single
    read() stops near 2 GiB); QConvertError naming ``path`` and ``what`` if the file ends early."""
    if n <= _READ_MAX:
        buf = os.pread(fd, n, offset)
        if len(buf) != n:
            raise QConvertError(f"{path}: short read in {what} ({len(buf)} of {n} bytes at offset {offset}); "
                                "the file is truncated, download or convert it again")
        return np.frombuffer(buf, dtype=np.uint8)
    out = np.empty(n, np.uint8)
    done = 0
    while done < n:
        got = os.preadv(fd, [memoryview(out[done:done + min(_READ_MAX, n - done)])], offset + done)
        if got <= 0:
            raise QConvertError(f"{path}: short read in {what} ({done} of {n} bytes at offset {offset}); "
                                "the file is truncated, download or convert it again")
        done += got
    return out


class MappedFile:
    """One file mapped read-only; ``view(offset, nbytes)`` hands out uint8 views of it."""

    def __init__(self, path: str):
        self.path = path
        fd = os.open(path, os.O_RDONLY)
        try:
            self.size = os.fstat(fd).st_size
            self.mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if self.size else None
        finally:
            os.close(fd)
        self.array = np.frombuffer(self.mm, dtype=np.uint8) if self.mm is not None else np.empty(0, np.uint8)
        if self.size:
            base = self.array.__array_interface__["data"][0]
            _MAPPED[id(self)] = (base, base + self.size)

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """Bytes [offset, offset + nbytes) as a read-only uint8 view (no copy, nothing read yet)."""
        if offset < 0 or offset + nbytes > self.size:
            raise QConvertError(f"{self.path}: bytes {offset}..{offset + nbytes} lie outside the file "
                                f"({self.size} bytes); the file is truncated, download or convert it again")
        return self.array[offset:offset + nbytes]

    def close(self) -> None:
        """Unmap when no view is left (views still alive keep the mapping until they are freed)."""
        self.array = np.empty(0, np.uint8)
        _MAPPED.pop(id(self), None)
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:  # a decoder still holds views: the mapping goes with them
                pass
            self.mm = None


def release(*arrays: np.ndarray | None) -> None:
    """Drop the pages of mapped views from this process (file-backed: the data stays in the page cache).

    Only whole pages inside each view are released, so neighbouring tensors are untouched. Arrays that
    do not lie inside a live ``MappedFile`` (heap arrays, whose pages would be zeroed) are skipped.
    """
    if _libc is None:
        return
    for a in arrays:
        if a is None or a.nbytes == 0:
            continue
        start = a.__array_interface__["data"][0]
        lo = -(-start // PAGE) * PAGE
        hi = (start + a.nbytes) // PAGE * PAGE
        if hi > lo and any(b <= lo and hi <= e for b, e in _MAPPED.values()):
            _libc.madvise(lo, hi - lo, _MADV_DONTNEED)
