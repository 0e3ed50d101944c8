"""Group-wise quantisation of weight matrices (2-8 bits, symmetric or asymmetric, rtn or search).

``quantize(w, bits, group_size, sym, method, scale_bits=16)`` returns integer codes and per-group scales
(and offsets): a row of ``cols`` values is cut into groups of ``group_size`` (the last group may be
shorter); asymmetric groups store ``w ~ scale * q + offset``, symmetric ones
``w ~ scale * (q - 2^(bits-1))``. Scales and offsets are f16 (``scale_bits=16``) or 8-bit codes times a
per-row f16 step (``scale_bits=8``, "double quantisation": half the overhead, so 32-wide groups cost what
64-wide f16 groups do). The work is done by the C kernel ``qc_group_quant`` on two threads;
``dequantize`` is a few vectorised numpy ops.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from formats.errors import QConvertError
from formats.int4.layout import GroupQuant, QuantSpec, group_values  # noqa: F401  (the stored form lives in formats/)
from qconvert.quant import native

METHODS = {"rtn": 0, "search": 1}


def codes_from_c(raw: np.ndarray, sym_scale: bool) -> np.ndarray:
    """8-bit scale / offset codes as the C kernels return them (16-bit two's complement) -> uint8 / int8."""
    v = raw.view(np.int16)
    return v.astype(np.int8) if sym_scale else v.astype(np.uint8)


def quantize(w: np.ndarray, bits: int = 4, group_size: int = 128, sym: bool = False, method: str = "search",
             pool: ThreadPoolExecutor | None = None, scale_bits: int = 16,
             steps: np.ndarray | None = None, zero_int: bool = False) -> GroupQuant:
    """Quantise a float32 matrix [rows, cols] group-wise (see the module docstring).

    With ``scale_bits`` 8 the row steps are chosen from the rows' own groups, or taken from ``steps``
    ([rows, 2] f16 as uint16) when given (GPTQ fixes them before its sweep). ``zero_int`` (asymmetric):
    integer zero points, ``w ~ s * (q - z)`` with ``z`` in ``1 .. 2^bits - 1`` as GPTQ / AWQ /
    compressed-tensors store them; the result's offsets are the uint8 zeros (and with 8-bit scale codes the
    row's scale step has 3 significant bits, so every scale is an exact f16)."""
    spec = QuantSpec(bits, group_size, sym, scale_bits, zero_int)
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
    fixed = steps is not None
    if fixed and spec.scale_bits != 8:
        raise QConvertError("row steps only apply to 8-bit scale codes (scale_bits=8)")
    if spec.scale_bits == 8:
        steps = np.array(steps, dtype=np.uint16) if fixed else np.zeros((rows, 2), np.uint16)
    lib = native.lib()
    errs = np.zeros(2, np.float64)

    def run(r0: int, r1: int, part: int) -> None:
        lib.qc_group_quant(w[r0:].ctypes.data, r1 - r0, cols, group_size, bits, scheme(spec), METHODS[method],
                           q[r0:].ctypes.data, scales[r0:].ctypes.data,
                           None if offsets is None else offsets[r0:].ctypes.data,
                           None if steps is None else steps[r0:].ctypes.data, int(fixed), errs[part:].ctypes.data)

    if pool is None or rows < 64:
        run(0, rows, 0)
    else:
        mid = rows // 2
        fut = pool.submit(run, mid, rows, 1)
        run(0, mid, 0)
        fut.result()
    if (errs < 0).any():
        raise MemoryError("qc_group_quant: out of memory")
    return GroupQuant(q, *stored_form(scales, offsets, steps, spec), bits, group_size, float(errs.sum()), steps)


def scheme(spec: QuantSpec) -> int:
    """The C quantisers' scheme: 0 asymmetric (float offsets), 1 symmetric, 2 asymmetric on integer zeros."""
    return 1 if spec.sym else 2 if spec.zero_int else 0


def stored_form(scales: np.ndarray, offsets: np.ndarray | None, steps: np.ndarray | None,
                spec: QuantSpec) -> tuple[np.ndarray, np.ndarray | None]:
    """(scales, offsets) as GroupQuant keeps them, from the C quantisers' uint16 outputs."""
    if steps is not None:
        scales = codes_from_c(scales, spec.sym)
    if offsets is None:
        return scales, None
    if spec.zero_int:
        return scales, offsets.astype(np.uint8)
    return scales, codes_from_c(offsets, True) if steps is not None else offsets


def dequantize(g: GroupQuant) -> np.ndarray:
    """float32 matrix back from codes, scales and offsets."""
    rows, cols = g.q.shape
    idx = np.arange(cols) // g.group_size
    s, m = group_values(g.scales, g.offsets, g.steps)
    if g.sym:
        return (g.q.astype(np.float32) - np.float32(1 << (g.bits - 1))) * s[:, idx]
    return g.q.astype(np.float32) * s[:, idx] + m[:, idx]
