"""Group-wise quantisation of weight matrices (2-8 bits, symmetric or asymmetric, rtn or search).

``quantize(w, bits, group_size, sym, method)`` returns integer codes and f16 scales (and offsets): a row
of ``cols`` values is cut into groups of ``group_size`` (the last group may be shorter); asymmetric
groups store ``w ~ scale * q + offset``, symmetric ones ``w ~ scale * (q - 2^(bits-1))``. The work is done
by the C kernel ``qc_group_quant`` on two threads; ``dequantize`` is a few vectorised numpy ops.
"""
from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from formats import kernels
from formats.errors import QConvertError

METHODS = {"rtn": 0, "search": 1}


@dataclass
class GroupQuant:
    """One quantised matrix: codes [rows, cols] uint8, scales/offsets [rows, groups] float16 (raw uint16)."""

    q: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None
    bits: int
    group_size: int
    sq_err: float | None = None  # sum of squared dequantisation errors, when the quantiser measured it

    @property
    def sym(self) -> bool:
        return self.offsets is None


def _lib():
    lib = kernels._LIB
    if lib is None:
        raise QConvertError("the compiled kernels are missing; reinstall qconvert (pip install -e .)")
    if not getattr(lib, "_gq_ready", False):
        lib.qc_group_quant.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                       ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_void_p]
        lib.qc_group_quant.restype = None
        lib._gq_ready = True
    return lib


def quantize(w: np.ndarray, bits: int = 4, group_size: int = 128, sym: bool = False, method: str = "search",
             pool: ThreadPoolExecutor | None = None) -> GroupQuant:
    """Quantise a float32 matrix [rows, cols] group-wise."""
    if not 2 <= bits <= 8:
        raise QConvertError(f"--bits {bits} is not supported; choose 2 to 8")
    if method not in METHODS:
        raise QConvertError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "search" and group_size > 256:
        method = "rtn"
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = w.shape
    ng = -(-cols // group_size)
    q = np.empty((rows, cols), np.uint8)
    scales = np.empty((rows, ng), np.uint16)
    offsets = None if sym else np.empty((rows, ng), np.uint16)
    lib = _lib()
    errs = np.zeros(2, np.float64)

    def run(r0: int, r1: int, part: int) -> None:
        lib.qc_group_quant(w[r0:].ctypes.data, r1 - r0, cols, group_size, bits, int(sym), METHODS[method],
                           q[r0:].ctypes.data, scales[r0:].ctypes.data,
                           None if offsets is None else offsets[r0:].ctypes.data, errs[part:].ctypes.data)

    if pool is None or rows < 64:
        run(0, rows, 0)
    else:
        mid = rows // 2
        fut = pool.submit(run, mid, rows, 1)
        run(0, mid, 0)
        fut.result()
    return GroupQuant(q, scales, offsets, bits, group_size, float(errs.sum()))


def dequantize(g: GroupQuant) -> np.ndarray:
    """float32 matrix back from codes, scales and offsets."""
    rows, cols = g.q.shape
    idx = np.arange(cols) // g.group_size
    s = g.scales.view(np.float16).astype(np.float32)[:, idx]
    if g.sym:
        return (g.q.astype(np.float32) - np.float32(1 << (g.bits - 1))) * s
    return g.q.astype(np.float32) * s + g.offsets.view(np.float16).astype(np.float32)[:, idx]
