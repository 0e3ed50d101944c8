"""One registry of weight storage types for the decoders and tools: ``PackedMatrix``.

A ``PackedMatrix`` is one weight matrix W [rows, cols] held in the bytes it is stored in (numpy arrays that
may be read-only views of a memory-mapped file; they are never copied): F32, F16, BF16, the GGML block types
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K .. Q6_K) and formats/int4.py's group-wise codes (2-8 bits, f16 scales or
8-bit scale codes on per-row steps, symmetric or not, version-1 byte codes). It dequantises row ranges and
multiplies: ``matmul(x)`` = x @ W.T in float32. A few rows of x (decoding) go through C dot kernels that read
the stored blocks directly (formats/_dot.c, formats/_dot_int.c) on two threads (the caller and a C worker
thread, formats/_dot_par.c); more rows (prefill) dequantise a block of rows at a time into a reused float32
buffer and use numpy's BLAS. Without the compiled kernels
everything falls back to numpy dequantisation (formats.kernels.to_f32 / formats.int4.dequant_rows).
"""
from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as GQ

from formats import kernels
from formats.dtypes import row_nbytes
from formats.int4 import dequant_rows, unpack, unpack_v1

DECODE_ROWS = 8          # up to this many rows of x use the C dot kernels; more use BLAS on dequantised blocks
BLOCK_VALUES = 16 << 20  # most float32 values dequantised at a time for the BLAS path (per thread)
MIN_SPLIT = 1 << 16      # fewer weights than this are not worth a second thread

_LIB = kernels._LIB
_P, _N, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
if _LIB is not None and hasattr(_LIB, "qc_matmul_ggml"):
    _LIB.qc_dot_ggml.argtypes = [_I, _P, _N, _P, _N, _N, _P, _N, _N, _N]
    _LIB.qc_dequant_ggml.argtypes = [_I, _P, _N, _N, _N, _N, _P]
    _LIB.qc_dot_int.argtypes = [_P, _N, _P, _P, _P, _I, _I, _I, _P, _N, _N, _P, _N, _N, _N]
    _LIB.qc_dequant_int.argtypes = [_P, _N, _P, _P, _P, _I, _I, _I, _N, _N, _N, _P]
    _LIB.qc_matmul_ggml.argtypes = _LIB.qc_dot_ggml.argtypes + [_I]
    _LIB.qc_matmul_int.argtypes = _LIB.qc_dot_int.argtypes + [_I]
    _LIB.qc_dot_set_isa.argtypes = [_I]
    _LIB.qc_dot_isa.argtypes = []
    for _fn in ("qc_dot_ggml", "qc_dequant_ggml", "qc_dot_int", "qc_dequant_int", "qc_dot_set_isa", "qc_dot_isa",
                "qc_matmul_ggml", "qc_matmul_int"):
        getattr(_LIB, _fn).restype = _I
else:  # an old build without the dot kernels: numpy only
    _LIB = None

THREADS = max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
_POOL = ThreadPoolExecutor(1, thread_name_prefix="codecs") if THREADS > 1 else None
_LOCAL = threading.local()
GGML_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def available() -> bool:
    """True when the C dot / dequantisation kernels are loaded (else the numpy fallbacks run)."""
    return _LIB is not None


ISA_NAMES = ("portable C", "AVX2", "AVX-512")


def isa() -> str:
    """Instruction set the C kernels use on this CPU ("numpy" without them)."""
    return "numpy" if _LIB is None else ISA_NAMES[_LIB.qc_dot_isa()]


def set_isa(level: int) -> str:
    """Force the C kernels' instruction set (0 portable C, 1 AVX2, 2 AVX-512, -1 the best the CPU has; a level
    the CPU lacks gives the best it has), e.g. to test every path on one machine; returns the one in use."""
    if _LIB is None:
        return "numpy"
    return ISA_NAMES[_LIB.qc_dot_set_isa(int(level))]


def on_two_threads(fn: Callable[[int, int], None], n: int, work: int) -> None:
    """Run ``fn(start, stop)`` over [0, n) in two halves, one on the pool thread (the C kernels and numpy
    release the GIL, so both run at once); a single call when ``work`` (weights touched) is small."""
    if _POOL is None or n < 2 or work < MIN_SPLIT:
        fn(0, n)
        return
    mid = n // 2
    fut = _POOL.submit(fn, mid, n)
    try:
        fn(0, mid)
    finally:
        fut.result()


