"""Weight matrices for the numpy decoder, kept in the bytes they are stored in, and fused element-wise ops.

Every matrix (F32 / F16 / BF16, every GGML block type, our int4 codes) stays as stored, memory-mapped
(formats/model/stored.py); products (qconvert/decoder/products.py) are float32. Decoding (few rows of x)
computes dot products straight from the packed blocks in C; prefill dequantises a row block at a time and
uses BLAS.
"""
from __future__ import annotations

import numpy as np

from formats import threads
from formats.files.mapped import release
from formats.model.stored import PackedMatrix
from formats.model.tensor import LazyTensor
from qconvert.decoder import products
from qconvert.decoder.native import LIB as _LIB

MIN_ROWS = 32  # fewer rows per thread are not worth a split of the element-wise ops


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
    threads.split(lambda r0, r1: _LIB.qc_softmax_causal(scores.ctypes.data, r0, r1, S, b, pos0), rows, MIN_ROWS)
    return scores


def silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """silu(g) * u = g * sigmoid(g) * u for float32 g, u [T, f] (row-strided views allowed), one pass."""
    if _LIB is None or g.dtype != np.float32 or u.dtype != np.float32 or g.strides[1] != 4 or u.strides[1] != 4:
        return g / (np.float32(1) + np.exp(-g)) * u
    T, f = g.shape
    out = np.empty((T, f), np.float32)
    ldg, ldu = g.strides[0] // 4, u.strides[0] // 4
    threads.split(lambda r0, r1: _LIB.qc_silu_mul(g.ctypes.data, ldg, u.ctypes.data, ldu, f,
                                                  out.ctypes.data, r0, r1), T, MIN_ROWS)
    return out


class Matrix:
    """W [rows, cols] in its stored bytes (formats.model.stored.PackedMatrix); ``matrix(x)`` returns x @ W.T in float32.

    Several tensors with the same column count may be stacked into one matrix (q/k/v, gate/up) so one call
    serves them all (each part writes its columns of one output); ``splits`` gives their row counts. Nothing
    is converted up front: decoding multiplies straight from the packed bytes, prefill dequantises a row block
    at a time into a reused buffer. ``release()`` drops a mapped matrix's pages from the process.
    """

    q8 = False  # products on llama.cpp's 8-bit activations (products.matmul's q8) unless a call says otherwise

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
        return products.take(self.parts[0], np.asarray(idx, dtype=np.int64))

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
                out.append(products.dequant(p, a - r, b - r))
            r += p.rows
        return out[0] if len(out) == 1 else np.concatenate(out)

    def __call__(self, x: np.ndarray, q8: bool | None = None) -> np.ndarray:
        """x @ W.T (``q8``, default ``self.q8``: on llama.cpp's 8-bit activations where products.matmul has them)."""
        q8 = self.q8 if q8 is None else q8
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(self.parts) == 1:
            return products.matmul(self.parts[0], x, q8=q8)
        out = np.empty((x.shape[0], self.rows), np.float32)
        r = 0
        for p in self.parts:
            products.matmul(p, x, out=out[:, r:r + p.rows], q8=q8)
            r += p.rows
        return out

    def release(self) -> None:
        """Drop the pages of a memory-mapped matrix from this process (no-op for arrays in memory)."""
        for p in self.parts:
            release(*p.arrays())
