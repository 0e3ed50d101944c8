"""Products and dequantisation over stored matrices (formats/model/stored.py ``PackedMatrix``).

``matmul(m, x)`` = x @ W.T in float32 for every storage type, read from the stored bytes: a few rows of x
(decoding, at most ``DECODE_ROWS``) go through the C dot kernels (_dot.c: GGML blocks, _dot_int.c: integer
codes), which dequantise in registers and split the rows over ``formats.threads.count()`` threads (the caller
and C workers, _dot_par.c); more rows (prefill) dequantise a block of rows at a time into a reused float32
buffer and use numpy's BLAS. ``dequant`` gives exactly formats.ggml.codec.to_f32's / formats.int4.layout.dequant_rows'
values (tests/test_codecs.py); without the compiled kernels everything runs through those numpy paths.
"""
from __future__ import annotations

import functools
import os
import sys
import threading

import numpy as np
from gguf import GGMLQuantizationType as GQ

from formats import threads
from formats.ggml import codec
from formats.int4.layout import dequant_rows, unpack, unpack_v1
from formats.model.stored import PackedMatrix
from qconvert.decoder.native import LIB as _LIB

DECODE_ROWS = 8          # up to this many rows of x use the C dot kernels; more use BLAS on dequantised blocks
BLOCK_VALUES = 16 << 20  # most float32 values dequantised at a time for the BLAS path (per thread)
MIN_SPLIT = 1 << 16      # fewer weights than this run on one thread (scripts/bench_codecs.py measures the split)
MIN_PART = MIN_SPLIT // 2  # the fewest weights a decoding product hands to one of its threads
_LOCAL = threading.local()


def _buffer(n: int) -> np.ndarray:
    """This thread's reused float32 scratch buffer of at least ``n`` values (grown on demand)."""
    buf = getattr(_LOCAL, "buf", None)
    if buf is None or buf.size < n:
        buf = _LOCAL.buf = np.empty(n, np.float32)
    return buf[:n]


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _dequant_c(m: PackedMatrix, r0: int, r1: int, out: np.ndarray) -> None:
    """C dequantisation of rows [r0, r1) into contiguous float32 ``out`` [r1 - r0, cols]."""
    if m.is_int:
        rc = _LIB.qc_dequant_int(_ptr(m.qweight), m.qweight.strides[0], _ptr(m.scales),
                                 _ptr(m.offsets), _ptr(m.steps), m.bits, m.group,
                                 m.flags, m.cols, r0, r1, _ptr(out))
    else:
        rc = _LIB.qc_dequant_ggml(int(GQ[m.ggml_type]), _ptr(m.data), m.data.strides[0], m.cols,
                                  r0, r1, _ptr(out))
    if rc:
        raise ValueError(f"the C kernels cannot dequantise {m.stype}")


def _dequant_numpy(m: PackedMatrix, r0: int, r1: int) -> np.ndarray:
    if not m.is_int:
        return codec.to_f32(m.data[r0:r1], m.ggml_type, use_c=False).reshape(r1 - r0, m.cols)
    codes = (unpack_v1 if m.version == 1 else unpack)(m.qweight[r0:r1], m.bits, m.cols)
    of = None if m.offsets is None else m.offsets[r0:r1]
    if m.flags & 2:
        of = unpack(of, m.bits, m.scales.shape[1])
    return dequant_rows(codes, m.scales[r0:r1], of, m.bits, m.group,
                        None if m.steps is None else m.steps[r0:r1])