def _buffer(n: int) -> np.ndarray:
    """This thread's reused float32 scratch buffer of at least ``n`` values (grown on demand)."""
    buf = getattr(_LOCAL, "buf", None)
    if buf is None or buf.size < n:
        buf = _LOCAL.buf = np.empty(n, np.float32)
    return buf[:n]


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _rows_view(a: np.ndarray) -> np.ndarray:
    """A 2-D array whose rows are contiguous (any row stride), without copying when it already is one."""
    return a if a.ndim == 2 and a.strides[1] == a.itemsize else np.ascontiguousarray(a).reshape(a.shape[0], -1)


def _aligned(a: np.ndarray) -> np.ndarray:
    """C-contiguous and aligned to its item size (the C kernels load uint16 scales directly): a copy only when
    the stored bytes sit at an odd address (an f16 tensor after an odd-sized one in a safetensors file)."""
    a = np.ascontiguousarray(a)
    return a if a.flags.aligned else a.copy()


class PackedMatrix:
    """W [rows, cols] in its stored bytes. Build with ``PackedMatrix.ggml`` or ``PackedMatrix.int_codes``."""

    def __init__(self, rows: int, cols: int, stype: str, ggml_type: str | None, data: np.ndarray | None = None,
                 qweight: np.ndarray | None = None, scales: np.ndarray | None = None,
                 offsets: np.ndarray | None = None, steps: np.ndarray | None = None, bits: int = 0,
                 group: int = 0, version: int = 2):
        self.rows, self.cols, self.stype = int(rows), int(cols), stype
        self._type = ggml_type
        self.data, self.qweight, self.scales, self.offsets, self.steps = data, qweight, scales, offsets, steps
        self.bits, self.group, self.version = int(bits), int(group), int(version)
        self.col_perm: np.ndarray | None = None  # stored column j is column col_perm[j] (act-order checkpoints)

    # ---- constructors ----
    @classmethod
    def ggml(cls, stype: str, data: np.ndarray, cols: int) -> "PackedMatrix":
        """A matrix of type ``stype`` (F32, F16, BF16 or a ``gguf.GGMLQuantizationType`` block name) whose
        bytes are ``data`` (uint8 [rows, row_bytes], or any array holding those bytes row by row)."""
        if stype not in GGML_TYPES:
            raise ValueError(f"storage type {stype} is not supported (known: {', '.join(GGML_TYPES)})")
        rb = row_nbytes(stype, int(cols))
        d = data if data.ndim >= 1 and data.strides[-1] == data.itemsize else np.ascontiguousarray(data)
        d = d.view(np.uint8)
        if d.ndim != 2 or d.shape[1] != rb:
            if d.size % rb:
                raise ValueError(f"{d.size} bytes are not whole rows of {cols} {stype} values ({rb} bytes)")
            d = d.reshape(-1, rb)
        d = _rows_view(d)
        item = {"F32": 4, "F16": 2, "BF16": 2}.get(stype, 2)  # block types start with an f16 scale
        if d.ctypes.data % item or d.strides[0] % item:  # e.g. F16 after an odd-sized U8 tensor in safetensors
            d = d.copy()
        return cls(d.shape[0], cols, stype, stype, data=d)

    @classmethod
    def int_codes(cls, qweight: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None,
                  steps: np.ndarray | None, bits: int, group: int, cols: int, version: int = 2,
                  zeros: bool = False) -> "PackedMatrix":
        """formats/int4.py codes: ``qweight`` uint8 [rows, ceil(cols * bits / 8)] (version 1, bits != 4:
        [rows, cols], one code per byte); ``scales`` / ``offsets`` [rows, ceil(cols / group)] as stored (f16 as
        uint16 when ``steps`` is None; else uint8 scales when asymmetric, int8 when symmetric, int8 offsets);
        ``steps`` [rows, 2] f16 as uint16 or None; ``offsets`` None = symmetric. ``zeros``: ``offsets`` are
        integer zero points z (layout version 3, ``W.zeros``), ``bits`` wide and bit-packed per row as the codes
        ([rows, ceil(groups * bits / 8)] uint8), the offset being ``z * -scale``; uint8 offsets are how every
        reader here tells zeros from offsets."""
        if not 2 <= bits <= 8 or group < 1:
            raise ValueError(f"int codes of {bits} bits in groups of {group} are not supported")
        q = _rows_view(np.asarray(qweight).view(np.uint8))
        ng = -(-cols // group)
        one_per_byte = version == 1 and bits != 4
        need = cols if one_per_byte else -(-cols * bits // 8)
        s8 = steps is not None
        sc_dt = (np.uint8 if offsets is not None else np.int8) if s8 else np.uint16
        sc = _aligned(np.asarray(scales).view(sc_dt).reshape(q.shape[0], ng))
        of = None if offsets is None else _aligned(
            np.asarray(offsets).view(np.uint8 if zeros else np.int8 if s8 else np.uint16).reshape(
                q.shape[0], -(-ng * bits // 8) if zeros else ng))
        st = None if steps is None else _aligned(np.asarray(steps).view(np.uint16).reshape(q.shape[0], 2))
        if q.shape[1] < need:
            raise ValueError(f"qweight rows have {q.shape[1]} bytes; {cols} codes of {bits} bits need {need}")
        label = f"int{bits} g{group} {'asym' if of is not None else 'sym'}" + (" s8" if s8 else "") + \
            (" zint" if zeros and of is not None else "")
        return cls(q.shape[0], cols, label, None, qweight=q, scales=sc, offsets=of, steps=st, bits=bits,
                   group=group, version=version)

    # ---- properties ----
    @property
    def is_int(self) -> bool:
        """True for int codes (formats/int4.py), False for F32 / F16 / BF16 / GGML blocks."""
        return self._type is None

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The stored arrays (e.g. to release a mapped matrix's pages)."""
        if not self.is_int:
            return (self.data,)
        return tuple(a for a in (self.qweight, self.scales, self.offsets, self.steps) if a is not None)

    @property
    def _flags(self) -> int:
        """The C kernels' ``flags``: 1 = version-1 codes one per byte, 2 = uint8 integer zeros as offsets."""
        return int(self.version == 1 and self.bits != 4) | (2 if self.offsets is not None and
                                                            self.offsets.dtype == np.uint8 else 0)

    @property
    def nbytes(self) -> int:
        """Stored bytes of the matrix (codes, scales, offsets and steps for int codes)."""
        return int(sum(a.nbytes for a in self.arrays()))

    def __repr__(self) -> str:
        return f"PackedMatrix({self.rows}x{self.cols} {self.stype}, {self.nbytes} bytes)"

    # ---- dequantisation ----
    def _deq_c(self, r0: int, r1: int, out: np.ndarray) -> None:
        """C dequantisation of rows [r0, r1) into contiguous float32 ``out`` [r1 - r0, cols]."""
        if self.is_int:
            rc = _LIB.qc_dequant_int(_ptr(self.qweight), self.qweight.strides[0], _ptr(self.scales),
                                     _ptr(self.offsets), _ptr(self.steps), self.bits, self.group,
                                     self._flags, self.cols, r0, r1, _ptr(out))
        else:
            rc = _LIB.qc_dequant_ggml(int(GQ[self._type]), _ptr(self.data), self.data.strides[0], self.cols,
                                      r0, r1, _ptr(out))
        if rc:
            raise ValueError(f"the C kernels cannot dequantise {self.stype}")

    def _deq_numpy(self, r0: int, r1: int) -> np.ndarray:
        if not self.is_int:
            return kernels.to_f32(self.data[r0:r1], self._type, use_c=False).reshape(r1 - r0, self.cols)
        codes = (unpack_v1 if self.version == 1 else unpack)(self.qweight[r0:r1], self.bits, self.cols)
        of = None if self.offsets is None else self.offsets[r0:r1]
        if self._flags & 2:
            of = unpack(of, self.bits, self.scales.shape[1])
        return dequant_rows(codes, self.scales[r0:r1], of, self.bits, self.group,
                            None if self.steps is None else self.steps[r0:r1])

    def permuted(self, col_perm: np.ndarray) -> "PackedMatrix":
        """This matrix with its stored columns declared to be columns ``col_perm`` of W (codes whose groups are
        runs of columns only in some order, as GPTQ act-order's): products permute x, dequant un-permutes."""
        self.col_perm = np.asarray(col_perm, dtype=np.int64)
        return self

    def dequant(self, r0: int = 0, r1: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [r0, r1) as float32 [r1 - r0, cols] (into ``out`` when given: C-contiguous float32); the
        exact values of formats.kernels.to_f32 / formats.int4.dequant_rows."""
        if self.col_perm is None:
            return self._dequant_stored(r0, r1, out)
        w = self._dequant_stored(r0, r1)
        if out is None:
            out = np.empty_like(w)
        out[:, self.col_perm] = w
        return out

    def _dequant_stored(self, r0: int = 0, r1: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        r1 = self.rows if r1 is None else r1
        if not 0 <= r0 <= r1 <= self.rows:
            raise IndexError(f"rows [{r0}, {r1}) out of range for {self.rows} rows")
        n = r1 - r0
        if out is None:
            out = np.empty((n, self.cols), np.float32)
        elif out.shape != (n, self.cols) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous float32 {(n, self.cols)}")
        if _LIB is None:
            out[...] = self._deq_numpy(r0, r1)
        else:
            self._deq_c(r0, r1, out) if n * self.cols < MIN_SPLIT else on_two_threads(
                lambda a, b: self._deq_c(r0 + a, r0 + b, out[a:b]), n, n * self.cols)
        return out

    def _subset(self, idx: np.ndarray) -> "PackedMatrix":
        """The rows ``idx`` as their own (small, copied) PackedMatrix."""
        if not self.is_int:
            sub = PackedMatrix(len(idx), self.cols, self.stype, self._type, data=self.data[idx])
        else:
            pick = (lambda a: None if a is None else a[idx])
            sub = PackedMatrix(len(idx), self.cols, self.stype, None, qweight=self.qweight[idx],
                               scales=pick(self.scales), offsets=pick(self.offsets), steps=pick(self.steps),
                               bits=self.bits, group=self.group, version=self.version)
        sub.col_perm = self.col_perm
        return sub

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (1-D integers) as float32 [len(idx), cols] (an embedding lookup: only they are read)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        return self._subset(idx).dequant()

    # ---- products ----
    def _dot(self, x: np.ndarray, y: np.ndarray, ldy: int, r0: int, r1: int, threads: int = 1) -> None:
        """C dot kernels: y's columns [r0, r1) (y: row stride ``ldy`` floats) = x @ W[r0:r1].T, the rows split
        over the caller and the kernels' worker thread when ``threads`` is 2 (formats/_dot_par.c)."""
        T = x.shape[0]
        yp = y.ctypes.data + 4 * r0
        if self.is_int:
            rc = _LIB.qc_matmul_int(_ptr(self.qweight), self.qweight.strides[0], _ptr(self.scales),
                                    _ptr(self.offsets), _ptr(self.steps), self.bits, self.group,
                                    self._flags, _ptr(x), T, self.cols, yp, ldy, r0, r1,
                                    threads)
        else:
            rc = _LIB.qc_matmul_ggml(int(GQ[self._type]), _ptr(self.data), self.data.strides[0], _ptr(x), T,
                                     self.cols, yp, ldy, r0, r1, threads)
        if rc:
            raise ValueError(f"the C kernels cannot multiply by {self.stype}")

    def matmul(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x [T, cols] (or [cols]) -> x @ W.T, float32 [T, rows] (or [rows]).

        ``out``: a preallocated float32 [T, rows] (or [rows]) array to write into; any row stride (e.g. a
        column slice of a wider output holding stacked q/k/v), unit column stride."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        vec = x.ndim == 1
        x = x.reshape(1, -1) if vec else x
        T = x.shape[0]
        if x.shape[1] != self.cols:
            raise ValueError(f"x has {x.shape[1]} columns; the matrix has {self.cols}")
        if self.col_perm is not None:
            x = np.ascontiguousarray(x[:, self.col_perm])
        if out is None:
            out = np.empty(self.rows if vec else (T, self.rows), np.float32)
        o2 = out[None, :] if out.ndim == 1 else out
        if o2.shape != (T, self.rows) or o2.dtype != np.float32 or (T > 0 and self.rows > 1 and o2.strides[1] != 4) \
                or o2.strides[0] % 4:
            raise ValueError(f"out must be float32 {(T, self.rows)} with unit column stride")
        if T == 0 or self.rows == 0:
            return out
        if _LIB is None:
            o2[...] = x @ self._deq_numpy(0, self.rows).T  # stored order, as x is
        elif T <= DECODE_ROWS:
            ldy = o2.strides[0] // 4 if T > 1 else self.rows
            split = THREADS > 1 and self.rows * self.cols >= MIN_SPLIT
            self._dot(x, o2, ldy, 0, self.rows, 2 if split else 1)
        else:
            step = max(1, min(self.rows, BLOCK_VALUES // max(1, self.cols)))
            for r0 in range(0, self.rows, step):
                r1 = min(self.rows, r0 + step)
                w = _buffer((r1 - r0) * self.cols).reshape(r1 - r0, self.cols)
                self._dequant_stored(r0, r1, out=w)
                np.matmul(x, w.T, out=o2[:, r0:r1])
        return out
