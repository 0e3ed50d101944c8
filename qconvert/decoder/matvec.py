"""Weight matrices for the numpy decoder, kept in the bytes they are stored in, and fused element-wise ops.

Every matrix (F32 / F16 / BF16, every GGML block type, our int4 codes) stays as stored, memory-mapped
(formats/codecs.py); products are float32. Decoding (few rows of x) computes dot products straight from
the packed blocks in C on two threads; prefill dequantises a row block at a time and uses BLAS.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from formats.codecs import PackedMatrix
from formats.mapped import release
from formats.tensor import LazyTensor

_spec = importlib.util.find_spec("qconvert.decoder._matvec")
_path = os.environ.get("QCONVERT_MATVEC_LIB") or (_spec.origin if _spec is not None else None)  # scripts/fuzz.py --asan
_LIB = ctypes.CDLL(_path) if _path else None
if _LIB is not None:
    _LIB.qc_matvec16.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    _LIB.qc_matvec16.restype = None
    _LIB.qc_softmax_causal.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 5
    _LIB.qc_softmax_causal.restype = None
    _LIB.qc_silu_mul.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                 ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    _LIB.qc_silu_mul.restype = None
THREADS = max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
_POOL = ThreadPoolExecutor(THREADS) if THREADS > 1 else None


def on_two_threads(fn, n: int) -> None:
    """Run ``fn(start, stop)`` over [0, n) split in two halves, one on the pool (numpy and the C
    kernels release the GIL, so both halves run at once)."""
    if _POOL is None or n < 64:
        fn(0, n)
        return
    mid = n // 2
    fut = _POOL.submit(fn, mid, n)
    fn(0, mid)
    fut.result()


def softmax_causal(scores: np.ndarray, b: int, pos0: int) -> np.ndarray:
    """Causal softmax in place over the last axis of contiguous float32 ``scores`` [..., b, S]: query
    i of the block sits at absolute position pos0 + i and sees keys 0..pos0 + i (later ones get 0)."""
    S = scores.shape[-1]
    if _LIB is None:
        keys = np.arange(S)[None, :] > (pos0 + np.arange(b))[:, None]
        scores[..., keys] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        return scores
    assert scores.dtype == np.float32 and scores.flags.c_contiguous
    rows = scores.size // S
    on_two_threads(lambda r0, r1: _LIB.qc_softmax_causal(scores.ctypes.data, r0, r1, S, b, pos0), rows)
    return scores


def silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """silu(g) * u = g * sigmoid(g) * u for float32 g, u [T, f] (row-strided views allowed), one pass."""
    if _LIB is None or g.dtype != np.float32 or u.dtype != np.float32 or g.strides[1] != 4 or u.strides[1] != 4:
        return g / (np.float32(1) + np.exp(-g)) * u
    T, f = g.shape
    out = np.empty((T, f), np.float32)
    ldg, ldu = g.strides[0] // 4, u.strides[0] // 4
    on_two_threads(lambda r0, r1: _LIB.qc_silu_mul(g.ctypes.data, ldg, u.ctypes.data, ldu, f,
                                                   out.ctypes.data, r0, r1), T)
    return out


class Matrix:
    """W [rows, cols] in its stored bytes (formats.codecs.PackedMatrix); ``matrix(x)`` returns x @ W.T in float32.

    Several tensors with the same column count may be stacked into one matrix (q/k/v, gate/up) so one call
    serves them all (each part writes its columns of one output); ``splits`` gives their row counts. Nothing
    is converted up front: decoding multiplies straight from the packed bytes, prefill dequantises a row block
    at a time into a reused buffer. ``release()`` drops a mapped matrix's pages from the process.
    """

    def __init__(self, *ts: LazyTensor):
        self.parts = [t.packed() for t in ts]
        self._init()

    def _init(self) -> None:
        self.splits = [p.rows for p in self.parts]
        self.rows, self.cols = sum(self.splits), self.parts[0].cols

    @classmethod
    def from_f32(cls, w: np.ndarray, splits: list[int] | None = None) -> "Matrix":
        """A float32 matrix held in memory (e.g. a dequantised one), optionally stacked from ``splits`` rows."""
        w = np.ascontiguousarray(w, dtype=np.float32)
        m = cls.__new__(cls)
        m.parts = [PackedMatrix.ggml("F32", w.view(np.uint8).reshape(w.shape[0], -1), w.shape[1])]
        m._init()
        if splits:
            m.splits = list(splits)
        return m

    @property
    def stype(self) -> str:
        """Storage type of the (first) part, e.g. BF16, Q4_K, int4 g32 asym s8."""
        return self.parts[0].stype

    def split(self, y: np.ndarray) -> list[np.ndarray]:
        """Cut ``self(x)`` back into the stacked tensors' outputs."""
        return np.split(y, np.cumsum(self.splits)[:-1], axis=-1)

    def rows_f32(self, idx: np.ndarray) -> np.ndarray:
        """Selected rows as float32 (embedding lookup); only those rows are read."""
        return self.parts[0].take(np.asarray(idx, dtype=np.int64))

    def f32(self) -> np.ndarray:
        """W as float32 [rows, cols]: the stored array itself for a ``from_f32`` matrix (no copy), else
        ``dense()``."""
        p = self.parts[0]
        if len(self.parts) == 1 and p.stype == "F32" and p.data is not None:
            return p.data.view(np.float32).reshape(self.rows, self.cols)
        return self.dense()

    def dense(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) as float32 (a temporary)."""
        stop = self.rows if stop is None else stop
        out, r = [], 0
        for p in self.parts:
            a, b = max(start, r), min(stop, r + p.rows)
            if a < b:
                out.append(p.dequant(a - r, b - r))
            r += p.rows
        return out[0] if len(out) == 1 else np.concatenate(out)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(self.parts) == 1:
            return self.parts[0].matmul(x)
        out = np.empty((x.shape[0], self.rows), np.float32)
        r = 0
        for p in self.parts:
            p.matmul(x, out=out[:, r:r + p.rows])
            r += p.rows
        return out

    def release(self) -> None:
        """Drop the pages of a memory-mapped matrix from this process (no-op for arrays in memory)."""
        for p in self.parts:
            release(*p.arrays())