def dequant(m: PackedMatrix, r0: int = 0, r1: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Rows [r0, r1) as float32 [r1 - r0, cols] (into ``out`` when given: C-contiguous float32); the
    exact values of formats.ggml.codec.to_f32 / formats.int4.layout.dequant_rows."""
    if m.col_perm is None:
        return _dequant_stored(m, r0, r1, out)
    w = _dequant_stored(m, r0, r1)
    if out is None:
        out = np.empty_like(w)
    out[:, m.col_perm] = w
    return out


def _dequant_stored(m: PackedMatrix, r0: int = 0, r1: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    r1 = m.rows if r1 is None else r1
    if not 0 <= r0 <= r1 <= m.rows:
        raise IndexError(f"rows [{r0}, {r1}) out of range for {m.rows} rows")
    n = r1 - r0
    if out is None:
        out = np.empty((n, m.cols), np.float32)
    elif out.shape != (n, m.cols) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 {(n, m.cols)}")
    if _LIB is None:
        out[...] = _dequant_numpy(m, r0, r1)
    else:
        _dequant_c(m, r0, r1, out) if n * m.cols < MIN_SPLIT else threads.split(
            lambda a, b: _dequant_c(m, r0 + a, r0 + b, out[a:b]), n)
    return out


def take(m: PackedMatrix, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` (1-D integers) as float32 [len(idx), cols] (an embedding lookup: only they are read)."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    return dequant(m.subset(idx))


def decode_threads(m: PackedMatrix) -> int:
    """The most threads a decoding product over ``m`` is split into (each gets at least MIN_PART weights)."""
    return max(1, m.rows * m.cols // MIN_PART)


def _dot(m: PackedMatrix, x: np.ndarray, y: np.ndarray, ldy: int, r0: int, r1: int, threads: int = 1) -> None:
    """C dot kernels: y's columns [r0, r1) (y: row stride ``ldy`` floats) = x @ W[r0:r1].T, the rows split
    over ``threads`` threads: the caller and the kernels' workers (_dot_par.c)."""
    T = x.shape[0]
    yp = y.ctypes.data + 4 * r0
    if m.is_int:
        rc = _LIB.qc_matmul_int(_ptr(m.qweight), m.qweight.strides[0], _ptr(m.scales),
                                _ptr(m.offsets), _ptr(m.steps), m.bits, m.group,
                                m.flags, _ptr(x), T, m.cols, yp, ldy, r0, r1,
                                threads)
    else:
        rc = _LIB.qc_matmul_ggml(int(GQ[m.ggml_type]), _ptr(m.data), m.data.strides[0], _ptr(x), T,
                                 m.cols, yp, ldy, r0, r1, threads)
    if rc:
        raise ValueError(f"the C kernels cannot multiply by {m.stype}")


@functools.cache
def _amx_bf16() -> bool:
    """True when torch is installed and the CPU has AMX tiles: there its bfloat16 matrix products (oneDNN on
    AMX) run several times faster than float32 BLAS; elsewhere they are no faster, and prompts keep float32."""
    if "torch" not in sys.modules:  # its OpenMP threads sleep between products, leaving the cores to ours
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:
        return False
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def _product_bf16(m: PackedMatrix, xb, r0: int, r1: int, out: np.ndarray) -> None:
    """out[:, r0:r1] = x @ W[r0:r1].T from bfloat16 x (``xb``) and a bfloat16 copy of the rows (each product
    summed in float32 by oneDNN, its result rounded to bfloat16, then widened): a prompt's products in the q8
    mode."""
    import torch

    wb = torch.empty((r1 - r0, m.cols), dtype=torch.bfloat16)
    if m.is_int or m.col_perm is not None:
        w = _buffer((r1 - r0) * m.cols).reshape(r1 - r0, m.cols)
        _dequant_stored(m, r0, r1, out=w)
        _LIB.qc_f32_to_bf16(w.ctypes.data, wb.data_ptr(), w.size)
    elif _LIB.qc_dequant_ggml_bf16(int(GQ[m.ggml_type]), _ptr(m.data), m.data.strides[0], m.cols, r0, r1,
                                   wb.data_ptr(), threads.count()):
        raise MemoryError(f"cannot dequantise {m.stype} to bfloat16")
    y = torch.mm(xb, wb.T)  # [T, r1 - r0] bfloat16, contiguous
    _LIB.qc_bf16_to_f32(y.data_ptr(), y.shape[1], y.shape[0], y.shape[1], out.ctypes.data + 4 * r0,
                        out.strides[0] // 4)


def _bf16(a: np.ndarray):
    """A torch bfloat16 copy of C-contiguous float32 ``a`` (nearest, ties to even)."""
    import torch

    b = torch.empty(a.shape, dtype=torch.bfloat16)
    _LIB.qc_f32_to_bf16(a.ctypes.data, b.data_ptr(), a.size)
    return b


def q8_supported(m: PackedMatrix) -> bool:
    """True when x times ``m`` can run on 8-bit activations (_dot_q8.c: llama.cpp's rounding and sums)."""
    return _LIB is not None and not m.is_int and m.col_perm is None and bool(_LIB.qc_q8_supports(int(GQ[m.ggml_type])))


def matmul(m: PackedMatrix, x: np.ndarray, out: np.ndarray | None = None, q8: bool = False) -> np.ndarray:
    """x [T, cols] (or [cols]) -> x @ W.T, float32 [T, rows] (or [rows]).

    ``out``: a preallocated float32 [T, rows] (or [rows]) array to write into; any row stride (e.g. a
    column slice of a wider output holding stacked q/k/v), unit column stride. ``q8``: up to DECODE_ROWS rows
    of x are rounded to llama.cpp's 8-bit activation blocks first, where the type has such a kernel
    (q8_supported): llama.cpp's products (its vec_dot, bit for bit), not float32-exact ones. More rows (a
    prompt) run on bfloat16 copies where the CPU has AMX (_product_bf16: several times the float32 BLAS speed,
    scripts/bench_threads.py prefill), else on the float32 path."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    vec = x.ndim == 1
    x = x.reshape(1, -1) if vec else x
    T = x.shape[0]
    if x.shape[1] != m.cols:
        raise ValueError(f"x has {x.shape[1]} columns; the matrix has {m.cols}")
    if m.col_perm is not None:
        x = np.ascontiguousarray(x[:, m.col_perm])
    if out is None:
        out = np.empty(m.rows if vec else (T, m.rows), np.float32)
    o2 = out[None, :] if out.ndim == 1 else out
    if o2.shape != (T, m.rows) or o2.dtype != np.float32 or (T > 0 and m.rows > 1 and o2.strides[1] != 4) \
            or o2.strides[0] % 4:
        raise ValueError(f"out must be float32 {(T, m.rows)} with unit column stride")
    if T == 0 or m.rows == 0:
        return out
    if _LIB is None:
        o2[...] = x @ _dequant_numpy(m, 0, m.rows).T  # stored order, as x is
    elif q8 and T <= DECODE_ROWS and q8_supported(m):
        ldy = o2.strides[0] // 4 if T > 1 else m.rows
        n = min(threads.count(), decode_threads(m) * T)
        if _LIB.qc_matmul_q8(int(GQ[m.ggml_type]), _ptr(m.data), m.data.strides[0], _ptr(x), T, m.cols, _ptr(o2),
                             ldy, 0, m.rows, n):
            raise MemoryError("no memory for the 8-bit activations")
    elif T <= DECODE_ROWS:
        ldy = o2.strides[0] // 4 if T > 1 else m.rows
        _dot(m, x, o2, ldy, 0, m.rows, min(threads.count(), decode_threads(m)))
    else:
        threads.sync_libraries()
        xb = _bf16(x) if q8 and _amx_bf16() else None
        step = max(1, min(m.rows, BLOCK_VALUES // max(1, m.cols)))
        for r0 in range(0, m.rows, step):
            r1 = min(m.rows, r0 + step)
            if xb is not None:
                _product_bf16(m, xb, r0, r1, o2)
                continue
            w = _buffer((r1 - r0) * m.cols).reshape(r1 - r0, m.cols)
            _dequant_stored(m, r0, r1, out=w)
            np.matmul(x, w.T, out=o2[:, r0:r1])
    return out
