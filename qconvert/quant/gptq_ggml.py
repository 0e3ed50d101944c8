"""GPTQ onto GGML's own block formats: the output is an ordinary GGUF of the type (Q4_0 .. Q8_0, the K-quants,
IQ4_NL / IQ4_XS) that llama.cpp runs as it is.

The column sweep is GPTQ's (qconvert/quant/gptq.py): columns are quantised in order and each rounding error
is spread over the columns not yet quantised through the inverse Hessian. When the sweep reaches a GGML
block (32 values, or a 256-value K-quant / IQ4_XS super-block), the block's scales are fitted on the
error-updated weights by the type's own encoder, importance-weighted (the imatrix file's weights, or the
Hessian's diagonal / tokens, which is the same statistic); the block's columns are then rounded one by one
onto that block's grid (value = d * G(code) + m per sub-block; formats/ggml/codec.py ``block_grid``) and the
codes are written into the encoder's blocks in place of its own (``pack_codes``).

The i-quants (IQ1_*, IQ2_*, IQ3_*) code 8 values together (one grid point of 8, or two of 4, and their signs),
so their sweep rounds a group of 8 columns at once: the grid point nearest to the group's error-updated
weights, each column weighted by its GPTQ cost 1 / U[c, c]^2, with the block's scales kept as the encoder
fitted them (formats/ggml/lattice.py ``round_group``); the 8 columns' errors then propagate in order, as
single columns do. These types sweep in column order (``act_order`` is ignored for them).
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as GQ
from gguf.constants import GGML_QUANT_SIZES

from formats.ggml import codec
from formats.ggml.lattice import GROUPS, LATTICES, round_group
from qconvert.quant.gptq import _diag, _undead, inverse_hessian_factor

IQ4_GRID = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
_IQ4_MID = (IQ4_GRID[1:] + IQ4_GRID[:-1]) / 2
NMAX = {"Q4_0": 15, "Q4_1": 15, "Q5_0": 31, "Q5_1": 31, "Q8_0": 255, "Q2_K": 3, "Q3_K": 7, "Q4_K": 15,
        "Q5_K": 31, "Q6_K": 63}
GPTQ_TYPES = set(NMAX) | {"IQ4_NL", "IQ4_XS"} | set(LATTICES)
LAZY = 128  # columns per lazy-update batch (at least one block)


def _round(w: np.ndarray, d: np.ndarray, m: np.ndarray, t: str) -> tuple[np.ndarray, np.ndarray]:
    """Codes and values of one column w on per-row grids (d, m)."""
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    if t.startswith("IQ4"):
        code = np.searchsorted(_IQ4_MID, w * inv, side="right")  # nearest grid point (the upper one on ties)
        return code.astype(np.uint8), d * IQ4_GRID[code]
    code = np.clip(np.rint((w - m) * inv), 0, NMAX[t])
    return code.astype(np.uint8), d * code + m


def gptq_ggml_matrix(W: np.ndarray, H: np.ndarray, qtype: str, importance: np.ndarray | None = None,
                     damp: float = 0.01, U: np.ndarray | None = None,
                     act_order: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ-quantise W [rows, cols] into GGML ``qtype`` blocks given the input Hessian H = X^T X.

    ``importance`` [cols]: the encoder's column weights for the block fits (default: diag(H)). ``U`` may pass a
    ready ``inverse_hessian_factor`` (H may then be just its diagonal [cols]). ``act_order``: every block's
    scales are fitted up front on the original weights ("static groups"), then the columns are swept in order
    of decreasing Hessian diagonal (needs the whole H). Returns (raw blocks [rows, row bytes] uint8,
    dequantised W float32).
    """
    if qtype not in GPTQ_TYPES:
        raise ValueError(f"GPTQ has no {qtype} grid; types: {', '.join(sorted(GPTQ_TYPES))}")
    W = np.array(W, dtype=np.float32, copy=True)
    rows, cols = W.shape
    block, size = GGML_QUANT_SIZES[GQ[qtype]]
    if cols % block:
        raise ValueError(f"{qtype}: rows of {cols} values are not whole blocks of {block}")
    hdiag = _diag(H)
    W[:, hdiag == 0] = 0.0
    qw = np.ascontiguousarray(hdiag if importance is None else importance, dtype=np.float32)
    if qtype in LATTICES:
        if U is None:
            U = inverse_hessian_factor(_undead(np.array(H, dtype=np.float32, copy=True)), damp)
        return _lattice_sweep(W, U, qtype, qw)
    perm = np.argsort(-hdiag, kind="stable") if act_order else None
    if act_order:  # static groups: every block's grid from the original weights
        raw = codec.from_f32(W, qtype, imatrix=qw).reshape(rows, -1)
        d_all, m_all, sub = codec.block_grid(raw, qtype)
        d_all, m_all = d_all.reshape(rows, -1), m_all.reshape(rows, -1)
        H = _undead(np.array(H, dtype=np.float32, copy=True))[perm][:, perm]
        W, U = W[:, perm], inverse_hessian_factor(H, damp)
    elif U is None:
        U = inverse_hessian_factor(_undead(np.array(H, dtype=np.float32, copy=True)), damp)
    if not act_order:
        raw = np.empty((rows, cols // block * size), np.uint8)
    codes = np.empty((rows, cols), np.uint8)
    dq = np.empty((rows, cols), np.float32)
    lazy = max(LAZY, block)
    for i1 in range(0, cols, lazy):
        i2 = min(cols, i1 + lazy)
        E = np.empty((rows, i2 - i1), np.float32)
        for c in range(i1, i2):
            if act_order:
                col = perm[c]
                d, m = d_all[:, col // sub], m_all[:, col // sub]
            else:
                col = c
                if c % block == 0:  # a new block: its scales from the error-updated weights
                    blk = codec.from_f32(np.ascontiguousarray(W[:, c:c + block]), qtype, imatrix=qw[c:c + block])
                    raw[:, c // block * size:(c // block + 1) * size] = blk.reshape(rows, size)
                    d_b, m_b, sub = codec.block_grid(blk, qtype)
                    d_b, m_b = d_b.reshape(rows, -1), m_b.reshape(rows, -1)
                d, m = d_b[:, (c % block) // sub], m_b[:, (c % block) // sub]
            w = W[:, c]
            codes[:, col], q = _round(w, d, m, qtype)
            dq[:, col] = q
            err = (w - q) / U[c, c]
            W[:, c + 1:i2] -= np.outer(err, U[c, c + 1:i2])
            E[:, c - i1] = err
        if i2 < cols:
            W[:, i2:] -= E @ U[i1:i2, i2:]
    raw = codec.pack_codes(raw, qtype, codes).reshape(rows, -1)
    return raw, dq


def _lattice_sweep(W: np.ndarray, U: np.ndarray, qtype: str, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sweep for an i-quant type, 8 columns at a time (W is updated in place)."""
    lat = LATTICES[qtype]
    rows, cols = W.shape
    block, size = GGML_QUANT_SIZES[GQ[qtype]]
    group = block // GROUPS
    raw = np.empty((rows, cols // block * size), np.uint8)
    dq = np.empty((rows, cols), np.float32)
    cost = 1.0 / np.square(np.diag(U)).astype(np.float32)
    lazy = max(LAZY, block)  # a block's columns all updated before the encoder fits it
    for i1 in range(0, cols, lazy):
        i2 = min(cols, i1 + lazy)
        E = np.empty((rows, i2 - i1), np.float32)
        for c in range(i1, i2, group):
            if c % block == 0:  # a new block: its scales from the error-updated weights
                b = codec.from_f32(np.ascontiguousarray(W[:, c:c + block]), qtype, imatrix=qw[c:c + block])
                b = b.reshape(rows, size)
            dq[:, c:c + group] = round_group(lat, b, (c % block) // group, W[:, c:c + group], cost[c:c + group])
            if (c + group) % block == 0:
                raw[:, c // block * size:(c // block + 1) * size] = b
            for j in range(c, c + group):
                err = (W[:, j] - dq[:, j]) / U[j, j]
                W[:, j + 1:i2] -= np.outer(err, U[j, j + 1:i2])
                E[:, j - i1] = err
        if i2 < cols:
            W[:, i2:] -= E @ U[i1:i2, i2:]
    return raw, dq
