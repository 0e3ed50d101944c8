"""Weight matrices for the numpy decoder, kept in the precision they were stored in.

A bf16 or f16 checkpoint keeps its matrices as 16-bit values (bit-exact: every 16-bit float is a
float32); products are computed in float32. Decoding (few rows of x) goes through a C kernel that
upcasts on the fly on two threads, reading half the bytes of a float32 matrix; prefill converts the
matrix to float32 and uses numpy's BLAS. Other storage types are dequantised to float32 once.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from formats import kernels
from formats.tensor import LazyTensor

_spec = importlib.util.find_spec("qconvert.decoder._matvec")
_LIB = ctypes.CDLL(_spec.origin) if _spec is not None and _spec.origin else None
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
DECODE_ROWS = 8  # up to this many rows of x use the 16-bit kernel; more use float32 BLAS
CHUNK_VALUES = 16 << 20  # matrices above this many values are multiplied in row blocks


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
    """W [rows, cols]; ``matrix(x)`` returns x @ W.T in float32.

    Several tensors with the same column count may be stacked into one matrix (q/k/v, gate/up) so
    one product serves them all; ``splits`` gives their row counts.
    """

    def __init__(self, *ts: LazyTensor):
        self.splits = [t.shape[0] for t in ts]
        self.rows, self.cols = sum(self.splits), ts[0].shape[1]
        if _LIB is not None and all(t.stype == ts[0].stype for t in ts) and ts[0].stype in ("BF16", "F16"):
            self.wt = 0 if ts[0].stype == "BF16" else 1
            self.raw = np.concatenate([t.raw_rows(0, t.n_rows).view(np.uint16).reshape(t.shape) for t in ts])
            self.f32 = None
        else:
            self.raw = None
            self.f32 = np.concatenate([np.asarray(t.numpy(), dtype=np.float32) for t in ts])

    @classmethod
    def from_f32(cls, w: np.ndarray, splits: list[int] | None = None) -> "Matrix":
        """A float32 matrix held in memory (e.g. a dequantised one), optionally stacked from ``splits`` rows."""
        m = cls.__new__(cls)
        m.f32 = np.ascontiguousarray(w, dtype=np.float32)
        m.raw = None
        m.rows, m.cols = m.f32.shape
        m.splits = list(splits) if splits else [m.rows]
        return m

    def split(self, y: np.ndarray) -> list[np.ndarray]:
        """Cut ``self(x)`` back into the stacked tensors' outputs."""
        return np.split(y, np.cumsum(self.splits)[:-1], axis=-1)

    def rows_f32(self, idx: np.ndarray) -> np.ndarray:
        """Selected rows as float32 (embedding lookup)."""
        if self.f32 is not None:
            return self.f32[idx]
        return kernels.to_f32(self.raw[idx], "BF16" if self.wt == 0 else "F16").reshape(len(idx), self.cols)

    def dense(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) as float32 (a temporary for 16-bit storage), converted on two threads."""
        stop = self.rows if stop is None else stop
        if self.f32 is not None:
            return self.f32[start:stop]
        t = "BF16" if self.wt == 0 else "F16"
        out = np.empty((stop - start, self.cols), np.float32)

        def conv(r0: int, r1: int) -> None:
            out[r0:r1] = kernels.to_f32(self.raw[start + r0:start + r1], t).reshape(r1 - r0, self.cols)
        on_two_threads(conv, stop - start)
        return out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.f32 is not None:
            return x @ self.f32.T
        T = x.shape[0]
        if T > DECODE_ROWS:
            if self.rows * self.cols <= CHUNK_VALUES:
                return x @ self.dense().T
            # large matrix (the head): convert and multiply in row blocks, no matrix-sized temporary
            out = np.empty((T, self.rows), np.float32)
            step = max(1, CHUNK_VALUES // self.cols)
            for r0 in range(0, self.rows, step):
                r1 = min(self.rows, r0 + step)
                np.matmul(x, self.dense(r0, r1).T, out=out[:, r0:r1])
            return out
        x = np.ascontiguousarray(x, dtype=np.float32)
        if _POOL is None or self.rows < 256:
            y = np.empty((T, self.rows), np.float32)
            _LIB.qc_matvec16(self.wt, self.raw.ctypes.data, x.ctypes.data, y.ctypes.data, 0, self.rows, self.cols, T)
            return y
        mid = self.rows // 2
        parts = [np.empty((T, mid), np.float32), np.empty((T, self.rows - mid), np.float32)]

        def run(i: int) -> None:
            r0, r1 = (0, mid) if i == 0 else (mid, self.rows)
            _LIB.qc_matvec16(self.wt, self.raw.ctypes.data, x.ctypes.data, parts[i].ctypes.data, r0, r1, self.cols, T)

        fut = _POOL.submit(run, 1)
        run(0)
        fut.result()
        return np.concatenate(parts, axis=1)
